"""Read an ONNX file, describe its inputs and outputs, and check user inputs against them.

Every problem is reported before any runtime starts: a file that is missing, truncated
or corrupt (:class:`ModelFileError`), an op from a domain that neither ONNX nor the
model's local functions define (:class:`RuntimeLoadError`, naming the op and what to
load), and inputs with a wrong name, rank, shape or dtype or holding NaN/Inf
(:class:`BKNInputError`, naming the input and the expected shape).

Reading a file, describing a graph input and checking user inputs are
``bkn_export``'s (through :mod:`runtime._bkn`): one check, one wording for both packages.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from runtime._bkn import (
    OP_DOMAIN,
    OP_TYPE,
    TensorSpec,
    check_feeds,
    is_op_node,
    is_running_statistic_input,
    load_onnx_file,
    tensor_spec,
)
from runtime.errors import BKNInputError, ModelFileError, RuntimeLoadError

__all__ = [
    "EXAMPLE_SHAPES_METADATA",
    "OUTPUT_ORDER_METADATA",
    "TensorSpec",
    "check_custom_ops",
    "check_feeds",
    "custom_domains",
    "declared_mode",
    "default_shape",
    "detect_mode",
    "example_shapes",
    "given_symbols",
    "input_sets",
    "is_onnxruntime_domain",
    "load_onnx",
    "metadata_mode",
    "onnxruntime_ops",
    "quantization_ops",
    "random_inputs",
    "renamed_op_nodes",
    "renamed_op_note",
    "returned_output_order",
    "running_statistics_inputs",
    "symbol_conflicts_note",
    "tensor_specs",
    "unsized_dims_note",
]

#: The domains of the ONNX standard (the default domain and its alias, ML, and the training preview's gradient and
#: optimizer ops): a runtime that lacks one of their ops says so itself, where a custom domain needs a library.
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})


def is_onnxruntime_domain(domain: str) -> bool:
    """Whether ``domain`` is one of ONNX Runtime's own (``com.microsoft``, ``com.microsoft.nchwc``,
    ``com.ms.internal.nhwc``...): ops that ONNX Runtime implements itself and writes into the files it optimizes
    (``SessionOptions.optimized_model_filepath``), which no other runtime runs."""
    return domain == "com.microsoft" or domain.startswith(("com.microsoft.", "com.ms."))


def onnxruntime_ops(model: onnx.ModelProto) -> list[str]:
    """The ``domain::op`` of the graph's ONNX Runtime ops (:func:`is_onnxruntime_domain`), in graph order."""
    found = (f"{node.domain}::{node.op_type}" for node in model.graph.node if is_onnxruntime_domain(node.domain))
    return list(dict.fromkeys(found))


#: Operators that only a quantized graph holds (ONNX's and ONNX Runtime's: ``onnxruntime.quantization`` writes them).
QUANTIZATION_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv",
     "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul",
     "QLinearSigmoid", "QLinearLeakyRelu", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
     "QGemm"}
)  # fmt: skip


def quantization_ops(model: onnx.ModelProto) -> list[str]:
    """The graph's quantization operators (:data:`QUANTIZATION_OPS`), in graph order, each once."""
    return list(dict.fromkeys(node.op_type for node in model.graph.node if node.op_type in QUANTIZATION_OPS))


def load_onnx(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Load and check ``path``; raises :class:`ModelFileError` naming the file and the cause.

    The file is read by ``bkn_export``'s loader (missing, directory, empty, not a model,
    external data missing or truncated); then the graph must hold something and pass
    ``onnx.checker``.
    """
    file = Path(path)
    model = load_onnx_file(file, load_external_data=load_external_data)
    if not model.graph.node and not model.graph.output:
        raise ModelFileError(f"ONNX file {file} holds no graph (truncated or not an ONNX model); re-export it")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        remedy = "Re-export it."
        if "topologically sorted" in str(error):
            # What a tool that rewrote the file left (ONNX Runtime's float16 converter places its output Casts so):
            # ONNX Runtime loads it, the checker and other runtimes do not; sorting is the remedy, not an export.
            remedy = (
                "Its nodes are out of order, as a graph tool that rewrote the file can leave them (ONNX Runtime's "
                f"float16 converter does); sort them and pass the sorted file: {shlex.quote(sys.executable)} -c "
                '"import onnx_ir as ir, sys; m = ir.load(sys.argv[1]); m.graph.sort(); ir.save(m, sys.argv[2])" '
                "in.onnx sorted.onnx"
            )
        raise ModelFileError(f"ONNX file {file} fails onnx.checker: {first_line}. {remedy}") from error
    return model


def tensor_specs(model: onnx.ModelProto) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of the graph; initializers listed as inputs (old exporters) are left out."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [tensor_spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [tensor_spec(v) for v in model.graph.output]


#: The metadata entry in which ``bkn_export`` records the graph outputs' names in the order the PyTorch model
#: returns its tensors (``bkn_export.export.metadata.OUTPUT_ORDER_KEY``).
OUTPUT_ORDER_METADATA = "bkn_export.output_order"


def returned_output_order(model: onnx.ModelProto) -> tuple[list[str], str | None]:
    """The names to pair the PyTorch model's tensors with, in the order it returns them, and a note when that
    order is assumed rather than recorded, or when recorded outputs are gone from the file.

    A ``bkn_export`` file records the order at export (``bkn_export.output_order``), so outputs reordered or
    removed afterwards by a graph tool still pair with the right PyTorch output (tensor i with recorded name i;
    a name the file no longer has is left out of the comparison, with the note). A file that records none, or
    holds an output its export did not record (renamed, added), is paired by position in the graph, as
    ``torch.onnx.verification`` does; with more than one output the note says so.
    """
    names = [output.name for output in model.graph.output]
    text = next((prop.value for prop in model.metadata_props if prop.key == OUTPUT_ORDER_METADATA), None)
    recorded: object = None
    if text is not None:
        try:
            recorded = json.loads(text)
        except ValueError:
            recorded = None
    if (
        isinstance(recorded, list)
        and all(isinstance(name, str) for name in recorded)
        and len(set(recorded)) == len(recorded)
        and set(names) <= set(recorded)
    ):
        gone = [name for name in recorded if name not in names]
        note = None
        if gone:
            note = (
                f"outputs {', '.join(repr(name) for name in gone)} recorded at export are not in the file (removed "
                "after export): the PyTorch tensors they held are not compared; the others pair by their names"
            )
        return list(recorded), note
    if len(names) < 2:
        return names, None
    if text is None:
        exported_here = any(prop.key.startswith("bkn_export.") for prop in model.metadata_props)
        source = "exported by a bkn_export version that did not record it" if exported_here else "not a bkn_export file"
        why = f"the file records no output order ({OUTPUT_ORDER_METADATA}; {source})"
    else:
        why = f"its outputs are not those its export recorded in {OUTPUT_ORDER_METADATA} ({text})"
    return names, (
        f"PyTorch's outputs are paired with the file's by position ({', '.join(names)}): {why}; "
        "a file whose outputs were reordered after export would fail here"
    )


def custom_domains(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Non-standard domain -> op types used by the graph that no local function defines (ONNX Runtime's own
    domains left out: ONNX Runtime runs them, and :func:`onnxruntime_ops` names them for the other runtimes)."""
    local = {(f.domain, f.name) for f in model.functions}
    missing: dict[str, list[str]] = {}
    for node in model.graph.node:
        if (
            node.domain in STANDARD_DOMAINS
            or is_onnxruntime_domain(node.domain)
            or (node.domain, node.op_type) in local
        ):
            continue
        ops = missing.setdefault(node.domain, [])
        if node.op_type not in ops:
            ops.append(node.op_type)
    return missing


def check_custom_ops(model: onnx.ModelProto, path: str | os.PathLike[str], runtime: str, provided: bool) -> None:
    """Raise when the graph uses custom ops that nothing implements.

    ``provided`` is True when the runtime was given a custom-op library or plugin that may
    implement them (then the runtime itself will say whether it does).
    """
    missing = custom_domains(model)
    if not missing or provided:
        return
    ops = ", ".join(f"{domain}::{op}" for domain, op_types in missing.items() for op in op_types)
    if set(missing) != {OP_DOMAIN}:
        raise RuntimeLoadError(
            f"{runtime}: {path} uses {ops}, custom ops that no local function of the model defines, and no "
            "custom-op library/plugin was given: pass the library that implements them "
            "(custom_op_libraries=[...] / --custom-op-library)"
        )
    cut = (
        " The file's metadata says bkn_export's training export wrote it, and that export stores the body (after "
        "the graph and the metadata, as the file's last field): the file is likely cut short (an interrupted copy or "
        "download; compare its size with the original's) or rewritten by a tool that drops local functions."
        if metadata_mode(model) == "training"
        else ""
    )
    raise RuntimeLoadError(
        f"{runtime}: {path} uses {ops}, which has no ONNX function body in the model and no custom-op "
        f"library/plugin was given.{cut} Re-export with bkn_export.export.export_onnx(..., mode='training') "
        "(which stores the function body), or pass the library (custom_op_libraries=[...] / --custom-op-library). "
        "A file that another tool rewrote may have lost the body: onnx.version_converter.convert_version drops a "
        "model's local functions (re-export with the opset you need, restore the body with "
        "bkn_export.export.training.attach_function(model), or run onnx.inliner.inline_local_functions first)."
    )


#: The metadata entry in which ``bkn_export`` records the example inputs' shapes by graph input name
#: (``bkn_export.export.metadata.EXAMPLE_SHAPES_KEY``).
EXAMPLE_SHAPES_METADATA = "bkn_export.example_shapes"


def example_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The example shapes the file was exported at (``bkn_export.example_shapes``), by input name; empty for a file
    that records none (another exporter, an older version) or an entry that is not a JSON object of int lists."""
    text = next((prop.value for prop in model.metadata_props if prop.key == EXAMPLE_SHAPES_METADATA), None)
    try:
        recorded = json.loads(text) if text is not None else None
    except ValueError:
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {
        name: tuple(dims)
        for name, dims in recorded.items()
        if isinstance(dims, list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims)
        and math.prod(dims) <= MAX_RANDOM_ELEMENTS  # an edited entry: not a size to generate unasked
    }


def default_shape(
    spec: TensorSpec,
    batch: int = 2,
    example: Sequence[int] | None = None,
    symbols: Mapping[str, int] | None = None,
) -> tuple[int, ...]:
    """The shape random inputs take for ``spec`` where none is given: its fixed dims; a named symbolic dim the size
    ``symbols`` gives that name (another input's given shape: the file says the two dims are one); else a symbolic
    dim 0 ``batch``, another the export example's size where ``example`` (the shape recorded at export) has the
    input's rank and agrees on its fixed dims, else 1."""
    usable = example is not None and _fits(spec, example)
    known = symbols or {}

    def size(i: int, d: int | str) -> int:
        if isinstance(d, int):
            return d
        if d != "?" and d in known:
            return known[d]
        if i == 0:
            return batch
        return int(example[i]) if usable and example else 1

    return tuple(size(i, d) for i, d in enumerate(spec.shape))


def given_symbols(specs: Sequence[TensorSpec], shapes: Mapping[str, Sequence[int]] | None) -> dict[str, int]:
    """Named symbolic dims (``dim_param``) → the size a given shape puts there (the first input that names it)."""
    symbols: dict[str, int] = {}
    for spec in specs:
        given = (shapes or {}).get(spec.name)
        if given is not None and len(given) == len(spec.shape):
            _record_symbols(spec, given, symbols)
    return symbols


def _record_symbols(spec: TensorSpec, shape: Sequence[int], symbols: dict[str, int]) -> None:
    """Add the sizes ``shape`` puts in ``spec``'s named symbolic dims to ``symbols`` (a name known keeps its size)."""
    for d, value in zip(spec.shape, shape):
        if isinstance(d, str) and d != "?":
            symbols.setdefault(d, int(value))


def _fits(spec: TensorSpec, example: Sequence[int]) -> bool:
    """Whether a recorded example shape can size ``spec``: its rank, and its fixed dims where it has them."""
    rank = len(example) == len(spec.shape)
    return rank and all(not isinstance(d, int) or d == e for d, e in zip(spec.shape, example))


def unsized_dims_note(
    specs: Sequence[TensorSpec],
    feeds: Sequence[Mapping[str, np.ndarray]],
    recorded: Mapping[str, Sequence[int]] | None = None,
) -> str | None:
    """A note naming the inputs checked only at size 1 in a symbolic dim other than the batch (every input set), or
    None: the default where the file records no example shape, and a size at which most networks compute little.
    recorded: the file's example shapes (:func:`example_shapes`); those that fit none of its inputs (an input renamed
    or reshaped after export) are named too, as the reason they were not used."""
    shown = []
    for spec in specs:
        dims = [i for i, d in enumerate(spec.shape) if i > 0 and not isinstance(d, int)]
        arrays = [np.asarray(feed[spec.name]) for feed in feeds if spec.name in feed]
        if not dims or not arrays:
            continue
        ones = [i for i in dims if all(a.ndim == len(spec.shape) and a.shape[i] == 1 for a in arrays)]
        if ones:
            shown.append(f"{spec.name!r} (dim(s) {', '.join(map(str, ones))}; shape {tuple(arrays[0].shape)})")
    if not shown:
        return None
    by_name = {spec.name: spec for spec in specs}
    unfit = [name for name, dims in (recorded or {}).items() if name not in by_name or not _fits(by_name[name], dims)]
    unused = (
        f" (the file records example shapes for {', '.join(repr(name) for name in unfit)}, which no input of that "
        "name and rank takes: renamed or reshaped after export?)"
        if unfit
        else ""
    )
    return (
        f"input(s) {', '.join(shown)} were checked only at size 1 in symbolic dims{unused}: a network that pools or "
        "strides computes little there; check the size you deploy with --input-shape / --shape-set (inputs=...)"
    )


def symbol_conflicts_note(specs: Sequence[TensorSpec], feeds: Sequence[Mapping[str, np.ndarray]]) -> str | None:
    """A note naming the dim names (``dim_param``) that two inputs give different sizes in one input set, or None: the
    file says such dims are one, so a runtime may refuse the set or broadcast where the model would not."""
    conflicts = []
    for index, feed in enumerate(feeds):
        sizes: dict[str, dict[int, str]] = {}
        for spec in specs:
            array = feed.get(spec.name)
            if array is None or np.ndim(array) != len(spec.shape):
                continue
            for d, size in zip(spec.shape, np.shape(array)):
                if isinstance(d, str) and d != "?":
                    sizes.setdefault(d, {}).setdefault(int(size), spec.name)
        for name, seen in sizes.items():
            if len(seen) > 1:
                given = ", ".join(f"{size} in {holder!r}" for size, holder in seen.items())
                conflicts.append(f"{name!r} ({given}; input set {index})")
    if not conflicts:
        return None
    return (
        f"the file names these dims as one, but the inputs give them different sizes: {'; '.join(conflicts[:4])}"
        f"{' ...' if len(conflicts) > 4 else ''}: a runtime may refuse them or broadcast where the model would not"
    )


def random_inputs(
    specs: Sequence[TensorSpec],
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    batch: int = 2,
    val_range: Mapping[str | None, tuple[float, float]] | None = None,
    examples: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs in each input's ONNX dtype, of the shapes ``shapes`` gives, else :func:`default_shape` (named
    dims: a size ``shapes`` gives the same dim name in another input, or an earlier input's default took for it,
    else ``batch`` for dim 0, the export example's size from ``examples`` (:func:`example_shapes`) or 1 for
    others).

    Floating inputs are standard normal, or uniform in [lo, hi) where ``val_range`` gives a
    range for the input's name (or for None: every input); integer inputs are uniform in
    [0, 4) or [lo, hi).
    """
    import ml_dtypes

    rng = np.random.default_rng(seed)
    ranges = dict(val_range or {})
    arrays: dict[str, np.ndarray] = {}
    symbols = given_symbols(specs, shapes)
    for spec in specs:
        if shapes and spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
        else:
            shape = default_shape(spec, batch, (examples or {}).get(spec.name), symbols)
            _record_symbols(spec, shape, symbols)  # later inputs follow: one size per dim name in a set
        limits = ranges.get(spec.name, ranges.get(None))
        _check_size(spec, shape)
        if spec.dtype in ("float32", "float64", "float16", "bfloat16"):
            values = rng.standard_normal(shape) if limits is None else rng.uniform(limits[0], limits[1], shape)
            dtype = ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else spec.dtype
            largest = float(ml_dtypes.finfo(dtype).max)
            if limits is not None and max(abs(limits[0]), abs(limits[1])) > largest:
                raise BKNInputError(
                    f"input {spec.name!r}: the value range [{limits[0]:g}, {limits[1]:g}) exceeds {spec.dtype}'s "
                    f"largest finite value {largest:.4g}; give a range within it"
                )
            arrays[spec.name] = values.astype(dtype)
        elif spec.dtype.startswith(("int", "uint")):
            low, high = (0, 4) if limits is None else (int(limits[0]), int(limits[1]))
            arrays[spec.name] = rng.integers(low, max(high, low + 1), size=shape).astype(spec.dtype)
        elif spec.dtype == "bool":
            arrays[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BKNInputError(f"input {spec.name!r}: cannot make random inputs of dtype {spec.dtype}; give them")
    return arrays


#: Largest random input made (elements); more is almost always a typo in a shape.
MAX_RANDOM_ELEMENTS = 1 << 28


def _check_size(spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if any(d < 0 for d in shape):
        raise BKNInputError(f"input {spec.name!r}: shape {shape} has a negative dim")
    elements = int(np.prod(shape, dtype=np.float64))
    if elements > MAX_RANDOM_ELEMENTS:
        raise BKNInputError(
            f"input {spec.name!r}: shape {shape} has {elements:.3g} elements, more than {MAX_RANDOM_ELEMENTS:.3g} "
            "(check --input-shape)"
        )


def input_sets(
    specs: Sequence[TensorSpec],
    shape_sets: Sequence[Mapping[str, Sequence[int]]] = (),
    iterations: int = 1,
    seed: int = 0,
    val_range: Mapping[str | None, tuple[float, float]] | None = None,
    examples: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``iterations`` seeded input sets per shape set (one shape set of the defaults when none given; an input a
    shape set does not name takes :func:`default_shape`, with the export example's sizes from ``examples``).

    Set k (counting over shape sets, then iterations) uses seed ``seed + k``, so a run is
    reproducible from the seed in the report.
    """
    if iterations < 1:
        raise BKNInputError(f"iterations must be >= 1, got {iterations}")
    shape_list: list[Mapping[str, Sequence[int]] | None] = list(shape_sets) or [None]
    feeds: list[dict[str, np.ndarray]] = []
    for shapes in shape_list:
        for _ in range(iterations):
            feeds.append(random_inputs(specs, shapes, seed=seed + len(feeds), val_range=val_range, examples=examples))
    return feeds


def running_statistics_inputs(model: onnx.ModelProto) -> set[str]:
    """Graph inputs that are running statistics of a ``running_stats_io`` training export: ``<layer>.running_mean`` /
    ``<layer>.running_var`` inputs whose update ``<name>_out`` is a graph output (any layer name, commas too);
    empty for other files."""
    outputs = {o.name for o in model.graph.output}
    return {i.name for i in model.graph.input if is_running_statistic_input(i.name, outputs)}


def renamed_op_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's BatchKalmanNorm nodes under another name: in the ``ai.bkn`` domain with another op type, or with
    ``BatchKalmanNorm`` inside another op type (``p_BatchKalmanNorm``, as some tools prefix what they rewrite).
    :func:`is_op_node` does not recognise them; they still make the file a training-mode export."""
    return [
        node
        for node in model.graph.node
        if not is_op_node(node) and (node.domain == OP_DOMAIN or OP_TYPE in node.op_type)
    ]


def renamed_op_note(model: onnx.ModelProto) -> str | None:
    """What the report says about :func:`renamed_op_nodes` (None where there are none)."""
    renamed = renamed_op_nodes(model)
    if not renamed:
        return None
    shown = ", ".join(f"{node.name or '<unnamed>'!r} ({node.domain}::{node.op_type})" for node in renamed[:4])
    more = f" and {len(renamed) - 4} more" if len(renamed) > 4 else ""
    return (
        f"node(s) {shown}{more} are BatchKalmanNorm nodes renamed from {OP_DOMAIN}::{OP_TYPE} (by a tool that "
        "rewrote the file): counted as BKN op nodes, so the file is a training-mode export; the TensorRT plugin and "
        "the mapping of nodes to layers know the op only by its own name (re-export, or rename them back)"
    )


def metadata_mode(model: onnx.ModelProto) -> str | None:
    """The mode a ``bkn_export`` export recorded in the file's metadata (``bkn_export.mode``, earlier ``bkn.mode``),
    or None."""
    for prop in model.metadata_props:
        if prop.key in ("bkn.mode", "bkn_export.mode") and prop.value in ("inference", "training"):
            return prop.value
    return None


def declared_mode(model: onnx.ModelProto) -> str | None:
    """The mode the file says it was exported in: its ``bkn_export.mode`` metadata, else "training" where the graph
    holds ``ai.bkn`` nodes (also renamed ones: :func:`renamed_op_nodes`); None for a file that says nothing
    (exported by other tools)."""
    said = metadata_mode(model)
    if said is not None:
        return said
    if any(is_op_node(node) for node in model.graph.node) or renamed_op_nodes(model):
        return "training"
    return None


def detect_mode(model: onnx.ModelProto) -> str:
    """ "training" when the graph holds ``ai.bkn`` nodes or says so in its metadata, else "inference"."""
    return declared_mode(model) or "inference"
