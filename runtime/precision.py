"""The precision an output of an ONNX graph was computed in: the narrowest float type on its path.

A graph output's declared type does not say how precisely its value was computed: a float32 network whose
head casts to float64 (``x.double()``, a ``Cast(to=DOUBLE)`` before a loss or a softmax) returns float64 values
that carry float32 rounding, and two runtimes (or PyTorch and a runtime) differ on them by float32's ulps, a
million times float64's default tolerance. Judging such an output at float64 tolerances would fail a file that
agrees. :func:`computed_precision` finds, per float output, the narrowest float type among the values computed
on its path (node outputs that the output depends on, through the main graph), so that the output is judged at
that type's tolerances, and the report says so (:class:`runtime.compare.TolerancePolicy`, ``computed_in``).

Only computed values count: a graph input or an initializer of a narrower type, or a ``Constant``, is the same bits
in every runtime and adds no rounding difference by being cast up; so is a computed value that holds exact values
its type represents whatever precision a runtime computes it in (a float16 0/1 mask cast from a bool, ``1 - mask``,
``mask * 0.5``, a count ``mask.sum()``: :func:`_exact_values`). A narrower type's rounding of anything else counts,
even a single ``Cast`` of an input that every IEEE runtime rounds alike: a runtime may compute a narrower type's
steps in a wider one (OpenVINO's CPU plugin computes ``x.half().float()`` as ``x``), so the outputs differ by that
type's rounding. Types come from the graph's own declarations (inputs, outputs, initializers, ``value_info``)
completed by ONNX shape inference where it runs; a value of unknown type counts as nothing. Values computed inside
subgraphs (``If`` branches, ``Loop`` / ``Scan`` bodies) count where they are on the path of the node output being
judged, and so do the main-graph values a subgraph carries there (walked through the subgraph by the same rule);
function bodies are not counted (a custom op's output is, in its declared type). The walk stops at a value of a non-
float type (a comparison's bool, an index, a shape, a float cast to an integer): a rounding difference upstream of
it shows as a discrete jump (a flipped mask, an index or an integer one off), which no float tolerance absorbs, so
it does not make the output a narrower type's result.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from runtime.compare import FLOAT_PRECISION

__all__ = ["computed_precision", "graphs", "value_types"]

_NAMES: dict[int, str] = {
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.DOUBLE: "float64",
}


def computed_precision(model: onnx.ModelProto) -> dict[str, str]:
    """Per graph output whose value was computed in a narrower float type than its own, that type's name.

    model (N nodes, V named values): one pass over the nodes to map producers, one backward walk per output, so
    O(outputs · (N + V)) at worst. Outputs not listed: computed at their own precision, or not float."""
    inferred = _inferred(model)
    elements = _scoped_types(model, inferred)
    producer = {name: node for node in model.graph.node for name in node.output if name}
    exact = _exact_values(model, elements, _static_shapes(inferred))
    narrower = {}
    for output in model.graph.output:
        own = _NAMES.get(elements.get(output.name, onnx.TensorProto.UNDEFINED))
        if own is None:
            continue
        ancestors = _computed_ancestors(output.name, producer, elements, exact)
        narrowest = _narrowest(_NAMES.get(element) for element in ancestors if element is not None)
        if narrowest is not None and FLOAT_PRECISION[narrowest] < FLOAT_PRECISION[own]:
            narrower[output.name] = narrowest
    return narrower


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Value name → ONNX element type, from the graph's declarations (subgraphs' too) and, where it runs, ONNX shape
    inference; the main graph's first where a name repeats."""
    elements: dict[str, int] = {}
    for graph in (*graphs(_inferred(model).graph), *graphs(model.graph)):
        _declared(graph, elements)
    return elements


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` completed by ONNX shape inference, or ``model`` itself where inference cannot type it (custom ops)."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # its declarations alone
        return model


def _declared(graph: onnx.GraphProto, elements: dict[str, int]) -> None:
    """Add the element types ``graph`` declares (inputs, outputs, value_info, initializers) to ``elements``, where it
    has none for the name yet."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            elements.setdefault(value.name, value.type.tensor_type.elem_type)
    for initializer in graph.initializer:
        elements.setdefault(initializer.name, initializer.data_type)


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph of its nodes' attributes (``If`` / ``Loop`` bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from graphs(attribute.g)
            for subgraph in attribute.graphs:
                yield from graphs(subgraph)


#: Integer element types, by the largest magnitude they hold (a cast from them is an integer of at most that size).
_INTEGER_BOUNDS: dict[int, int] = {
    onnx.TensorProto.BOOL: 1,
    onnx.TensorProto.INT8: 2**7,
    onnx.TensorProto.UINT8: 2**8 - 1,
    onnx.TensorProto.INT16: 2**15,
    onnx.TensorProto.UINT16: 2**16 - 1,
}
#: Per float type, the most significand bits and the finest step 2^-e it holds exactly (its smallest subnormal).
_EXACT_BITS: dict[str, tuple[int, int]] = {
    "float16": (11, 24),
    "bfloat16": (8, 133),
    "float32": (24, 149),
    "float64": (53, 1074),
}
#: Ops whose output holds some of their (listed) inputs' values unchanged, by op → positions of the data inputs
#: (None: every input).
_SAME_VALUES: dict[str, tuple[int, ...] | None] = {
    **dict.fromkeys(
        ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Expand", "Tile", "Slice",
         "Gather", "GatherElements", "GatherND", "ReduceMax", "ReduceMin", "Cast", "CastLike", "Neg", "Abs",
         "Relu", "MaxPool", "DepthToSpace", "SpaceToDepth", "Split", "Compress"),
        (0,),
    ),
    "Pad": (0, 2),  # the data and the constant value (absent: 0)
    "Where": (1, 2),
    "Concat": None,
    "Max": None,
    "Min": None,
}  # fmt: skip


@dataclass(frozen=True)
class _Dyadic:
    """Values known to be integer multiples of 2^-``step`` with magnitude at most ``bound`` (``step`` above
    :data:`_NOT_DYADIC`: not multiples of any 2^-e that is known), and, where they are few, the values themselves."""

    bound: float
    step: int = 0
    values: frozenset[float] | None = None

    def exact_in(self, name: str) -> bool:
        """Whether float type ``name`` holds every such value exactly (each of the values where they are known; else
        the significand and the finest step fit)."""
        if self.values is not None:
            return all(_holds(name, value) for value in self.values)
        bits, finest = _EXACT_BITS[name]
        return self.step <= finest and self.bound * 2.0**self.step <= 2.0**bits


#: A step no float type reaches: values that are not known multiples of a power of two.
_NOT_DYADIC = 10**6
#: The most values a :class:`_Dyadic` keeps one by one (a mask's {0, 1}, a bias's {0, -10000}).
_FEW_VALUES = 64


def _holds(name: str, value: float) -> bool:
    """Whether float type ``name`` represents ``value`` exactly (and finitely)."""
    if name == "bfloat16":
        import ml_dtypes

        dtype: Any = ml_dtypes.bfloat16
    else:
        dtype = {"float16": np.float16, "float32": np.float32, "float64": np.float64}[name]
    with np.errstate(over="ignore"):
        rounded = float(np.asarray(value, dtype=np.float64).astype(dtype))
    return math.isfinite(rounded) and rounded == value


def _of_values(values: Iterable[float]) -> _Dyadic | None:
    """What a set of values is known to hold: the values themselves where they are few, with their bound and step;
    None for none or a non-finite one."""
    found = np.unique(np.asarray(list(values), dtype=np.float64))
    if not found.size or not np.all(np.isfinite(found)):
        return None
    bound = float(np.max(np.abs(found)))
    step = next((e for e in range(25) if _multiples(found, e)), _NOT_DYADIC)
    kept = frozenset(float(v) for v in found) if found.size <= _FEW_VALUES else None
    if kept is None and step == _NOT_DYADIC:
        return None
    return _Dyadic(bound, step, kept)


def _combined(op: str, first: _Dyadic, second: _Dyadic) -> _Dyadic | None:
    """Add / Sub / Mul of two known values: the values pairwise where both are few, else by bound and step."""
    if first.values is not None and second.values is not None:
        pairs = [(a, b) for a in first.values for b in second.values]
        combine = {"Add": float.__add__, "Sub": float.__sub__, "Mul": float.__mul__}[op]
        found = _of_values(combine(a, b) for a, b in pairs)
        if found is not None and found.values is not None:
            return found
    if _NOT_DYADIC in (first.step, second.step):
        return None
    if op == "Mul":
        return _Dyadic(first.bound * second.bound, first.step + second.step)
    return _Dyadic(first.bound + second.bound, max(first.step, second.step))


def _moved(op: str, parts: Sequence[_Dyadic]) -> _Dyadic | None:
    """An op that moves, picks or compares its data inputs' values (:data:`_SAME_VALUES`): their union where each is
    known value by value (negated, made absolute or clamped at 0 for Neg / Abs / Relu), else the largest bound and
    finest step."""
    if all(part.values is not None for part in parts):
        change = {"Neg": lambda v: -v, "Abs": abs, "Relu": lambda v: max(v, 0.0)}.get(op, lambda v: v)
        found = _of_values(change(v) for part in parts for v in part.values or ())
        if found is not None:
            return found
    steps = [part.step for part in parts]
    if _NOT_DYADIC in steps:
        return None
    return _Dyadic(max(part.bound for part in parts), max(steps))


def _exact_values(
    model: onnx.ModelProto, elements: Mapping[str, int], shapes: Mapping[str, tuple[int | None, ...]]
) -> set[str]:
    """Main-graph values computed in a float type that hold exact values small and coarse enough for it (integers up
    to 2^11 in float16, halves up to 2^10...), so that they carry no rounding in any runtime, whatever precision it
    computes that type's ops in: a 0/1 mask cast from a comparison's bool (``mask.half()``), ``1 - mask``, ``mask *
    0.5``, a count ``mask.sum()``, a sign, their reshapes and selections.

    A forward pass over the nodes (ONNX lists them in topological order) carrying, per value, a :class:`_Dyadic`: a
    cast from bool / (u)int8 / (u)int16 (integers of its type's size), a float Constant or initializer whose values are
    multiples of 2^-e (e ≤ 24); ops that move or pick values keep the largest bound of their data inputs
    (:data:`_SAME_VALUES`); Add / Sub add the bounds, Mul multiplies them (the steps add), Sign gives 1, ReduceSum
    multiplies the bound by the count it sums (from static shapes). A value counts as exact where its own float type
    holds every such value (before, a float32 output scaled by ``1 - mask`` or ``mask * 0.5`` computed in float16 was
    judged at float16 tolerances, and a real fault up to those passed)."""
    integers = _integer_constants(model)
    known: dict[str, _Dyadic] = {}
    for tensor in model.graph.initializer:
        found = _dyadic(tensor)
        if found is not None:
            known[tensor.name] = found
    types = {name: _NAMES[element] for name, element in elements.items() if element in _NAMES}
    exact: set[str] = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        found = _node_dyadic(node, known, elements, shapes, integers)
        if found is None:
            continue
        for name in node.output:
            if not name:
                continue
            known[name] = found
            own = types.get(name)
            if own is not None and found.exact_in(own):
                exact.add(name)
    return exact


def _node_dyadic(
    node: onnx.NodeProto,
    known: Mapping[str, _Dyadic],
    elements: Mapping[str, int],
    shapes: Mapping[str, tuple[int | None, ...]],
    integers: Mapping[str, list[int]],
) -> _Dyadic | None:
    """What ``node``'s outputs are known to hold (:func:`_exact_values`), or None."""
    op = node.op_type
    if op == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        return None if value is None else _dyadic(value)
    if op in ("Cast", "CastLike") and node.input and elements.get(node.input[0]) == onnx.TensorProto.BOOL:
        return _of_values([0.0, 1.0])
    if op in ("Cast", "CastLike") and node.input and elements.get(node.input[0]) in _INTEGER_BOUNDS:
        return _Dyadic(float(_INTEGER_BOUNDS[elements[node.input[0]]]))
    if op == "Sign":
        return _of_values([-1.0, 0.0, 1.0])
    inputs = [name for name in node.input if name]
    if op in _SAME_VALUES:
        positions = _SAME_VALUES[op]
        data = inputs if positions is None else [node.input[p] for p in positions if p < len(node.input)]
        parts = [known.get(name) for name in data if name]
        if op == "Pad":  # opset < 11 gives the constant as an attribute (default 0); later an input, absent: 0
            padded = next((a.f for a in node.attribute if a.name == "value"), 0.0)
            mode = next((a.s for a in node.attribute if a.name == "mode"), b"constant")
            if len(node.input) < 3 or not node.input[2]:
                parts.append(_of_values([padded]) if mode == b"constant" else None)
        if not parts or any(part is None for part in parts):
            return None
        return _moved(op, [part for part in parts if part is not None])
    if op in ("Add", "Sub", "Mul") and len(inputs) == 2:
        first, second = known.get(inputs[0]), known.get(inputs[1])
        return None if first is None or second is None else _combined(op, first, second)
    if op == "ReduceSum" and inputs:
        part, count = known.get(inputs[0]), _reduced_count(node, shapes.get(inputs[0]), integers)
        if part is None or count is None or part.step == _NOT_DYADIC:
            return None
        return _Dyadic(part.bound * count, part.step)
    return None


def _reduced_count(
    node: onnx.NodeProto, shape: tuple[int | None, ...] | None, integers: Mapping[str, list[int]]
) -> int | None:
    """How many elements a ReduceSum adds into each output element, where the input's reduced dims are static (its
    axes an attribute, or an input that is a constant: ``integers``)."""
    if shape is None:
        return None
    axes: list[int] | None = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
    if len(node.input) > 1 and node.input[1]:
        axes = integers.get(node.input[1])
        if axes is None:
            return None
    noop = next((a.i for a in node.attribute if a.name == "noop_with_empty_axes"), 0)
    if not axes:
        if noop:
            return 1
        axes = list(range(len(shape)))
    sizes = [shape[axis] for axis in axes if -len(shape) <= axis < len(shape)]
    if len(sizes) != len(axes) or any(size is None for size in sizes):
        return None
    return math.prod(size for size in sizes if size is not None)


def _integer_constants(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Main-graph integer initializers and ``Constant`` outputs of at most 64 elements, as lists (reduction axes)."""
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [
        (node.output[0], attribute.t)
        for node in model.graph.node
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output
        for attribute in node.attribute
        if attribute.name == "value" and attribute.HasField("t")
    ]
    found = {}
    for name, tensor in tensors:
        if tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and math.prod(tensor.dims) <= 64:
            found[name] = [int(v) for v in onnx.numpy_helper.to_array(tensor).reshape(-1)]
    return found


def _static_shapes(inferred: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Main-graph value name → its shape (None for a symbolic dim), from ``inferred``'s declarations (a model completed
    by ONNX shape inference, :func:`_inferred`)."""
    shapes: dict[str, tuple[int | None, ...]] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            dims = value.type.tensor_type.shape.dim
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return shapes


def _dyadic(tensor: onnx.TensorProto) -> _Dyadic | None:
    """What a float tensor of at most :data:`_DYADIC_ELEMENTS` holds, where every value is a multiple of 2^-e for some
    e ≤ 24 (an empty one: 0), else None."""
    if tensor.data_type not in _NAMES or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    try:
        values = np.asarray(onnx.numpy_helper.to_array(tensor), dtype=np.float64)
    except Exception:  # an unreadable tensor: nothing known
        return None
    if values.size > _DYADIC_ELEMENTS or not np.all(np.isfinite(values)):
        return None
    if not values.size:
        return _Dyadic(0.0)
    if values.size > _FEW_VALUES and not _multiples(values, 24):  # most weights: one pass
        return None
    return _of_values(values.reshape(-1))


#: Initializers larger than this are not read for :func:`_dyadic` (weights; masks and scales are small).
_DYADIC_ELEMENTS = 1 << 16


def _multiples(values: np.ndarray, step: int) -> bool:
    scaled = values * 2.0**step
    return bool(np.array_equal(scaled, np.round(scaled)))


class _Types(ChainMap[str, int]):
    """The element types visible in one graph: its own values' first, then its enclosing graphs'. ``scopes``: per
    graph of the model (by ``id`` of its ``GraphProto``), its own values' types, declared and inferred; a subgraph's
    value may share a name with another subgraph's (a value ``v`` in two ``If`` nodes' branches, of two types)."""

    def __init__(
        self, scopes: Mapping[int, Mapping[str, int]], held: Sequence[onnx.GraphProto], *maps: Mapping[str, int]
    ) -> None:
        super().__init__(*maps)  # type: ignore[arg-type]
        self.scopes = scopes
        #: The GraphProto wrappers ``scopes`` is keyed by: protobuf hands out the same wrapper for a submessage only
        #: while one is alive, so they are held for the ids to stay theirs.
        self.held = held

    def inside(self, graph: onnx.GraphProto) -> _Types:
        return _Types(self.scopes, self.held, self.scopes.get(id(graph), {}), *self.maps)


def _scoped_types(model: onnx.ModelProto, inferred: onnx.ModelProto) -> _Types:
    """:class:`_Types` of the main graph, with every subgraph's scope: declarations, completed by ``inferred`` (ONNX
    shape inference's copy, :func:`_inferred`; its graphs pair with the model's one for one, depth first)."""
    own = list(graphs(model.graph))
    twins = list(graphs(inferred.graph))
    if len(twins) != len(own):
        twins = own
    scopes: dict[int, dict[str, int]] = {}
    for graph, twin in zip(own, twins):
        local: dict[str, int] = {}
        for source in (twin, graph):
            _declared(source, local)
        scopes[id(graph)] = local
    return _Types(scopes, own, scopes[id(model.graph)])


def _computed_ancestors(
    output: str, producer: Mapping[str, onnx.NodeProto], elements: Mapping[str, int], exact: Collection[str]
) -> Iterable[int | None]:
    """The element types of the values ``output`` depends on that a node computes (itself included), ``Constant`` nodes
    and the main graph's exact values (``exact``) left out, through float values only (:func:`_float_walk`): a float16
    mask that only picks a Where's branch does not make a float32 output a float16 result (such an output was judged
    at float16 tolerances, and a file 800x its real error off passed)."""
    for name, node, element in _float_walk([output], producer, elements):
        if node is not None and not (producer.get(name) is node and name in exact):
            yield element


_Walked = tuple[str, onnx.NodeProto | None, "int | None"]


def _float_walk(
    starts: Iterable[str], producer: Mapping[str, onnx.NodeProto], elements: Mapping[str, int]
) -> Iterator[_Walked]:
    """Each value reached backwards from ``starts`` (once), with the node computing it (None: a graph input, an
    initializer or a value of an enclosing graph; ``Constant`` nodes count as None) and its element type: values of
    this graph, and the values computed inside the subgraphs (``If`` branches, ``Loop`` / ``Scan`` bodies) on the way,
    with their nodes and types there. The walk goes on through what a node's output is computed from
    (:func:`_reads`), and stops at a value of a known non-float type (a comparison's bool, an index, a Shape): it
    carries no rounding of what computed it."""
    seen: set[str] = set()
    inner_seen: set[tuple[str, int]] = set()
    pending = list(starts)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            node = None
        yield name, node, elements.get(name)
        if node is None or not _carries_rounding(elements.get(name)):
            continue
        reads, inside = _reads(node, list(node.output).index(name), elements)
        pending.extend(reads)
        for inner in inside:
            key = (inner[0], id(inner[1]))
            if key not in inner_seen:
                inner_seen.add(key)
                yield inner


def _subgraphs(node: onnx.NodeProto, attribute_name: str | None = None) -> list[onnx.GraphProto]:
    return [
        graph
        for attribute in node.attribute
        if attribute_name is None or attribute.name == attribute_name
        for graph in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs))
    ]


def _inside(elements: Mapping[str, int], graph: onnx.GraphProto) -> Mapping[str, int]:
    """The types visible inside ``graph``, a subgraph of the graph ``elements`` is for."""
    return elements.inside(graph) if isinstance(elements, _Types) else elements


def _reads(node: onnx.NodeProto, index: int, elements: Mapping[str, int]) -> tuple[list[str], list[_Walked]]:
    """The values of this graph (or enclosing ones) that node output ``index`` is computed from, and the values its
    subgraphs compute on the way (with their nodes and types): a plain node's inputs; an If's condition and what its
    branches carry into their output ``index``; a Loop's or a Scan's (opset 9 and later) initial values and scanned
    inputs of the states and inputs its body reaches from that output, and the enclosing values the body carries there
    (:func:`_body_reads`); every input and enclosing value a subgraph reads for another op with subgraphs."""
    standard = node.domain in ("", "ai.onnx")
    if not _subgraphs(node):
        return [name for name in node.input if name], []
    loop = standard and node.op_type == "Loop"
    if loop or (standard and node.op_type == "Scan"):
        bodies = _subgraphs(node, "body")
        if len(bodies) != 1:
            return [name for name in node.input if name], []
        body = bodies[0]
        if loop:  # body inputs: iteration, condition, N states; outputs: condition, N states, scans; node: M, cond, N
            states = len(body.input) - 2
            state_outputs = {2 + k: 1 + k for k in range(states)}
            start = 1 + index
            node_input = {position: position for position in range(2, 2 + states)}
        else:  # body inputs: N states, scanned elements; outputs: N states, scans; node: [sequence_lens,] N, inputs
            scanned = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
            states = len(body.input) - scanned
            state_outputs = {k: k for k in range(states)}
            start = index
            offset = len(node.input) - len(body.input)  # opset 8's sequence_lens first
            node_input = {position: offset + position for position in range(len(body.input))}
        reached, outside, computed = _body_reads(body, [start], state_outputs, _inside(elements, body))
        names = [
            node.input[node_input[p]] for p in sorted(reached) if p in node_input and node_input[p] < len(node.input)
        ]
        return [name for name in names if name] + outside, computed
    branch = standard and node.op_type == "If"  # output index of the node is the branch's own
    names = [name for name in node.input if name]
    inside: list[_Walked] = []
    for graph in _subgraphs(node):
        outputs = [index] if branch else list(range(len(graph.output)))
        _, outside, computed = _body_reads(graph, outputs, {}, _inside(elements, graph))
        names += outside
        inside += computed
    return names, inside


def _body_reads(
    graph: onnx.GraphProto, outputs: list[int], state_outputs: Mapping[int, int], elements: Mapping[str, int]
) -> tuple[set[int], list[str], list[_Walked]]:
    """Walked back from ``graph``'s outputs at positions ``outputs`` by the same rule (``elements``: the types visible
    in ``graph``): the positions of the graph inputs reached, the enclosing values reached, and the values computed in
    the graph (and its own subgraphs) on the way, with their nodes and types. A reached input that is a state
    (``state_outputs``: input position → the output position the next iteration reads it from) adds that output to
    the walk, until nothing new is reached; so a state counts for an output only where the output depends on it."""
    producer = {name: inner for inner in graph.node for name in inner.output if name}
    positions = {value.name: position for position, value in enumerate(graph.input)}
    defined = set(producer) | set(positions) | {t.name for t in graph.initializer}
    walked: set[int] = set()
    pending = [position for position in outputs if 0 <= position < len(graph.output)]
    reached: set[int] = set()
    outside: list[str] = []
    computed: dict[tuple[str, int], _Walked] = {}
    while pending:
        walked.update(pending)
        starts = [graph.output[position].name for position in pending]
        pending = []
        for name, inner, element in _float_walk(starts, producer, elements):
            if inner is not None:
                computed.setdefault((name, id(inner)), (name, inner, element))
            if name in positions and positions[name] not in reached:
                reached.add(positions[name])
                follow = state_outputs.get(positions[name])
                if follow is not None and follow not in walked and follow < len(graph.output):
                    pending.append(follow)
            elif inner is None and name not in defined and name not in outside:
                outside.append(name)
    return reached, outside, list(computed.values())


def _carries_rounding(element: int | None) -> bool:
    """Whether a value of this element type carries the rounding of what computed it: a float, or unknown."""
    return element is None or element in _NAMES or element == onnx.TensorProto.UNDEFINED


def _narrowest(names: Iterable[str | None]) -> str | None:
    known = [name for name in names if name is not None]
    return min(known, key=FLOAT_PRECISION.__getitem__) if known else None
