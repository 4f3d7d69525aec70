"""Map ONNX values to the PyTorch modules whose outputs they are, and cut graphs for localisation.

``torch.onnx.export(..., dynamo=True)`` stores on every node the module stack it came
from, as ``metadata_props["pkg.torch.onnx.name_scopes"]``: ``repr`` of a list of module
names from the root (``''``) to the innermost module, followed by the FX node name,
e.g. ``['', 'block1', 'block1.norm1', '_native_batch_norm_legit_no_training_1']``.

A value produced inside module M is an *output of M* (a module boundary) when some node
outside M consumes it or it is a graph output. Each boundary is attributed to the
innermost such module. When the exporter fuses layers (an eval BatchNorm/BKN folded into
the preceding Conv), the fused node carries the last module's scope and still consumes
the first module's weight initializer (``block1.conv1.weight``); both modules are
reported as the node's ``modules``.

Cutting: :func:`with_outputs` exposes values as extra graph outputs (all boundaries at
once); :func:`prefix_model` keeps only the nodes one value depends on, with that value
as the only output, as ``polygraphy debug reduce`` does, so a runtime optimises the
prefix as it would inside the whole graph up to that point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

from runtime._bkn import NAME_SCOPES_KEY, read_name_scopes

__all__ = [
    "NAME_SCOPES_KEY",
    "Boundary",
    "module_boundaries",
    "module_inputs",
    "node_reads",
    "node_scope",
    "outer_reads",
    "prefix_model",
    "sub_model",
    "unwrapped",
    "with_outputs",
]


@dataclass(frozen=True)
class Boundary:
    """One ONNX value that is a module's output.

    value: ONNX value name; node / op_type: its producer; position: the producer's index
    in the (topologically sorted) graph; module: the innermost module it leaves;
    modules: every module the producing node computes (fused layers), in model order.
    """

    value: str
    node: str
    op_type: str
    position: int
    module: str
    modules: tuple[str, ...] = field(default_factory=tuple)
    #: The modules around ``module`` that the value also leaves, innermost first: a block whose output is
    #: its last submodule's (a shared activation called twice, whose own outputs are not compared).
    enclosing: tuple[str, ...] = field(default_factory=tuple)


def node_scope(node: onnx.NodeProto) -> tuple[str, ...] | None:
    """The module path of ``node`` (root ``''`` first), or None without exporter metadata."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            scopes = read_name_scopes(prop.value)
            return tuple(scopes[:-1]) if scopes else None
    return None


def _parameter_owner(initializer_name: str) -> str | None:
    """``block1.conv1.weight`` -> ``block1.conv1`` (None for exporter constants like ``val_71``)."""
    if "." not in initializer_name:
        return None
    return initializer_name.rsplit(".", 1)[0]


def unwrapped(name: str, known_modules: set[str] | None) -> str:
    """``model.block1`` -> ``block1`` when an exporter wrapped the user's model in a module."""
    if known_modules is None or not name or name in known_modules:
        return name
    parts = name.split(".")
    for start in range(1, len(parts)):
        candidate = ".".join(parts[start:])
        if candidate in known_modules:
            return candidate
    return name


def _scopes(
    model: onnx.ModelProto, known_modules: set[str] | None, aliases: dict[str, str] | None
) -> list[tuple[str, ...] | None]:
    """Each node's module path (None without metadata), its names matched to ``known_modules`` and an alias
    (a module registered under several names) replaced by the name it is known by."""
    aliases = aliases or {}
    known = None if known_modules is None else known_modules | set(aliases)
    scopes: list[tuple[str, ...] | None] = []
    for node in model.graph.node:
        scope = node_scope(node)
        names = None if scope is None else (unwrapped(s, known) for s in scope)
        scopes.append(None if names is None else tuple(aliases.get(n, n) for n in names))
    return scopes


def module_boundaries(
    model: onnx.ModelProto, known_modules: set[str] | None = None, aliases: dict[str, str] | None = None
) -> list[Boundary]:
    """Every module boundary of the main graph, in topological order.

    known_modules: the PyTorch module names; parameter owners not among them are ignored,
    and scope names are matched to them also after dropping leading components (an
    exporter may wrap the model, giving ``model.block1`` for ``block1``). aliases: further
    names of modules registered under several names -> the known name (the exporter's
    scopes may use either).
    Nodes without the exporter's metadata are not attributed to any module.
    """
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    scopes = _scopes(model, known_modules, aliases)
    aliases = aliases or {}
    known = None if known_modules is None else known_modules | set(aliases)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    folded_into = _folded_in_pytorch(model)
    scoped = {name for scope in scopes if scope is not None for name in scope}
    boundaries: list[Boundary] = []
    for index, node in enumerate(graph.node):
        scope = scopes[index]
        if scope is None:
            continue
        owners = []
        for name in node.input:
            owner = _parameter_owner(name) if name in initializers else None
            # a parameter named through another registration of its module (nnU-Net's conv, held as `conv` and as
            # `all_modules.0`) is the module's known name, as in the scopes
            owner = unwrapped(owner, known) if owner else None
            owner = aliases.get(owner, owner) if owner else None
            if owner and (known_modules is None or owner in known_modules) and owner not in owners:
                owners.append(owner)
        # A module whose parameters this node reads but which has nodes of its own (a wired BKN layer's step reads
        # its predecessor's γ, β for the prior; a tied weight) ran separately: this node's value is not its output.
        owners = [owner for owner in owners if owner not in scoped or owner in scope]
        for value in node.output:
            if not value:
                continue
            left = _modules_left(scope, [scopes[i] for i in consumers.get(value, [])], value in graph_outputs)
            if not left:
                continue
            module, enclosing = left[0], tuple(left[1:])
            modules = tuple([*(o for o in owners if o != module), module])
            folded = [m for m in folded_into.get(node.name, []) if m not in modules]
            if folded:
                if any(m in scoped for m in folded) or (
                    known_modules is not None and not all(m in known_modules for m in folded)
                ):
                    # A norm-act folded in PyTorch keeps its activation as nodes of its own: this value
                    # (host + normalization) is the output of no PyTorch module, so it is not compared.
                    continue
                # Folded on the PyTorch side (fp16 export): the node computes host + normalization,
                # so its value is the normalization's output, the last module of the group.
                modules = (*modules, *folded)
                module = folded[-1]
                enclosing = ()
            boundaries.append(Boundary(value, node.name, node.op_type, index, module, modules, enclosing))
    return boundaries


def module_inputs(
    model: onnx.ModelProto, module: str, known_modules: set[str] | None = None, aliases: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """The values computed outside ``module`` that its nodes read (not initializers or constants), each with the
    innermost module whose node produced it (``''``: the model's own forward; a graph input the nodes read as it is
    counts as the model's too), in graph order (``known_modules``, ``aliases``: as :func:`module_boundaries`)."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    produced: dict[str, tuple[str, ...] | None] = {value.name: None for value in graph.input}
    constants: set[str] = set()
    found: dict[str, str] = {}
    for node, scope in zip(graph.node, _scopes(model, known_modules, aliases)):
        if scope is not None and module in scope:
            for name in node.input:
                if name and name in produced and name not in constants and name not in initializers:
                    outer = produced[name]
                    if (outer is None or module not in outer) and name not in found:
                        found[name] = next((s for s in reversed(outer or ()) if s), "")
        for value in node.output:
            produced[value] = scope
            if node.op_type == "Constant":
                constants.add(value)
    return list(found.items())


#: bkn_export's fold report: JSON list of {"module", "target" (ONNX node name), "kind", "detail"}.
FOLD_REPORT_KEY = "bkn_export.fold_report"


def _folded_in_pytorch(model: onnx.ModelProto) -> dict[str, list[str]]:
    """ONNX node name -> normalization modules folded into it (in model order), from the fold report.

    An fp16 inference export folds BKN/BatchNorm into the preceding Conv in PyTorch before
    exporting, so the host node carries only the host's scope; the fold report names the
    normalization. Empty for files without a (readable) report.
    """
    text = next((p.value for p in model.metadata_props if p.key == FOLD_REPORT_KEY), None)
    if text is None:
        return {}
    try:
        records = json.loads(text)
    except ValueError:
        return {}
    folded: dict[str, list[str]] = {}
    if not isinstance(records, list):
        return folded
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("target"), str) and isinstance(record.get("module"), str):
            folded.setdefault(record["target"], []).append(record["module"])
    return folded


def _modules_left(
    scope: tuple[str, ...], consumer_scopes: list[tuple[str, ...] | None], is_graph_output: bool
) -> list[str]:
    """The non-root modules of ``scope`` that the value leaves, innermost first."""
    left = []
    for depth in range(len(scope) - 1, 0, -1):
        module = scope[depth]
        if not module:
            continue
        inside = scope[: depth + 1]
        if is_graph_output or any(c is None or c[: depth + 1] != inside for c in consumer_scopes):
            left.append(module)
    return left


def _value_info(model: onnx.ModelProto, names: list[str]) -> list[onnx.ValueInfoProto]:
    known = {v.name: v for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)}
    missing = [n for n in names if n not in known]
    if missing:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            known.update({v.name: v for v in inferred.graph.value_info})
        except Exception:  # inference is best effort; untyped outputs work in ORT and onnx.reference
            pass
    infos = []
    for name in names:
        if name in known and known[name].type.HasField("tensor_type"):
            info = onnx.ValueInfoProto()
            info.CopyFrom(known[name])
            infos.append(info)
        else:
            infos.append(onnx.helper.make_empty_tensor_value_info(name))
    return infos


def with_outputs(model: onnx.ModelProto, values: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are its own plus ``values`` (intermediates exposed)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    present = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(_value_info(model, [v for v in values if v not in present]))
    return exposed


def outer_reads(graph: onnx.GraphProto) -> list[str]:
    """The names a subgraph (an ``If`` branch, a ``Loop`` / ``Scan`` body) reads from the scopes around it: what its
    nodes (and theirs, recursively) take that the subgraph does not define (inputs, initializers, node outputs)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    defined |= {out for node in graph.node for out in node.output if out}
    found: dict[str, None] = {}
    for node in graph.node:
        for name in node_reads(node):
            if name not in defined:
                found[name] = None
    return list(found)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value ``node`` reads: its inputs, then what its subgraphs read from the enclosing scopes (a branch's
    Gemm on the main graph's weights), in order, without repeats."""
    names = dict.fromkeys(name for name in node.input if name)
    for attribute in node.attribute:
        for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
            names.update(dict.fromkeys(outer_reads(graph)))
    return list(names)


def _upstream(graph: onnx.GraphProto, value: str, stops: set[str]) -> tuple[set[int], set[str]]:
    """Walk up from ``value``: (the indices of the nodes it is computed by, not past a value of ``stops``; the values
    of ``stops`` reached, ``value`` itself not counted). A node's subgraphs' reads of outer values count as its
    inputs."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    nodes: set[int] = set()
    reached: set[str] = set()
    stack, seen = [value], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != value and name in stops:
            reached.add(name)
        elif name in producer and producer[name] not in nodes:
            nodes.add(producer[name])
            stack.extend(node_reads(graph.node[producer[name]]))
    return nodes, reached


def nearest_upstream(model: onnx.ModelProto, value: str, stops: set[str]) -> set[str]:
    """The values of ``stops`` that ``value`` is computed from with no other value of ``stops`` between
    (its nearest upstream boundaries; not ``value`` itself)."""
    return _upstream(model.graph, value, stops)[1]


def prefix_model(model: onnx.ModelProto, value: str) -> onnx.ModelProto:
    """The sub-model computing ``value`` from the graph inputs: the nodes it depends on, ``value`` its output."""
    return sub_model(model, [], value)


def sub_model(model: onnx.ModelProto, inputs: list[str], value: str) -> onnx.ModelProto:
    """The sub-model computing ``value`` from ``inputs`` (values of ``model`` made graph inputs, typed as the file
    declares or infers them) and the graph inputs it needs beyond them: the nodes in between, in graph order, with the
    initializers they read, ``value`` its only output.

    As ``onnx.utils.extract_model`` does, except that what an ``If`` branch or a ``Loop`` / ``Scan`` body reads from
    the main graph (its weights, values computed before it) counts as read (:func:`node_reads`): the extractor keeps
    neither, and a cut through such a node does not load."""
    graph = model.graph
    needed_nodes = _upstream(graph, value, set(inputs))[0]
    nodes = [graph.node[i] for i in sorted(needed_nodes)]
    used = {name for node in nodes for name in node_reads(node)} | {value}
    made = set(inputs)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(nodes)
    del cut.graph.input[:]
    cut.graph.input.extend(_value_info(model, [name for name in inputs if name in used]))
    cut.graph.input.extend(v for v in graph.input if v.name in used and v.name not in made)
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(t for t in graph.initializer if t.name in used and t.name not in made)
    del cut.graph.sparse_initializer[:]
    cut.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in used)
    del cut.graph.output[:]
    cut.graph.output.extend(_value_info(model, [value]))
    return cut
