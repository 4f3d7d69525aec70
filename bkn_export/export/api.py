"""The one entry point ``export_onnx``; each mode lives in its own module."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from bkn_export.errors import OptionError
from bkn_export.export.io import DEFAULT_EXTERNAL_DATA_THRESHOLD
from bkn_export.export.result import ExportResult

SUPPORTED_MODES = ("inference", "training")


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike[str],
    mode: str = "inference",
    opset: int | None = None,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    fp16: bool = False,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **mode_options: Any,
) -> ExportResult:
    """Export ``model`` to ONNX at ``path`` (written atomically).

    example_inputs: a tensor, a tuple of tensors (N, C, *), or a dict of them keyed by the first positional
    arguments of ``forward()`` (as :func:`bkn_export.convert_batchnorm` takes them; the graph inputs follow
    ``forward()``'s order). mode: "inference" folds
    the eval-mode BKN into the preceding Conv/Gemm; "training" exports batch statistics
    and the Kalman chain. The model's train/eval mode is left as it was found.
    input_names / output_names: graph I/O names, the same rule in both modes (default:
    forward()'s argument names; ``output``, ``output_<i>`` or a dict output's keys; see
    :mod:`bkn_export.export.pipeline`). ``mode_options`` go to the mode's exporter (e.g.
    ``running_stats_io=True`` for training). Errors follow the exit-code rule's split:
    :class:`OptionError` / :class:`OutputWriteError` (the request), :class:`ExportError`
    and subclasses (the model).
    """
    exporter: Callable[..., ExportResult]
    if mode == "inference":
        from bkn_export.export.inference import export_inference as exporter
    elif mode == "training":
        from bkn_export.export.training import export_training as exporter
    else:
        raise OptionError(f"unknown export mode {mode!r}; choose one of {SUPPORTED_MODES}")
    _check_mode_options(exporter, mode, mode_options)
    from bkn_export.export.pipeline import positional_examples

    return exporter(
        model,
        positional_examples(model, example_inputs),
        path,
        opset=opset,
        dynamic_batch=dynamic_batch,
        dynamic_spatial=dynamic_spatial,
        fp16=fp16,
        external_data_threshold=external_data_threshold,
        input_names=input_names,
        output_names=output_names,
        **mode_options,
    )


def _check_mode_options(exporter: Callable[..., ExportResult], mode: str, mode_options: dict[str, Any]) -> None:
    """:class:`OptionError` naming ``mode_options`` that ``mode``'s exporter does not take, and the ones it does."""
    taken = {
        name
        for name, parameter in inspect.signature(exporter).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(mode_options) - taken)
    if unknown:
        raise OptionError(
            f"export mode {mode!r} takes no option {', '.join(map(repr, unknown))}; its options are {sorted(taken)}"
        )
