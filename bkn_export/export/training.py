"""Training-mode ONNX export: BKN layers as ``ai.bkn::BatchKalmanNorm`` nodes.

``export_training`` traces the model with ``torch.onnx.export(..., dynamo=True)``. The
custom op ``torch.ops.bkn.batch_kalman_norm`` (one BKN step after the prediction) is
translated into one ``ai.bkn::BatchKalmanNorm`` node per layer (its schema is registered
first: without it the exporter cannot emit a custom-domain node); the prediction of
each layer (transition) is ordinary ONNX ops, so the Kalman chain is explicit: node k's
posterior outputs reach node k+1's prior inputs. The op's function body
(:mod:`bkn_export.export.op.function_body`), generated for the model's opset, is stored in
``ModelProto.functions``, so ONNX Runtime and ``onnx.reference`` run the model with no
plugin, and a TensorRT plugin can take the node over by its op type.

Only the BKN layers run in training mode (batch statistics); every other module is
exported as in eval mode (Dropout off, any unconverted BatchNorm on running statistics).

With ``running_stats_io=True`` each BKN layer that tracks running statistics gets two
graph inputs ``<layer>.running_mean`` / ``<layer>.running_var`` and two graph outputs
``<layer>.running_mean_out`` / ``<layer>.running_var_out`` holding BatchNorm's update
(:func:`bkn_export.functional.running_statistics_update`)::

    r_μ' = (1 - α) r_μ + α μ_{k|k}      r_Σ' = (1 - α) r_Σ + α n/max(n-1, 1) Σ_{k|k}

with n = elements per channel of the layer's input, computed from the input's dynamic
shape, and α the layer's momentum. A runtime feeds the outputs back as the next call's
inputs (test-time adaptation: ``examples/test_time_adaptation.py``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from bkn_export import functional as Fk
from bkn_export.chain.observe import observe
from bkn_export.chain.scope import Observer, Published
from bkn_export.copying import copy_module
from bkn_export.distributed import SyncBatchKalmanNorm
from bkn_export.errors import ExportError, ModelFileError, OptionError
from bkn_export.export.common import (
    dynamic_shape_hint,
    export_failure_cause,
    resolve_graph_optimizer,
    root_cause,
)
from bkn_export.export.feeds import check_feeds as feeds_check
from bkn_export.export.io import DEFAULT_EXTERNAL_DATA_THRESHOLD, load_onnx_file, save_onnx
from bkn_export.export.metadata import (
    attach_metadata,
    example_shapes_entry,
    export_metadata,
    output_order_entry,
    parse_name_scopes,
)
from bkn_export.export.name_scopes import NAME_SCOPES_KEY
from bkn_export.export.op import function_body, op_spec, schema
from bkn_export.export.op.translation import translation_table
from bkn_export.export.pipeline import (
    Traceable,
    check_exported,
    check_finite_parameters,
    trace,
    validate_request,
)
from bkn_export.export.result import ExportResult
from bkn_export.export.training_names import (
    POSTERIOR_MEAN_SUFFIX,
    POSTERIOR_VARIANCE_SUFFIX,
    RUNNING_MEAN_SUFFIX,
    RUNNING_VAR_SUFFIX,
    UPDATED_SUFFIX,
)
from bkn_export.module_modes import frozen_layers, train_layers_only
from bkn_export.nn import _BatchKalmanNorm

__all__ = [
    "DEFAULT_OPSET",
    "POSTERIOR_MEAN_SUFFIX",
    "POSTERIOR_VARIANCE_SUFFIX",
    "RUNNING_MEAN_SUFFIX",
    "RUNNING_VAR_SUFFIX",
    "UPDATED_SUFFIX",
    "TrainingGraphInfo",
    "attach_function",
    "check_feeds",
    "check_training_model",
    "export_training",
    "running_stat_names",
    "translation_table",
]

#: Default ONNX opset of training-mode exports (as the inference export; the op supports MIN..MAX_OPSET).
DEFAULT_OPSET = op_spec.DEFAULT_OPSET


@dataclass(frozen=True)
class TrainingGraphInfo:
    """Names in an exported training-mode graph (also stored in its metadata).

    layers: BKN module names in execution order. running_stats: the layers whose running
    statistics are graph inputs/outputs (``running_stats_io=True``), else empty.
    """

    layers: tuple[str, ...]
    running_stats: tuple[str, ...]
    posteriors_exposed: bool


def running_stat_names(layer: str) -> tuple[str, str, str, str]:
    """(mean input, var input, mean output, var output) graph names of ``layer``'s running statistics."""
    mean, var = layer + RUNNING_MEAN_SUFFIX, layer + RUNNING_VAR_SUFFIX
    return mean, var, mean + UPDATED_SUFFIX, var + UPDATED_SUFFIX


# --------------------------------------------------------------------------- the traced module


class _TrainingGraph(nn.Module):
    """The module that is traced: the model's forward plus the extra graph inputs/outputs.

    forward(*inputs, *[r_μ, r_Σ] per layer in ``running_stats``) -> (*model outputs,
    *[r_μ', r_Σ'] per layer in ``running_stats``, *[μ_{k|k}, Σ_{k|k}] per layer if
    ``expose_posteriors``). Posteriors and element counts are read from the chain's
    observer (:func:`bkn_export.chain.observe`) of this call: no layer is patched.
    """

    def __init__(
        self,
        model: nn.Module,
        num_inputs: int,
        layers: Sequence[tuple[str, _BatchKalmanNorm]],
        running_stats: Sequence[str],
        expose_posteriors: bool,
    ) -> None:
        super().__init__()
        self.model = model
        self.num_inputs = num_inputs
        self.layer_names = [name for name, _ in layers]
        self._layers = dict(layers)
        self.running_stats = list(running_stats)
        self.expose_posteriors = expose_posteriors
        #: layers of ``running_stats`` that the traced forward did not run (their statistics pass through)
        self.unrun: set[str] = set()

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        inputs, stats = args[: self.num_inputs], args[self.num_inputs :]
        with observe(self.model) as observer:
            outputs = self.model(*inputs)
        # A named tuple stays whole, as a dict does: its fields name its outputs (pipeline.output_keys), as in the
        # inference mode; a plain tuple or list is the model's outputs in order.
        plain_sequence = isinstance(outputs, (tuple, list)) and not hasattr(outputs, "_fields")
        flat = list(outputs) if plain_sequence else [outputs]
        for i, name in enumerate(self.running_stats):
            layer = self._layers[name]
            assert layer.momentum is not None
            running_mean, running_var = stats[2 * i], stats[2 * i + 1]
            if name not in observer.calls:  # a layer the forward does not run keeps its statistics, as in PyTorch
                self.unrun.add(name)
            for call in observer.calls.get(name, ()):  # one update per call, in order, as its own forward does
                running_mean, running_var = Fk.running_statistics_update(
                    running_mean, running_var, call.posterior_mean, call.posterior_variance, layer.momentum, call.count
                )
            flat.extend((running_mean, running_var))
        if self.expose_posteriors:
            for name in self.layer_names:
                calls = self._calls(observer, name)
                if len(calls) > 1:
                    raise ExportError(
                        f"BKN layer '{name}' runs {len(calls)} times in one forward (its weights "
                        "shared), so it has no single posterior to expose; export without expose_posteriors"
                    )
                flat.extend((calls[0].posterior_mean, calls[0].posterior_variance))
        return tuple(flat)

    @staticmethod
    def _calls(observer: Observer, name: str) -> list[Published]:
        """What each call of layer ``name`` published in this forward; ExportError where it did not run."""
        if name not in observer.calls:
            raise ExportError(
                f"BKN layer '{name}' did not run on the example inputs in the export's forward (the model in eval "
                "mode, only its BKN layers in train mode), so it has no posterior to expose: export without "
                "expose_posteriors (a layer the forward never calls never has one), or with example inputs that "
                "take the branch that runs it. A branch the model takes only "
                "when it is itself in train mode (`if self.training:`, a VAE or deep-supervision head) is not in "
                "a training-mode file"
            )
        return observer.calls[name]


# --------------------------------------------------------------------------- export


def _check_layers(
    layers: Sequence[tuple[str, _BatchKalmanNorm]], running_stats_io: bool, dynamic_spatial: bool = False
) -> None:
    for name, layer in layers:
        bound = getattr(layer.chain, "size_bound", ())
        if dynamic_spatial and bound:
            raise ExportError(
                f"BKN layer '{name}': its prior's path holds a padding or resample size given to F.pad / "
                f"F.interpolate(size=...) at the wiring example's size ({bound[0]}), which the forward may compute "
                "from the input's size; a training-mode file with dynamic_spatial would compute that path at every "
                "size, where the network may pad or resample otherwise (and eager training leaves it out at other "
                "sizes). Export without dynamic_spatial / --dynamic-spatial, at the size you train at"
            )
        if layer.chain is not None and layer.chain.transition == "sampled":
            raise ExportError(
                f"BKN layer '{name}' uses transition='sampled', a Monte Carlo prediction that draws new noise on "
                "every call; a training-mode graph would bake one draw in (or need a random op no plugin "
                "reproduces). Export the deterministic analytic version instead: "
                "bkn_export.convert_batchnorm(model, example_inputs, transition='propagate') (or "
                "wire_chain(model, example_inputs, KalmanOptions(transition='propagate', ...)))"
            )
        if running_stats_io and layer.track_running_stats and layer.momentum is None:
            raise ExportError(
                f"BKN layer '{name}' has momentum=None (cumulative moving average), whose factor depends on "
                "num_batches_tracked; running_stats_io supports a fixed momentum: set layer.momentum (e.g. 0.1)"
            )


def _listed(names: Sequence[str]) -> str:
    """The first three names, quoted, and ", ..." where there are more."""
    return ", ".join(repr(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")


def _warn_about_unrun(unrun: Sequence[str]) -> None:
    """Name the layers whose running statistics are graph inputs and outputs but which the forward did not run: the
    file passes their statistics through unchanged, as PyTorch leaves them (a registered layer the forward never
    calls, as pytorch-tabnet's ``initial_bn``; or a branch these inputs, or train mode, would take)."""
    if unrun:
        warnings.warn(
            f"export_training: {len(unrun)} BKN layer(s) ({_listed(unrun)}) did not run on the example inputs in the "
            "export's forward (the model in eval mode, only its BKN layers in train mode): the file passes their "
            "running statistics through unchanged, as PyTorch does for a layer that does not run. If a branch runs "
            "them (other inputs; `if self.training:`), that branch is not in the file",
            stacklevel=4,
        )


def _warn_about_dropout(model: nn.Module) -> None:
    """Name the model's active Dropout modules, which the training-mode file runs as in eval mode (off), as it runs
    every module but the BKN layers: the file is compared with that model, not with ``model.train()(x)`` (a cold QA
    took EfficientNet-B0's 3.2 difference for a wrong export)."""
    dropouts = [
        name for name, module in model.named_modules() if isinstance(module, nn.modules.dropout._DropoutNd) and module.p
    ]
    if dropouts:
        warnings.warn(
            f"export_training: {len(dropouts)} Dropout module(s) ({_listed(dropouts)}) run as in eval mode (off) in "
            "the file, as every module but the BKN layers does (and drop-connect / stochastic depth written as "
            "functions): compare the file with the model in eval mode but its BKN layers in train mode (bkn parity's "
            "training reference), not with model.train()(x)",
            stacklevel=4,
        )


def export_training(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    fp16: bool = False,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    running_stats_io: bool = False,
    expose_posteriors: bool = False,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    graph_optimizer: str = "full",
) -> ExportResult:
    """Export ``model`` with its BKN layers in training mode to ``path`` (written atomically).

    example_inputs: a tensor or tuple of tensors (N, C, *), N ≥ 1. opset: default-domain
    opset in [op_spec.MIN_OPSET, op_spec.MAX_OPSET] (None: :data:`DEFAULT_OPSET`).
    dynamic_batch / dynamic_spatial: dim 0 / dims 2.. of every input symbolic (dynamic_spatial
    is verified by running the file at two other sizes). fp16: the model and inputs in
    float16 (statistics stay float32: the op's type U).
    running_stats_io: running statistics as graph inputs and their updates as outputs
    (see the module doc). expose_posteriors: every layer's μ_{k|k}, Σ_{k|k} as extra
    outputs ``<layer>.posterior_mean`` / ``<layer>.posterior_variance`` (parity, debugging).
    input_names / output_names: names of the model's own inputs / outputs (default, as in
    inference mode: forward()'s argument names; ``output`` or ``output_<i>``).
    graph_optimizer: ``"full"`` (torch.onnx's optimizer, the smallest graph), ``"fold"`` (constant
    folding and unused nodes only: on dense networks, whose chains give tens of thousands of
    nodes, the full optimizer's rewriter takes minutes) or ``"none"`` (the graph as traced);
    :data:`~bkn_export.export.common.GRAPH_OPTIMIZERS`. Every form computes the same function
    (``tests/test_export_training.py``); recorded as metadata ``bkn_export.graph_optimizer``.

    ``model`` itself is not changed: the export works on a deep copy, so its train/eval
    mode and its buffers (running statistics, num_batches_tracked) stay as they were.
    Raises :class:`ExportError` for a ``sampled`` transition, an empty example batch, or a
    chain whose shapes do not fit the example inputs; :class:`NonFiniteWeightsError`;
    :class:`OptionError` (opset, threshold, names); :class:`OutputWriteError` (the path).
    """
    graph_optimizer = resolve_graph_optimizer(graph_optimizer)
    request = validate_request(
        example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, dynamic_spatial=dynamic_spatial, fp16=fp16,
        external_data_threshold=external_data_threshold, input_names=input_names, output_names=output_names,
    )  # fmt: skip
    inputs = request.inputs
    for i, t in enumerate(inputs):
        # the normalization layers' own (N, C, *) is checked where they run; an input may be indices (N,)
        if t.dim() < 1 or t.numel() == 0:  # bad input, as validate_request's empty batch
            raise OptionError(
                f"export_training: example input {i} has shape {tuple(t.shape)}; the export needs a non-empty "
                "batch (N, *) with N >= 1 in every input to trace batch statistics"
            )
    check_finite_parameters(model)
    work = copy_module(model)
    frozen = set(frozen_layers(work, ((n, m) for n, m in work.named_modules() if isinstance(m, _BatchKalmanNorm))))
    work.eval()
    layers = [(name, m) for name, m in work.named_modules() if isinstance(m, _BatchKalmanNorm) and name not in frozen]
    if not layers:
        if frozen:
            raise ExportError(
                f"export_training: every BKN layer of {type(model).__name__} is frozen in eval mode inside a model "
                "in training mode, so the file would have no training-mode step; export it with mode='inference'"
            )
        raise ExportError(
            f"export_training: {type(model).__name__} has no BatchKalmanNorm layers; convert it first with "
            "bkn_export.convert_batchnorm(model, example_inputs), or use mode='inference'"
        )
    _check_layers(layers, running_stats_io, request.dynamic_spatial)
    _refuse_synchronised(layers)
    if any(t.dtype == torch.float64 for t in inputs):
        warnings.warn(
            "export_training: a float64 model's training-mode file is not float64-exact: the op's eps and "
            "fallback_ratio are ONNX float attributes (32-bit), and the exporter stores the prior's Python-scalar "
            "constants (1/sqrt(2 pi), 1/sqrt(2), ...) rounded to float32, so runtimes differ from the model by "
            "about 1e-8 relative (judge with atol/rtol ~1e-7, not float64's 1e-10)",
            stacklevel=3,
        )
    _warn_about_dropout(work)
    tracked = [name for name, layer in layers if layer.track_running_stats] if running_stats_io else []
    # Only the BKN layers themselves: a recursive ``train()`` would put their children (a
    # norm-act's Dropout) in train mode and bake a fixed random mask into the graph.
    train_layers_only(layer for _, layer in layers)
    for _, layer in layers:
        # The traced graph must not mutate buffers; updates are explicit outputs instead.
        layer.track_running_stats = False
    if request.fp16:
        work = work.half()
        inputs = tuple(t.half() if t.is_floating_point() else t for t in inputs)
        for _, layer in layers:
            # Running statistics stay float32 (the op's statistics type U): at momentum 0.001 a float16 update
            # smaller than half a ulp of r_Σ would round away and the statistics would stall.
            for buffer in ("running_mean", "running_var"):
                if getattr(layer, buffer) is not None:
                    setattr(layer, buffer, getattr(layer, buffer).float())
    stat_inputs: list[Tensor] = []
    by_name = dict(layers)
    for name in tracked:
        layer = by_name[name]
        assert layer.running_mean is not None and layer.running_var is not None
        stat_inputs += [layer.running_mean.detach().clone(), layer.running_var.detach().clone()]
    extra_outputs = [running_stat_names(name)[2 + i] for name in tracked for i in range(2)]
    if expose_posteriors:
        suffixes = (POSTERIOR_MEAN_SUFFIX, POSTERIOR_VARIANCE_SUFFIX)
        extra_outputs += [name + suffix for name, _ in layers for suffix in suffixes]
    graph = _TrainingGraph(work, len(inputs), layers, tracked, expose_posteriors)
    traceable = Traceable(
        module=graph,
        model=model,
        inputs=inputs,
        extra_inputs=tuple(stat_inputs),
        extra_input_names=tuple(n for name in tracked for n in running_stat_names(name)[:2]),
        extra_output_names=tuple(extra_outputs),
        options={"custom_translation_table": translation_table()},
        graph_optimizer=graph_optimizer,
        lighter_optimizer_hint="export_training(..., graph_optimizer='fold') (bkn export --graph-optimizer fold) "
        "keeps the folding and skips the rewriter",
    )
    with warnings.catch_warnings():
        # Training mode is the point of this export; the exporter's reminder is noise here.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        traced = trace(traceable, request, _explain_export_failure)
    _warn_about_unrun(sorted(graph.unrun))
    proto = traced.program.model_proto
    attach_function(proto)
    node_layers = _name_nodes(proto)
    info = TrainingGraphInfo(tuple(node_layers), tuple(tracked), expose_posteriors)
    entries = _metadata(
        info, request.opset, request.fp16, request.dynamic_batch, request.dynamic_spatial, graph_optimizer
    )
    metadata = attach_metadata(
        proto, {**entries, **output_order_entry(proto), **example_shapes_entry(traced.input_names, inputs)}
    )
    checked_sizes = check_exported(proto, request, traceable, traced, "export_training: the exported graph")
    target = save_onnx(proto, path, external_data_threshold=request.external_data_threshold)
    return ExportResult(
        path=Path(target),
        opset=request.opset,
        mode="training",
        metadata=metadata,
        extra={"graph": info, "dynamic_spatial_checked": checked_sizes},
    )


def _refuse_synchronised(layers: Sequence[tuple[str, _BatchKalmanNorm]]) -> None:
    """A training-mode file runs in one process: a synchronised layer's statistics over a process group have no
    meaning there, and tracing it would need (and record) collectives."""
    synchronised = [name for name, layer in layers if isinstance(layer, SyncBatchKalmanNorm)]
    if synchronised:
        shown = ", ".join(repr(name) for name in synchronised[:5]) + (" ..." if len(synchronised) > 5 else "")
        raise ExportError(
            f"export_training: {len(synchronised)} layer(s) are SyncBatchKalmanNorm ({shown}); a training-mode file "
            "runs in one process, on that process's batch. Load the state dict into the model built without "
            "convert_sync_batchkalmannorm (the keys are the same) and export that; mode='inference' exports a "
            "synchronised model as it is"
        )


def _explain_export_failure(error: Exception) -> str:
    """The root cause of an exporter failure, in one or two lines."""
    text = export_failure_cause(error)
    cause = root_cause(error)
    if any(k in str(cause) for k in ("mat1 and mat2", "size mismatch", "cannot be multiplied", "must match the size")):
        return (
            "export_training: the Kalman chain's shapes do not fit the example inputs (a layer's prediction "
            "has a different channel count than its input). Re-wire the chain on inputs like these with "
            f"bkn_export.wire_chain(model, example_inputs). Cause: {text}"
        )
    return f"export_training: torch.onnx.export failed. Cause: {text}{dynamic_shape_hint(error)}"


def attach_function(model: onnx.ModelProto) -> None:
    """Store the op's function body (for the model's default-domain opset) in ``model.functions``.

    Replaces an existing ``ai.bkn::BatchKalmanNorm`` function and imports the domain.
    """
    opset = _default_opset(model)
    proto = function_body.function_proto(opset)
    kept = [f for f in model.functions if not op_spec.is_op_function(f)]
    del model.functions[:]
    model.functions.extend([*kept, proto])
    if not any(entry.domain == op_spec.DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(op_spec.DOMAIN, op_spec.DOMAIN_VERSION))


def _default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the ONNX model imports no default-domain opset")


def _bkn_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if op_spec.is_op_node(n)]


def _name_nodes(model: onnx.ModelProto) -> list[str]:
    """Name each BKN node after its module (TensorRT layers and error messages show it).

    The module comes from the exporter's ``pkg.torch.onnx.name_scopes`` node metadata.
    Returns the module names in graph (execution) order.
    """
    names: list[str] = []
    for node in _bkn_nodes(model.graph):
        scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES_KEY), "")
        parts = parse_name_scopes(scopes) or []
        module = str(parts[-2]) if len(parts) >= 2 else node.name
        module = module.removeprefix("model.")
        name = module if module not in names else f"{module}#{names.count(module) + 1}"
        names.append(module)
        node.name = name
    return names


def _metadata(
    info: TrainingGraphInfo, opset: int, fp16: bool, dynamic_batch: bool, dynamic_spatial: bool, graph_optimizer: str
) -> dict[str, str]:
    """The ``bkn_export.*`` metadata entries (same keys as an inference export, plus the chain and the optimizer)."""
    return {
        **export_metadata("training", opset, fp16, dynamic_batch, dynamic_spatial),
        "op": f"{op_spec.DOMAIN}::{op_spec.OP_TYPE}@{op_spec.DOMAIN_VERSION}",
        "layers": ",".join(info.layers),
        "running_stats": ",".join(info.running_stats),
        "graph_optimizer": graph_optimizer,
    }


# --------------------------------------------------------------------------- checks of a saved model


def check_training_model(model: str | os.PathLike[str] | onnx.ModelProto) -> onnx.ModelProto:
    """Check that a training-mode model can run without a plugin; return it (loaded).

    Verifies that no node is a renamed ``ai.bkn::BatchKalmanNorm`` (another op type in the ``ai.bkn`` domain, or
    one with ``BatchKalmanNorm`` inside it, as a tool's prefix leaves it), that every ``ai.bkn::BatchKalmanNorm``
    node has the op's function body in
    ``model.functions`` (for the model's opset), that the domain is imported, that node
    attributes match op_spec, and that shape inference passes (which also catches a
    prior whose channel count differs from its input's). Raises
    :class:`ModelFileError` saying what is missing and how to get it.
    """
    label = "<in-memory model>"
    if not isinstance(model, onnx.ModelProto):
        label = str(model)
        model = load_onnx_file(model)
    nodes = _bkn_nodes(model.graph)
    op_name = f"{op_spec.DOMAIN}::{op_spec.OP_TYPE}"
    renamed = [
        n
        for n in model.graph.node
        if not op_spec.is_op_node(n) and (n.domain == op_spec.DOMAIN or op_spec.OP_TYPE in n.op_type)
    ]
    if renamed:  # a tool's rewrite (a prefixed op type)
        raise ModelFileError(
            f"{label}: node '{renamed[0].name}' is {renamed[0].domain}::{renamed[0].op_type}, a renamed {op_name} "
            f"({len(renamed)} such node(s)): the TensorRT plugin and this check know the op only by its own name (a "
            "function body renamed with the nodes still runs in ONNX Runtime, unchecked); rename them back to "
            f"{op_name}, or re-export with export_onnx(model, example_inputs, path, mode='training')"
        )
    if not nodes:
        return model
    if not any(entry.domain == op_spec.DOMAIN for entry in model.opset_import):
        raise ModelFileError(
            f"{label}: has {op_name} nodes but does not import domain '{op_spec.DOMAIN}'; re-export it with "
            "export_onnx(..., mode='training') or call bkn_export.export.training.attach_function(model)"
        )
    functions = [f for f in model.functions if op_spec.is_op_function(f)]
    if not functions:
        raise ModelFileError(
            f"{label}: {len(nodes)} {op_name} node(s) (e.g. '{nodes[0].name}') but the model carries no "
            f"function body for {op_name}, so ONNX Runtime and onnx.reference cannot run it (a TensorRT build "
            f"needs the '{op_spec.PLUGIN_NAMESPACE}' plugin instead). Restore it with "
            "bkn_export.export.training.attach_function(model) and save, or re-export with "
            "export_onnx(model, example_inputs, path, mode='training')"
        )
    model_opset = _default_opset(model)
    function_opsets = {e.version for e in functions[0].opset_import if e.domain in ("", "ai.onnx")}
    if function_opsets and function_opsets != {model_opset}:
        raise ModelFileError(
            f"{label}: the {op_name} function body imports ONNX opset {sorted(function_opsets)} but the model "
            f"uses opset {model_opset}; regenerate it with bkn_export.export.training.attach_function(model)"
        )
    expected = {a.name for a in op_spec.ATTRIBUTES}
    for node in nodes:
        present = {a.name for a in node.attribute}
        if present - expected:
            raise ModelFileError(
                f"{label}: node '{node.name}' has attributes {sorted(present - expected)} that {op_name} "
                f"v{op_spec.DOMAIN_VERSION} does not define (known: {sorted(expected)})"
            )
        if len(node.input) != len(op_spec.INPUTS) or len(node.output) != len(op_spec.OUTPUTS):
            raise ModelFileError(
                f"{label}: node '{node.name}' has {len(node.input)} inputs / {len(node.output)} outputs; "
                f"{op_name} takes {[p.name for p in op_spec.INPUTS]} and returns {[p.name for p in op_spec.OUTPUTS]}"
            )
    schema.register_schema()
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as error:
        raise ModelFileError(f"{label}: shape inference failed: {error}") from error
    return model


def check_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> None:
    """Check runtime inputs against a training-mode graph: names, dtypes, ranks, static dims, batch ≥ 1, finite.

    :func:`bkn_export.export.feeds.check_feeds` with empty inputs refused; raises
    :class:`BKNInputError` naming the input (batch statistics of an empty batch are
    undefined: ONNX Runtime would return NaN, not an error).
    """
    feeds_check(model, feeds, allow_empty=False)
