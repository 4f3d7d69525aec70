"""The precision an output of an ONNX graph was computed in: the narrowest float type on its path.

A graph output's declared type does not say how precisely its value was computed: a float32 network whose
head casts to float64 (``x.double()``, a ``Cast(to=DOUBLE)`` before a loss or a softmax) returns float64 values
that carry float32 rounding, and two runtimes (or PyTorch and a runtime) differ on them by float32's ulps, a
million times float64's default tolerance. Judging such an output at float64 tolerances would fail a file that
agrees. :func:`computed_precision` finds, per float output, the narrowest float type among the values computed
on its path (node outputs that the output depends on, through the main graph), so that the output is judged at
that type's tolerances, and the report says so (:class:`runtime.compare.TolerancePolicy`, ``computed_in``).

Only computed values count: a graph input or an initializer of a narrower type, or a ``Constant``, is the same bits
in every runtime and adds no rounding difference by being cast up; so is a computed value that holds exact integers
its type represents (a float16 0/1 mask cast from a bool, ``1 - mask``: :func:`_exact_values`). Types come from the
graph's own declarations (inputs, outputs, initializers, ``value_info``) completed by ONNX shape inference where it
runs; a value of unknown type counts as nothing. Nodes inside subgraphs (``If`` / ``Loop`` bodies) and function
bodies are not counted: their outputs in the main graph are, and the main-graph values a subgraph carries into the
node output being judged are on its path (walked through the subgraph by the same rule). The walk stops at a value
of a non-float type (a comparison's bool, an index, a shape, a float cast to an integer): a rounding difference
upstream of it shows as a discrete jump (a flipped mask, an index or an integer one off), which no float tolerance
absorbs, so it does not make the output a narrower type's result.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

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
    types, elements = _float_types(model)
    producer = {name: node for node in model.graph.node for name in node.output if name}
    exact = _exact_values(model, elements)
    narrower = {}
    for output in model.graph.output:
        own = types.get(output.name)
        if own is None:
            continue
        ancestors = _computed_ancestors(output.name, producer, elements)
        narrowest = _narrowest(types.get(name) for name in ancestors if name not in exact)
        if narrowest is not None and FLOAT_PRECISION[narrowest] < FLOAT_PRECISION[own]:
            narrower[output.name] = narrowest
    return narrower


def _float_types(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, int]]:
    """Value name → float type name, and value name → ONNX element type (any): :func:`value_types`."""
    elements = value_types(model)
    types = {value: _NAMES[element] for value, element in elements.items() if element in _NAMES}
    return types, elements


def value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Value name → ONNX element type, from the graph's declarations (subgraphs' too) and, where it runs, ONNX shape
    inference; the main graph's first where a name repeats."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a graph that inference cannot type (custom ops...): its declarations alone
        inferred = model
    elements: dict[str, int] = {}
    for graph in (*graphs(inferred.graph), *graphs(model.graph)):
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type"):
                elements.setdefault(value.name, value.type.tensor_type.elem_type)
        for initializer in graph.initializer:
            elements.setdefault(initializer.name, initializer.data_type)
    return elements


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
#: Integers a float type holds exactly: up to 2 ** (its significand bits).
_EXACT_LIMIT: dict[str, int] = {name: 2 ** FLOAT_PRECISION[name] for name in FLOAT_PRECISION}
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


def _exact_values(model: onnx.ModelProto, elements: Mapping[str, int]) -> set[str]:
    """Main-graph values computed in a float type that hold exact integers small enough for it (at most 2^11 in
    float16, 2^8 in bfloat16), so that every runtime computes the same bits and they add no rounding: a 0/1 mask cast
    from a comparison's bool (``mask.half()``), ``1 - mask``, ``mask * 255``, a sign, their reshapes and selections.

    A forward pass over the nodes (ONNX lists them in topological order) carrying, per value, a bound B on |v| where v
    is known to be an integer: a cast from bool / (u)int8 / (u)int16 (B its type's), an integer-valued float
    Constant or initializer (B its largest |v|); ops that move or pick values keep the largest bound of their data
    inputs (:data:`_SAME_VALUES`); Add / Sub add the bounds, Mul multiplies them, Sign gives 1. A value counts as
    exact where its own float type holds every integer up to B (before, a float32 output multiplied by ``1 - mask``
    computed in float16 was judged at float16 tolerances, and a real fault up to those passed)."""
    bounds: dict[str, float] = {}
    for tensor in model.graph.initializer:
        bound = _integer_bound(tensor)
        if bound is not None:
            bounds[tensor.name] = bound
    types = {name: _NAMES[element] for name, element in elements.items() if element in _NAMES}
    exact: set[str] = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not node.output:
            continue
        bound = _node_bound(node, bounds, elements)
        if bound is None:
            continue
        for name in node.output:
            if not name:
                continue
            bounds[name] = bound
            own = types.get(name)
            if own is not None and bound <= _EXACT_LIMIT[own]:
                exact.add(name)
    return exact


def _node_bound(node: onnx.NodeProto, bounds: Mapping[str, float], elements: Mapping[str, int]) -> float | None:
    """The integer bound of ``node``'s outputs (:func:`_exact_values`), or None where they are not known integers."""
    op = node.op_type
    if op == "Constant":
        value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
        return None if value is None else _integer_bound(value)
    if op in ("Cast", "CastLike") and node.input and elements.get(node.input[0]) in _INTEGER_BOUNDS:
        return float(_INTEGER_BOUNDS[elements[node.input[0]]])
    if op == "Sign":
        return 1.0
    inputs = [name for name in node.input if name]
    if op in _SAME_VALUES:
        positions = _SAME_VALUES[op]
        data = inputs if positions is None else [node.input[p] for p in positions if p < len(node.input)]
        known = [bounds.get(name) for name in data if name]
        return None if not known or None in known else max(known)  # type: ignore[type-var]
    if op in ("Add", "Sub", "Mul") and len(inputs) == 2:
        first, second = bounds.get(inputs[0]), bounds.get(inputs[1])
        if first is None or second is None:
            return None
        return first * second if op == "Mul" else first + second
    return None


def _integer_bound(tensor: onnx.TensorProto) -> float | None:
    """max |v| of a float tensor whose every value is an integer (an empty one: 0), else None."""
    if tensor.data_type not in _NAMES or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    try:
        values = np.asarray(onnx.numpy_helper.to_array(tensor), dtype=np.float64)
    except Exception:  # an unreadable tensor: nothing known
        return None
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
        return None
    return float(np.max(np.abs(values))) if values.size else 0.0


def _computed_ancestors(
    output: str, producer: Mapping[str, onnx.NodeProto], elements: Mapping[str, int]
) -> Iterable[str]:
    """The values ``output`` depends on that a node computes (itself included), ``Constant`` nodes left out, through
    float values only (:func:`_float_walk`): a float16 mask that only picks a Where's branch does not make a float32
    output a float16 result (such an output was judged at float16 tolerances, and a file 800x its real error off
    passed)."""
    return (name for name, node in _float_walk([output], producer, elements) if node is not None)


def _float_walk(
    starts: Iterable[str], producer: Mapping[str, onnx.NodeProto], elements: Mapping[str, int]
) -> Iterator[tuple[str, onnx.NodeProto | None]]:
    """Each value reached backwards from ``starts`` (once), with the node of this graph computing it (None: a graph
    input, an initializer or a value of an enclosing graph; ``Constant`` nodes count as None). The walk goes on
    through what a node's output is computed from (:func:`_reads`), and stops at a value of a known non-float type
    (a comparison's bool, an index, a Shape): it carries no rounding of what computed it."""
    seen: set[str] = set()
    pending = list(starts)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producer.get(name)
        if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            node = None
        yield name, node
        if node is None or not _carries_rounding(elements.get(name)):
            continue
        pending.extend(_reads(node, list(node.output).index(name), elements))


def _subgraphs(node: onnx.NodeProto, attribute_name: str | None = None) -> list[onnx.GraphProto]:
    return [
        graph
        for attribute in node.attribute
        if attribute_name is None or attribute.name == attribute_name
        for graph in ([attribute.g] if attribute.HasField("g") else list(attribute.graphs))
    ]


def _reads(node: onnx.NodeProto, index: int, elements: Mapping[str, int]) -> list[str]:
    """The values of this graph (or enclosing ones) that node output ``index`` is computed from: a plain node's
    inputs; an If's condition and what its branches carry into their output ``index``; a Loop's or a Scan's (opset 9
    and later) initial values and scanned inputs of the states and inputs its body reaches from that output, and the
    enclosing values the body carries there (:func:`_body_reads`); every input and enclosing value a subgraph reads
    for another op with subgraphs."""
    standard = node.domain in ("", "ai.onnx")
    if not _subgraphs(node):
        return [name for name in node.input if name]
    loop = standard and node.op_type == "Loop"
    if loop or (standard and node.op_type == "Scan"):
        bodies = _subgraphs(node, "body")
        if len(bodies) != 1:
            return [name for name in node.input if name]
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
        reached, outside = _body_reads(body, [start], state_outputs, elements)
        names = [
            node.input[node_input[p]] for p in sorted(reached) if p in node_input and node_input[p] < len(node.input)
        ]
        return [name for name in names if name] + outside
    branch = standard and node.op_type == "If"  # output index of the node is the branch's own
    names = [name for name in node.input if name]
    for graph in _subgraphs(node):
        outputs = [index] if branch else list(range(len(graph.output)))
        names += _body_reads(graph, outputs, {}, elements)[1]
    return names


def _body_reads(
    graph: onnx.GraphProto, outputs: list[int], state_outputs: Mapping[int, int], elements: Mapping[str, int]
) -> tuple[set[int], list[str]]:
    """Walked back from ``graph``'s outputs at positions ``outputs`` by the same rule: the positions of the graph
    inputs reached and the enclosing values reached. A reached input that is a state (``state_outputs``: input
    position → the output position the next iteration reads it from) adds that output to the walk, until nothing new
    is reached; so a state counts for an output only where the output depends on it."""
    producer = {name: inner for inner in graph.node for name in inner.output if name}
    positions = {value.name: position for position, value in enumerate(graph.input)}
    defined = set(producer) | set(positions) | {t.name for t in graph.initializer}
    walked: set[int] = set()
    pending = [position for position in outputs if 0 <= position < len(graph.output)]
    reached: set[int] = set()
    outside: list[str] = []
    while pending:
        walked.update(pending)
        starts = [graph.output[position].name for position in pending]
        pending = []
        for name, _ in _float_walk(starts, producer, elements):
            if name in positions and positions[name] not in reached:
                reached.add(positions[name])
                follow = state_outputs.get(positions[name])
                if follow is not None and follow not in walked and follow < len(graph.output):
                    pending.append(follow)
            elif name not in defined and name not in outside:
                outside.append(name)
    return reached, outside


def _carries_rounding(element: int | None) -> bool:
    """Whether a value of this element type carries the rounding of what computed it: a float, or unknown."""
    return element is None or element in _NAMES or element == onnx.TensorProto.UNDEFINED


def _narrowest(names: Iterable[str | None]) -> str | None:
    known = [name for name in names if name is not None]
    return min(known, key=FLOAT_PRECISION.__getitem__) if known else None
