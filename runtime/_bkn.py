"""The one place where ``runtime`` reaches into ``bkn_export``.

``runtime`` checks ONNX files against PyTorch models in general; what it needs to know
about Batch Kalman Normalization is small and lives here, so that a change on the
``bkn_export`` side is a change to this file only:

* the op contract (:mod:`bkn_export.export.op`: :data:`OP_DOMAIN`, :func:`is_op_node`,
  the plugin's identity): to detect a training-mode export and to find the op's nodes;
* the exporter's node provenance (:data:`NAME_SCOPES_KEY`, :func:`read_name_scopes`):
  localisation maps ONNX values to modules with it;
* the ONNX file I/O (:func:`load_onnx_file`, :func:`save_onnx`) and the one check of
  runtime inputs against a graph (:class:`TensorSpec`, :func:`tensor_spec`,
  :func:`check_feeds`, :func:`nonfinite_count`), so that both packages read, write and
  check models with one wording;
* the BKN layers of a model (:func:`bkn_layers`): the training reference runs exactly
  them in train mode, as the training-mode export does; :func:`kept_modes` gives the
  user's model back in the train/eval flags it was found in;
* the export call (:func:`export_onnx`) for :func:`runtime.assert_parity`;
* the TensorRT plugin helpers (:func:`plugin_nodes`, :func:`prepare_model_for_plugin`,
  :func:`find_plugin_library`, plugin name / version / namespace);
* the shared atomic writer (:func:`write_bytes_atomic`, :func:`write_text_atomic`);
* the exceptions both packages raise (bad input, unreadable model file, a runtime that
  cannot load a model): one hierarchy, so the CLI maps every one of them to exit 2.

Everything heavy (torch, onnx) is imported inside the functions (``TensorSpec`` on first
use, by module ``__getattr__``), so that ``bkn parity --help`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bkn_export.errors import BKNError, BKNInputError, ModelFileError, PluginLibraryNotFoundError, RuntimeLoadError
from bkn_export.export.name_scopes import NAME_SCOPES_KEY, read_name_scopes
from bkn_export.export.op import op_spec
from bkn_export.export.training_names import is_running_statistic_input

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from bkn_export.export.feeds import TensorSpec

__all__ = [
    "NAME_SCOPES_KEY",
    "OP_DOMAIN",
    "OP_TYPE",
    "BKNError",
    "BKNInputError",
    "ModelFileError",
    "PluginLibraryNotFoundError",
    "RuntimeLoadError",
    "TensorSpec",
    "bkn_layers",
    "check_feeds",
    "copy_model",
    "create_directories",
    "export_onnx",
    "find_plugin_library",
    "is_op_node",
    "is_running_statistic_input",
    "kept_modes",
    "load_onnx_file",
    "nonfinite_count",
    "plugin_identity",
    "plugin_nodes",
    "prepare_model_for_plugin",
    "read_name_scopes",
    "running_statistics_io",
    "save_onnx",
    "tensor_spec",
    "train_bkn_layers",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: The custom domain and op type of a training-mode export (:mod:`bkn_export.export.op.op_spec`,
#: which imports neither torch nor onnx).
OP_DOMAIN = op_spec.DOMAIN
OP_TYPE = op_spec.OP_TYPE
is_op_node = op_spec.is_op_node


def __getattr__(name: str) -> Any:
    if name == "TensorSpec":  # imports onnx and NumPy: only when a model is read
        from bkn_export.export.feeds import TensorSpec

        return TensorSpec
    raise AttributeError(f"module 'runtime._bkn' has no attribute {name!r}")


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """name, dtype (NumPy name) and shape of a graph input or output (:func:`bkn_export.export.feeds.tensor_spec`)."""
    from bkn_export.export.feeds import tensor_spec as spec

    return spec(value)


def check_feeds(
    specs: Sequence[TensorSpec], feeds: Mapping[str, np.ndarray], *, allow_empty: bool = True
) -> dict[str, np.ndarray]:
    """Check inputs against the graph's (:func:`bkn_export.export.feeds.check_feeds`); returns them in graph order.

    Raises ``BKNInputError`` naming the input: unknown or missing name, wrong dtype, rank or
    fixed dim, NaN/Inf (and, with ``allow_empty=False``, no elements).
    """
    from bkn_export.export.feeds import check_feeds as check

    return check(specs, feeds, allow_empty=allow_empty)


def nonfinite_count(array: np.ndarray) -> int:
    """How many NaN/Inf elements ``array`` holds (0 for integer and bool arrays; bfloat16 counted)."""
    from bkn_export.export.feeds import nonfinite_count as count

    return count(array)


def load_onnx_file(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (:func:`bkn_export.export.io.load_onnx_file`).

    Raises ``ModelFileError`` naming the file and what is wrong: missing, a directory, empty,
    not a model, an external-data file missing or truncated. Not a check of the graph.
    """
    from bkn_export.export.io import load_onnx_file as load

    return load(path, load_external_data=load_external_data)


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` atomically, tensors above the default threshold as external data.

    :func:`bkn_export.export.io.save_onnx`; raises ``OutputWriteError`` naming the path.
    """
    from bkn_export.export.io import save_onnx as save

    return Path(save(model, path))


def bkn_layers(model: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every BKN layer of an ``nn.Module``."""
    from bkn_export.convert import bkn_layers as layers

    return list(layers(model))


def train_bkn_layers(model: Any) -> str | None:
    """BKN layers of ``model`` in train mode, their children (a norm-act's ``drop``, ``act``) untouched, except the
    layers frozen in eval mode inside a training model, which stay as the model runs them.

    :func:`bkn_export.module_modes.train_layers_only` on the layers the training-mode export switches
    (:func:`bkn_export.module_modes.frozen_layers`). Returns a note naming the frozen layers, or None.
    """
    from bkn_export.module_modes import frozen_layers, frozen_layers_note, train_layers_only

    layers = bkn_layers(model)
    frozen = frozen_layers(model, layers)  # in layer order
    model.eval()
    train_layers_only(layer for name, layer in layers if name not in frozen)
    return frozen_layers_note(frozen) if frozen else None


def running_statistics_io(model: Any, input_names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The running statistics of a ``running_stats_io=True`` training export, on ``model``'s side.

    For every BKN layer of ``model`` whose ``<layer>.running_mean`` and ``<layer>.running_var`` are
    among ``input_names`` (:func:`bkn_export.export.training.running_stat_names`): (graph input name →
    the layer's buffer, graph output name ``<layer>.running_*_out`` → the same buffer). The buffers
    themselves, not copies: load the inputs into them before the train-mode forward, read the outputs
    after it (the forward updates them as the graph does). Both empty for other files."""
    from bkn_export.export.training import running_stat_names

    names = set(input_names)
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for name, layer in bkn_layers(model):
        mean_in, var_in, mean_out, var_out = running_stat_names(name)
        if layer.running_mean is None or mean_in not in names or var_in not in names:
            continue
        inputs.update({mean_in: layer.running_mean, var_in: layer.running_var})
        outputs.update({mean_out: layer.running_mean, var_out: layer.running_var})
    return inputs, outputs


def kept_modes(model: Any) -> AbstractContextManager[Any]:
    """Context manager: every submodule's train/eval flag restored after the block (:mod:`bkn_export.module_modes`)."""
    from bkn_export.module_modes import kept_modes as kept

    return kept(model)


def export_onnx(model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> Any:
    """:func:`bkn_export.export.export_onnx` (both modes)."""
    from bkn_export.export import export_onnx as export

    return export(model, example_inputs, path, **options)


def plugin_identity() -> tuple[str, str, str]:
    """(name, version, namespace) under which the TensorRT plugin registers its creator."""
    return op_spec.PLUGIN_NAME, op_spec.PLUGIN_VERSION, op_spec.PLUGIN_NAMESPACE


def plugin_nodes(model: Any) -> list[Any]:
    """The nodes of ``model`` that TensorRT must run as our plugin."""
    from bkn_export.tensorrt_plugin import plugin_nodes as nodes

    return list(nodes(model))


def prepare_model_for_plugin(model: Any) -> Any:
    """A copy of ``model`` without the op's local function, so the parser picks the plugin."""
    from bkn_export.tensorrt_plugin import prepare_model_for_plugin as prepare

    return prepare(model)


def find_plugin_library(path: str | os.PathLike[str] | None = None) -> Path:
    """Our TensorRT plugin library (``$BKN_TENSORRT_PLUGIN``, then the default build folders)."""
    from bkn_export.tensorrt_plugin import find_plugin_library as find

    return Path(find(path))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically through the shared writer (:mod:`bkn_export.atomic`).

    The temporary is named with the PID, an existing file keeps its mode, a symlink at
    ``path`` is replaced (not written through). Raises ``OutputWriteError`` (an ``OSError``,
    exit 2 in the CLI) naming the path and the reason, e.g. a full disk; no partial file.
    """
    from bkn_export.atomic import write_bytes_atomic as write

    return Path(write(path, data))


def create_directories(directory: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` through the shared writer's rule (:func:`bkn_export.atomic.create_directories`): a directory
    that cannot be made raises ``OutputWriteError`` naming it."""
    from bkn_export.atomic import create_directories as create

    return create(directory)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``text`` in UTF-8, through the shared writer (:func:`bkn_export.atomic.write_text_atomic`: a non-UTF-8 file
    name in it is written as its own bytes)."""
    from bkn_export.atomic import write_text_atomic as write

    return Path(write(path, text))


def copy_model(model: Any) -> Any:
    """A deep copy of the reference model that survives tensors it keeps from an earlier forward
    (:func:`bkn_export.copying.copy_module`)."""
    from bkn_export.copying import copy_module

    return copy_module(model)
