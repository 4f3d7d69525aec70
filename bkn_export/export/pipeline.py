"""The export pipeline both modes run, step by step::

    request       validate_request: opset (an integer in range), example inputs, the
                  external-data threshold, input/output names; check_writable(path) — all
                  before anything slow
    checks        check_finite_parameters: no NaN/Inf in any parameter (names it)
    prepare       the mode builds a Traceable: the module to trace (the model, its folded
                  fp16 copy, or the training graph), its example inputs, extra static inputs
                  (running statistics) and the names of extra outputs
    trace         trace: one eager run (output count, strides), then
                  torch.onnx.export(dynamo=True) with dynamic_shapes() — the one builder
                  of dynamic shapes — and the graph input/output names of io_names()
    post-process  the mode's own (inference: fold rules + guarantee + fold report;
                  training: the op's function body, node names)
    check         onnx.checker (check_model), with dynamic_batch verify_dynamic_batch, with dynamic_spatial
                  verify_dynamic_spatial:
                  the file is run at two other spatial sizes
    write         save_onnx (export/io.py): atomic, model and external data as a pair

I/O names, the same in both modes: graph inputs are named after ``forward()``'s positional
arguments (``input_<i>`` for arguments collected by ``*args``), outputs ``output`` (one) or
``output_0``, ``output_1``, ... (the model's outputs flattened in order); an output reached
through dict keys or named-tuple fields is named after them, joined by ``.`` (a model returning
``{"logits": y, "aux": {"mask": m}}`` gives ``logits``, ``aux.mask``; a plain tensor beside them
keeps ``output_<i>``), unless such names repeat or clash, when all fall back to
``output_<i>``; ``input_names`` / ``output_names`` replace them. The training mode's extra inputs/outputs (running
statistics, posteriors) follow under their own documented names.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from bkn_export.atomic import check_writable
from bkn_export.errors import BKNError, ExportError, NonFiniteWeightsError, OptionError
from bkn_export.export.common import check_model, example_tuple, resolve_opset, run_dynamo_export
from bkn_export.export.io import check_external_data_threshold
from bkn_export.module_modes import copied

__all__ = [
    "ExportRequest",
    "Traceable",
    "Traced",
    "check_exported",
    "check_finite_parameters",
    "dynamic_shapes",
    "forward_argument_names",
    "io_names",
    "trace",
    "tracing_inputs",
    "validate_request",
    "verify_dynamic_batch",
    "verify_dynamic_spatial",
]


@dataclass(frozen=True)
class ExportRequest:
    """What the caller asked for, validated. inputs: the example tensors (N, C, *), as given."""

    opset: int
    inputs: tuple[Tensor, ...]
    dynamic_batch: bool
    dynamic_spatial: bool
    fp16: bool
    external_data_threshold: int
    input_names: tuple[str, ...] | None
    output_names: tuple[str, ...] | None


def _names(names: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise OptionError(f"{what} must be a list of non-empty strings, got {names!r}")
    if len(set(names)) != len(names):
        raise OptionError(f"{what} has repeated names: {list(names)}")
    return tuple(names)


def validate_request(
    example_inputs: Any,
    path: Any,
    *,
    opset: int | None,
    dynamic_batch: bool,
    dynamic_spatial: bool,
    fp16: bool,
    external_data_threshold: int,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
) -> ExportRequest:
    """Check every option and the path before any work; raise OptionError / OutputWriteError / ExportError."""
    request = ExportRequest(
        opset=resolve_opset(opset),
        inputs=copied(example_tuple(example_inputs)),  # a forward may change its input in place: not the caller's
        dynamic_batch=bool(dynamic_batch),
        dynamic_spatial=bool(dynamic_spatial),
        fp16=bool(fp16),
        external_data_threshold=check_external_data_threshold(external_data_threshold),
        input_names=_names(input_names, "input_names"),
        output_names=_names(output_names, "output_names"),
    )
    empty = [index for index, t in enumerate(request.inputs, 1) if t.dim() > 0 and t.shape[0] == 0]
    if empty:
        raise OptionError(
            f"example input {empty[0]} has shape {tuple(request.inputs[empty[0] - 1].shape)}: an empty batch (axis "
            "0 of size 0) traces no computation a file could be checked on; give an example of batch 1 or more"
        )
    if request.input_names is not None and len(request.input_names) != len(request.inputs):
        raise OptionError(
            f"input_names has {len(request.input_names)} names {list(request.input_names)} for "
            f"{len(request.inputs)} example input(s)"
        )
    check_writable(path)
    return request


def check_finite_parameters(model: nn.Module) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first parameter with NaN/Inf values.

    A Conv/Linear weight with a NaN exports without complaint and computes NaN everywhere
    downstream; normalization statistics are checked separately (with channels).
    """
    owners = {id(p): (name, type(m).__name__) for name, m in model.named_modules() for p in m.parameters(False)}
    for name, parameter in model.named_parameters():
        values = parameter.detach()
        if not values.is_floating_point():
            continue
        bad = ~torch.isfinite(values)
        count = int(bad.sum())
        if count:
            index = tuple(int(i) for i in torch.nonzero(bad)[0])
            module, kind = owners.get(id(parameter), (name.rpartition(".")[0], "module"))
            raise NonFiniteWeightsError(
                f"parameter '{name}' of {kind} '{module}' has {count} NaN/Inf value(s) (first at index {index}); "
                "the exported model would compute NaN/Inf. Retrain or reload the weights (a diverged training "
                "run, a bad checkpoint) before exporting."
            )


def positional_examples(model: nn.Module, example_inputs: Any) -> Any:
    """``example_inputs`` as :func:`convert_batchnorm` takes them, in the form the exporters take: a dict of keyword
    inputs (``{"pixel_values": x}``, a Hugging Face model's) becomes the tuple of its tensors in ``forward()``'s
    argument order; anything else is returned as it is. The keys must be the first k positional arguments of
    ``forward()`` and the values tensors (the graph inputs are named after them), else :class:`ExportError`."""
    if not isinstance(example_inputs, Mapping):
        return example_inputs
    if not example_inputs:
        raise ExportError("example_inputs is an empty dict: give the model's inputs, keyed by forward()'s arguments")
    keys = list(example_inputs)
    problem = leading_arguments_problem(model, keys)
    if problem is not None:
        raise ExportError(
            f"example_inputs is a dict with keys {keys}: {problem}. Each becomes a graph input in forward()'s order; "
            "pass the tensors as a tuple in that order, with any other argument fixed in a wrapper module"
        )
    arguments = forward_argument_names(model)
    values = [example_inputs[name] for name in arguments[: len(keys)]]
    not_tensors = [name for name, value in zip(arguments, values) if not isinstance(value, Tensor)]
    if not_tensors:
        raise ExportError(
            f"example_inputs[{not_tensors[0]!r}] is not a tensor: an export's inputs are tensors; fix other "
            "arguments in a wrapper module"
        )
    return tuple(values)


def leading_arguments_problem(model: nn.Module, names: Sequence[str]) -> str | None:
    """Why ``names`` (inputs given by name) are not the first ``len(names)`` positional arguments of
    ``model.forward()`` in some order: a name that is no argument, one given twice, or an earlier argument left out.
    None when they are (then ``forward_argument_names(model)[:len(names)]`` is their order)."""
    arguments = forward_argument_names(model)
    unknown = [name for name in names if name not in arguments]
    if unknown:
        return f"{unknown} are not arguments of {type(model).__name__}.forward(), which takes {arguments}"
    if len(set(names)) != len(names):
        return f"an input is given twice: {list(names)}"
    last = max((arguments.index(name) for name in names), default=-1)
    if last + 1 != len(names):
        return f"give the first {last + 1} forward() arguments {arguments[: last + 1]}, got {list(names)}"
    return None


def forward_argument_names(model: nn.Module) -> list[str]:
    """The positional argument names of ``model.forward`` (before any ``*args``), in order."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a builtin or C forward
        return []
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return names


def io_names(
    model: nn.Module,
    num_inputs: int,
    num_outputs: int,
    request: ExportRequest,
    output_keys: Sequence[str | None] = (),
    reserved: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """(input names, output names) of the model's own inputs/outputs under the rule of the module docstring.

    output_keys: per output, the dict keys / named-tuple fields on its path (:func:`output_keys`),
    or None; reserved: names the defaults must not take (the mode's extra inputs and outputs).
    """
    arguments = forward_argument_names(model)
    if request.input_names is not None:
        inputs = list(request.input_names)
        _check_argument_positions(inputs, arguments, model)
    else:
        inputs = [arguments[i] if i < len(arguments) else f"input_{i}" for i in range(num_inputs)]
    if request.output_names is not None:
        if len(request.output_names) != num_outputs:
            raise OptionError(
                f"output_names has {len(request.output_names)} names {list(request.output_names)} but "
                f"{type(model).__name__} returns {num_outputs} output(s)"
            )
        outputs = list(request.output_names)
        return inputs, outputs
    outputs = ["output"] if num_outputs == 1 else [f"output_{i}" for i in range(num_outputs)]
    if len(output_keys) == num_outputs and any(key is not None for key in output_keys):
        keyed = [key if key is not None else default for key, default in zip(output_keys, outputs)]
        taken = {*inputs, *reserved}
        if len(set(keyed)) == len(keyed) and not taken & set(keyed) and all(keyed):
            outputs = keyed
    return inputs, outputs


def output_keys(value: Any) -> list[str | None]:
    """Per tensor of a (nested) output, in :func:`_leaves` order: the dict keys and named-tuple
    fields on its path joined by ``.``, or None where the path has none (positions only)."""

    def walk(item: Any, keys: tuple[str, ...]) -> list[str | None]:
        if item is None:  # the exporter drops a None: it names no graph output
            return []
        if isinstance(item, dict):
            return [name for key in item for name in walk(item[key], (*keys, str(key)))]
        if isinstance(item, (tuple, list)):
            fields = getattr(item, "_fields", None)
            return [
                name
                for i, element in enumerate(item)
                for name in walk(element, (*keys, str(fields[i])) if fields else keys)
            ]
        return [".".join(keys) if keys else None]

    return walk(value, ())


@dataclass
class Traceable:
    """What a mode hands to :func:`trace`.

    module: what torch.onnx.export traces, called as module(*inputs, *extra_inputs);
    model: the user's model (its forward() names the inputs); inputs: the model's example
    inputs (N, C, *) in the export dtype; extra_inputs: static-shape inputs after them
    (running statistics (C,)), named extra_input_names; extra_output_names: the names of
    the outputs that follow the model's own; options: more torch.onnx.export keywords;
    graph_optimizer: how much of onnxscript's optimizer runs (:data:`~bkn_export.export.common.GRAPH_OPTIMIZERS`);
    lighter_optimizer_hint: how the caller asks for a lighter one, for the warning before a full optimization of a
    large graph (None: no warning; :func:`~bkn_export.export.common.run_dynamo_export`).
    """

    module: nn.Module
    model: nn.Module
    inputs: tuple[Tensor, ...]
    extra_inputs: tuple[Tensor, ...] = ()
    extra_input_names: tuple[str, ...] = ()
    extra_output_names: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    graph_optimizer: str = "full"
    lighter_optimizer_hint: str | None = None


@dataclass
class Traced:
    """The exporter's program, the graph I/O names, and what the eager run measured.

    strides: per spatial dim of input 0, the network's total stride estimated from the
    Conv/pooling outputs of the eager run (1 where none was seen); empty unless dynamic_spatial.
    """

    program: torch.onnx.ONNXProgram
    input_names: list[str]
    output_names: list[str]
    strides: tuple[int, ...] = ()


def _leaves(value: Any) -> list[Any]:
    """The leaves of a (nested) tuple/list/dict output that become graph outputs (tensors, and the Python numbers
    the exporter writes as scalar outputs: a symbolic size), in the exporter's flattening order; a None is
    dropped, as the exporter drops it."""
    if value is None:
        return []
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for key in value for leaf in _leaves(value[key])]
    return [value]


_STRIDED = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)


def _eager_run(
    traceable: Traceable, explain: Callable[[Exception], str], spatial: tuple[int, ...]
) -> tuple[list[str | None], tuple[int, ...], list[int]]:
    """Run the module once: (the model's own outputs' :func:`output_keys`, total stride per spatial
    dim of input 0, the positions of the outputs that are Python numbers rather than tensors)."""
    smallest = list(spatial)
    handles = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            return
        if isinstance(output, Tensor) and output.dim() == len(spatial) + 2:
            for d, size in enumerate(output.shape[2:]):
                smallest[d] = min(smallest[d], int(size))

    if spatial:
        handles = [m.register_forward_hook(record) for m in traceable.module.modules() if isinstance(m, _STRIDED)]
    try:
        with torch.no_grad():
            outputs = traceable.module(*copied(traceable.inputs), *traceable.extra_inputs)
    except BKNError:
        raise
    except Exception as error:  # the model's own error reads better than the exporter's
        raise ExportError(explain(error)) from error
    finally:
        for handle in handles:
            handle.remove()
    strides = tuple(max(1, round(size / max(low, 1))) for size, low in zip(spatial, smallest))
    keys = output_keys(outputs)
    numbers = [i for i, leaf in enumerate(_leaves(outputs)) if not isinstance(leaf, Tensor)]
    return keys[: len(keys) - len(traceable.extra_output_names)], strides, numbers


def tracing_inputs(inputs: Sequence[Tensor], dims: Sequence[Sequence[int]]) -> tuple[Tensor, ...]:
    """Repeat every size-1 dim that is to be dynamic (torch.export specialises size 1 to a constant)."""
    widened = []
    for tensor, dynamic in zip(inputs, dims):
        for d in dynamic:
            if tensor.shape[d] == 1:
                tensor = torch.cat([tensor, tensor], dim=d)
        widened.append(tensor)
    return tuple(widened)


def _dynamic_dims(inputs: Sequence[Tensor], request: ExportRequest) -> list[list[int]]:
    dims = []
    for tensor in inputs:
        dynamic = [0] if request.dynamic_batch and tensor.dim() > 0 else []
        if request.dynamic_spatial:
            dynamic += list(range(2, tensor.dim()))
        dims.append(dynamic)
    return dims


def dynamic_shapes(module: nn.Module, dims: Sequence[Sequence[int]], num_extra: int) -> Any:
    """torch.export ``dynamic_shapes`` for module(*inputs, *extra): the one builder of both modes.

    dims[i]: the dynamic dims of input i. Dim 0 is the symbol "batch" shared by every input
    (all inputs are batched along dim 0); other dims are ``Dim.DYNAMIC`` (torch.export
    infers their relations, e.g. two inputs added together). Extra inputs are static.
    Nested in a 1-tuple when forward takes ``*args``. None when nothing is dynamic.
    """
    if not any(dims):
        return None
    batch = torch.export.Dim("batch", min=1)
    shapes: tuple[Any, ...] = (
        tuple({d: batch if d == 0 else torch.export.Dim.DYNAMIC for d in dynamic} or None for dynamic in dims)
        + (None,) * num_extra
    )
    parameters = list(inspect.signature(module.forward).parameters.values())
    if parameters and parameters[0].kind == inspect.Parameter.VAR_POSITIONAL:
        return (shapes,)
    return shapes


def _check_argument_positions(inputs: Sequence[str], arguments: Sequence[str], model: nn.Module) -> None:
    """Refuse input names that name another position's ``forward()`` argument: ``runtime`` (and anyone reading the
    file) match inputs to ``forward()``'s arguments by name where every input names one, so ``forward(a, b)``
    exported with the names ``b, a`` would be fed crosswise."""
    crossed = [
        f"input {i} ({arguments[i] if i < len(arguments) else 'beyond its arguments'}) named {name!r}, "
        f"forward()'s argument {arguments.index(name)}"
        for i, name in enumerate(inputs)
        if name in arguments and arguments.index(name) != i
    ]
    if crossed:
        raise OptionError(
            f"input_names {list(inputs)} name other positions' forward() arguments of {type(model).__name__} "
            f"(forward({', '.join(arguments)})): {'; '.join(crossed)}. Inputs are matched to forward()'s arguments "
            "by name, so the file would be fed crosswise: give the arguments' own names in order, or names that "
            "are not forward() arguments"
        )


def trace(traceable: Traceable, request: ExportRequest, explain: Callable[[Exception], str]) -> Traced:
    """Eager run, then torch.onnx.export(dynamo=True) with the one dynamic-shape builder and the I/O names."""
    spatial = tuple(int(s) for s in traceable.inputs[0].shape[2:]) if request.dynamic_spatial else ()
    keys, strides, numbers = _eager_run(traceable, explain, spatial)
    reserved = [*traceable.extra_input_names, *traceable.extra_output_names]
    inputs, outputs = io_names(traceable.model, len(traceable.inputs), len(keys), request, keys, reserved)
    all_inputs = [*inputs, *traceable.extra_input_names]
    all_outputs = [*outputs, *traceable.extra_output_names]
    clashes = sorted({n for n in all_inputs if all_inputs.count(n) > 1} | {n for n in all_outputs if n in all_inputs})
    if clashes:
        raise OptionError(f"graph input/output names clash: {clashes}; choose other input_names / output_names")
    dims = _dynamic_dims(traceable.inputs, request)
    try:
        program = run_dynamo_export(
            traceable.module,
            (*tracing_inputs(traceable.inputs, dims), *traceable.extra_inputs),
            request.opset,
            dynamic_shapes(traceable.module, dims, len(traceable.extra_inputs)),
            explain,
            graph_optimizer=traceable.graph_optimizer,
            lighter_optimizer_hint=traceable.lighter_optimizer_hint,
            input_names=all_inputs,
            output_names=all_outputs,
            **traceable.options,
        )
    except ExportError as error:
        # the exporter's words for a graph output that is a plain Python value rather than a traced one
        if not numbers or "object has no attribute 'name'" not in str(error):
            raise
        named = ", ".join(repr(all_outputs[i]) for i in numbers if i < len(all_outputs))
        raise ExportError(
            f"{error}. Output(s) {named} of {type(traceable.model).__name__} are Python values (int, float, str), "
            "not tensors: only a size read from a dynamic dim (x.shape[0] with the batch dynamic) becomes a graph "
            "output; return a tensor (torch.tensor(value)) or leave the value out"
        ) from error
    return Traced(program, all_inputs, all_outputs, strides)


# --------------------------------------------------------------------------- dynamic_spatial


def _other_sizes(spatial: tuple[int, ...], strides: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Twice the example size, the example size plus one (odd sizes inside a strided network), then the multiples k·T
    (T the total stride) below twice the example, smallest first."""
    doubled = tuple(2 * s for s in spatial)
    sizes = [doubled, tuple(s + 1 for s in spatial)]
    for k in range(1, max(2 * s // t for s, t in zip(spatial, strides)) + 1):
        size = tuple(min(k * t, 2 * s) for s, t in zip(spatial, strides))
        if size not in (spatial, doubled) and size not in sizes:
            sizes.append(size)
    return sizes


def _resized(tensor: Tensor, spatial: tuple[int, ...], generator: torch.Generator) -> Tensor:
    shape = (*tensor.shape[:2], *spatial[: tensor.dim() - 2]) if tensor.dim() > 2 else tuple(tensor.shape)
    if tensor.is_floating_point():
        return torch.randn(shape, generator=generator).to(tensor.dtype)
    return torch.zeros(shape, dtype=tensor.dtype)


def _onnx_runner(proto: onnx.ModelProto) -> tuple[str, Callable[[dict[str, Any]], list[Any]]]:
    """(engine name, run(feeds) -> outputs): ONNX Runtime CPU if installed and it implements the file's operators
    (it has no float64 Conv, for one), else onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    try:
        import onnxruntime as ort
    except ImportError:
        evaluator = ReferenceEvaluator(proto)
        return "onnx.reference", lambda feeds: list(evaluator.run(None, feeds))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: a probe that fails is reported by the caller, not printed in red
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ONNX Runtime's own error types: a valid file it does not implement
        evaluator = ReferenceEvaluator(proto)
        return (
            f"onnx.reference (ONNX Runtime refused the file: {_error_line(error)})",
            lambda feeds: list(evaluator.run(None, feeds)),
        )
    return "onnxruntime", lambda feeds: list(session.run(None, feeds))


def check_exported(
    proto: onnx.ModelProto, request: ExportRequest, traceable: Traceable, traced: Traced, label: str
) -> list[tuple[int, ...]]:
    """The check step of both modes: onnx.checker (full check) on ``proto``, then, when the
    request asks for dynamic_spatial, :func:`verify_dynamic_spatial`; returns the sizes it ran.

    ``label`` names the graph in an :class:`ExportError`.
    """
    check_model(proto, label)
    if request.dynamic_batch:
        verify_dynamic_batch(proto, traceable, traced)
    return verify_dynamic_spatial(proto, traceable, traced) if request.dynamic_spatial else []


def _graph_feeds(
    traced: Traced, inputs: Sequence[Tensor], extra_inputs: Sequence[Tensor], graph_inputs: set[str]
) -> dict[str, Any]:
    """NumPy feeds of the file's graph inputs, named as traced, for ``inputs`` then ``extra_inputs``."""
    return {
        name: value.numpy() for name, value in zip(traced.input_names, (*inputs, *extra_inputs)) if name in graph_inputs
    }


def _error_line(error: BaseException) -> str:
    """``Type: first line of the message`` (an engine's error messages run to many lines)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def verify_dynamic_batch(proto: onnx.ModelProto, traceable: Traceable, traced: Traced) -> None:
    """ExportError unless the batch the user asked to be dynamic is, and the file computes the example's own batch.

    torch.export fixes a batch the model uses as a number (``y * x.shape[0]``) to the traced size, with only a
    warning on stderr: the file then refuses other batches while its metadata says dynamic. And a batch-1 example
    is traced widened to batch 2 (:func:`tracing_inputs`), so a model that branches on its batch size
    (``if x.shape[0] > 1``) gives a file of the batch-2 branch: that file is run at the example itself (ONNX
    Runtime CPU, or the reference evaluator) and its outputs compared with PyTorch's, to a tolerance that catches a
    wrong branch, not rounding (1e-3 of the output's scale in float32, 2e-2 in half precision; beyond that, a file
    within ten times PyTorch's own rounding of the float64 output passes: :func:`_beyond_rounding`). Models of 2 GiB or
    more are not run."""
    names = traced.input_names[: len(traceable.inputs)]
    declared = {value.name: value for value in proto.graph.input}
    fixed = []
    for name, tensor in zip(names, traceable.inputs):
        value = declared.get(name)
        if value is None or tensor.dim() == 0:
            continue
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            fixed.append(f"{name!r} at {dims[0].dim_value}")
    if fixed:
        raise ExportError(
            f"dynamic batch: the exporter fixed the batch of input(s) {', '.join(fixed)}: the model's forward uses "
            "its batch size as a number (x.shape[0] in arithmetic, a view to a fixed batch), which torch.export "
            "specialises; the file would refuse any other batch. Export with the batch you deploy as the example "
            "and a static batch (--static-batch / dynamic_batch=False), or make the forward batch-agnostic"
        )
    if not any(t.dim() > 0 and t.shape[0] == 1 for t in traceable.inputs) or proto.ByteSize() >= 2**31 - 1:
        return
    try:
        with torch.no_grad():
            expected = _leaves(traceable.module(*copied(traceable.inputs), *traceable.extra_inputs))
    except Exception:  # a train-mode step PyTorch refuses at batch 1: nothing to compare with
        return
    feeds = _graph_feeds(traced, traceable.inputs, traceable.extra_inputs, set(declared))
    engine, run = _onnx_runner(proto)
    try:
        actual = run(feeds)
    except Exception as error:  # the engine's own error types
        raise ExportError(
            f"dynamic batch: the exported file does not run at the example's batch of 1 on {engine} "
            f"({_error_line(error)}); export an example of batch 2 or more, or with a static batch "
            "(--static-batch / dynamic_batch=False)"
        ) from error
    wrong = _wrong_output(traceable, traceable.inputs, expected, actual)
    if wrong is not None:
        index, difference = wrong
        raise ExportError(
            f"dynamic batch: the example has batch 1, which the exporter traces widened to 2; at batch 1 the "
            f"file's output {traced.output_names[index]!r} differs from PyTorch's by {difference:.3g} on "
            f"{engine}: the model's forward depends on its batch size (a branch on x.shape[0]). Export an "
            "example of the batch you deploy (2 or more), or with a static batch (--static-batch / "
            "dynamic_batch=False)"
        )


def verify_dynamic_spatial(proto: onnx.ModelProto, traceable: Traceable, traced: Traced) -> list[tuple[int, ...]]:
    """Run the exported file at other spatial sizes valid for the network; return the sizes checked.

    Sizes: twice the example size (E) — which the network must run in PyTorch, else the
    model needs fixed spatial sizes (e.g. flatten into a Linear) and ExportError says so —,
    E + 1 where PyTorch runs it (a strided network then meets odd sizes inside, where a size
    computed from the input can differ: TF-style "same" padding written ``-(i // -s)``, which
    the exporter writes as ONNX's truncating Div, gave 0.03–0.26 errors at odd sizes and none
    at even ones, a cold QA of 2026-12-07; a file that fails to run there, as a UNet whose
    up-sampling pads to its skip's size, gets a warning, not a refusal: that failure is loud),
    and the smallest multiple of the network's total stride T (from the eager run) other than
    E that PyTorch runs. At each size the ONNX file
    (ONNX Runtime CPU, or the reference evaluator without it) must run, return outputs of the
    shapes PyTorch returns, and values within a tolerance that catches another computation, not
    rounding (1e-3 of the output's scale in float32, 2e-2 in half precision; beyond that, a file
    within ten times PyTorch's own rounding of the float64 output passes: :func:`_beyond_rounding`;
    parity judges the rest). Inputs of rank > 2 all take the new spatial size. Models of 2 GiB or
    more are not run (protobuf cannot hold them in memory): returns [].
    """
    if proto.ByteSize() >= 2**31 - 1:
        return []
    spatial = tuple(int(s) for s in traceable.inputs[0].shape[2:])
    generator = torch.Generator().manual_seed(0)
    engine, run = _onnx_runner(proto)
    graph_inputs = {value.name for value in proto.graph.input}
    checked: list[tuple[int, ...]] = []
    odd = tuple(s + 1 for s in spatial)
    for size in _other_sizes(spatial, traced.strides or (1,) * len(spatial)):
        first = not checked
        inputs = tuple(_resized(t, size, generator) for t in traceable.inputs)
        try:
            with torch.no_grad():
                expected = _leaves(traceable.module(*copied(inputs), *traceable.extra_inputs))
        except Exception as error:
            if first:
                raise ExportError(
                    f"dynamic_spatial: {type(traceable.model).__name__} does not run at spatial size {list(size)} "
                    f"(twice the example's {list(spatial)}) in PyTorch ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); it needs fixed spatial sizes (e.g. a "
                    "flatten into a Linear). Export without dynamic_spatial / --dynamic-spatial."
                ) from error
            continue  # below the network's smallest valid size: try the next multiple of the stride
        feeds = _graph_feeds(traced, inputs, traceable.extra_inputs, graph_inputs)
        try:
            actual = run(feeds)
        except Exception as error:  # the engine's own error types
            if size == odd:  # a loud failure, not a wrong answer: the file keeps the sizes it runs at
                stride = list(traced.strides) if traced.strides else "its total stride"
                warnings.warn(
                    f"dynamic_spatial: the exported file does not run at spatial size {list(size)} (the example's "
                    f"plus one) on {engine}, although PyTorch does ({_error_line(error)}): the network adapts to "
                    "odd sizes inside (a UNet's up-sampling pads to its skip's size, say) in a way the file does not "
                    f"carry; run it at multiples of the network's total stride ({stride}), as the sizes checked were",
                    UserWarning,
                    stacklevel=4,
                )
                continue
            raise ExportError(
                f"dynamic_spatial: the exported file does not run at spatial size {list(size)} on {engine} "
                f"although PyTorch does ({_error_line(error)}); export without dynamic_spatial / "
                "--dynamic-spatial, or report the model"
            ) from error
        shapes = [tuple(a.shape) for a in actual]
        wanted = [tuple(e.shape) if isinstance(e, Tensor) else () for e in expected]  # a number: a scalar output
        if shapes[: len(wanted)] != wanted:
            raise ExportError(
                f"dynamic_spatial: at spatial size {list(size)} the exported file returns shapes {shapes} on "
                f"{engine}, PyTorch {wanted}; export without dynamic_spatial / --dynamic-spatial"
            )
        wrong = _wrong_output(traceable, inputs, expected, actual)
        if wrong is not None:
            index, difference = wrong
            raise ExportError(
                f"dynamic_spatial: at spatial size {list(size)} the exported file's output "
                f"{traced.output_names[index]!r} differs from PyTorch's by {difference:.3g} on {engine}: the file "
                "computes something the network derives from its input's size otherwise at this size (TF-style "
                "'same' padding written -(i // -s), which the exporter writes as ONNX's truncating Div, is one "
                "known cause). Export without dynamic_spatial / --dynamic-spatial, at the size you deploy"
            )
        checked.append(size)
        if len(checked) == 3:
            break
    return checked


#: The smallest output scale :func:`_differing_output` judges by (below, an absolute tolerance).
_SMALLEST_SCALE = 1e-3
#: A file within this many times PyTorch's own float32 rounding of the exact (float64) output is taken as right
#: whatever the first tolerance said (:func:`_beyond_rounding`).
_ROUNDING_FACTOR = 10.0


def _wrong_output(
    traceable: Traceable, inputs: Sequence[Tensor], expected: Sequence[Any], actual: Sequence[Any]
) -> tuple[int, float] | None:
    """(index, largest difference) of the first output of the file (``actual``) that is wrong: beyond the tolerance
    (:func:`_differing_outputs`) and beyond rounding (:func:`_beyond_rounding`, run only where the first check fails);
    None where every output is right."""
    differing = _differing_outputs(expected, actual)
    return _beyond_rounding(traceable, inputs, expected, actual, differing) if differing else None


def _differing_outputs(expected: Sequence[Any], actual: Sequence[Any]) -> dict[int, float]:
    """Index → largest difference of every floating-point output of the file (``actual``, NumPy) that differs from
    PyTorch's (``expected``) by more than another computation's tolerance, not rounding: 1e-3 of the output's scale in
    float32 and float64, 2e-2 in half precision (:func:`_share`). The scale is the output's largest magnitude, at least
    1e-3 (an output of all zeros is judged at 1e-6, resp. 2e-5): a small output (a regression head in small units) is
    judged relative to itself, not to 1. Callers then ask :func:`_beyond_rounding` (an output that cancels keeps the
    rounding of what it cancels)."""
    found = {}
    for index, (want, got) in enumerate(zip(expected, actual)):
        if not isinstance(want, Tensor) or not want.is_floating_point() or tuple(want.shape) != tuple(got.shape):
            continue
        reference = want.detach().to(torch.float64).numpy()
        difference = float(np.max(np.abs(got.astype(np.float64) - reference), initial=0.0))
        if not difference <= _share(want) * _scale(reference):
            found[index] = difference
    return found


def _share(want: Tensor) -> float:
    return 1e-3 if want.dtype in (torch.float32, torch.float64) else 2e-2


def _scale(reference: np.ndarray) -> float:
    return max(_SMALLEST_SCALE, float(np.max(np.abs(reference), initial=0.0)))


def _beyond_rounding(
    traceable: Traceable,
    inputs: Sequence[Tensor],
    expected: Sequence[Any],
    actual: Sequence[Any],
    differing: dict[int, float],
) -> tuple[int, float] | None:
    """The first of the ``differing`` outputs (:func:`_differing_outputs`) that is further from the exact output than
    rounding explains, with its difference, or None. The module run in float64 on ``inputs`` gives the exact output;
    each element of the file may differ from it by the tolerance, or by :data:`_ROUNDING_FACTOR` times PyTorch's own
    float32 error at that element or at the output's median element, whichever is largest. An output that cancels
    (``h − mean(h)`` of values near 2000: float32 steps of 1.2e-4 on an output of 0.18) differs by its rounding in
    both engines, which 1e-3 of its scale refused (a review of 2026-12-07's sixth session); one badly conditioned
    element widens the allowance of that element only (the second review). Where the module does not run in float64,
    the first differing output."""
    first = next(iter(differing.items()))
    try:
        exact_module = copy.deepcopy(traceable.module).double()
        widened = [t.double() if t.is_floating_point() else t for t in copied((*inputs, *traceable.extra_inputs))]
        with torch.no_grad():
            exact_outputs = _leaves(exact_module(*widened))
    except Exception:  # a module that does not run in float64: the first tolerance stands
        return first
    for index, difference in differing.items():
        want, exact = expected[index], exact_outputs[index] if index < len(exact_outputs) else None
        if not isinstance(exact, Tensor) or exact.shape != want.shape or want.dtype == torch.float64:
            return index, difference
        exact_values = exact.detach().to(torch.float64).numpy()
        torch_error = np.abs(want.detach().to(torch.float64).numpy() - exact_values)
        file_error = np.abs(np.asarray(actual[index], dtype=np.float64) - exact_values)
        typical = float(np.median(torch_error)) if torch_error.size else 0.0
        allowed = np.maximum(_ROUNDING_FACTOR * np.maximum(torch_error, typical), _share(want) * _scale(exact_values))
        if not np.all(file_error <= allowed):
            return index, difference
    return None
