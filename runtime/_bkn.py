"""The one place where ``runtime`` reaches into ``bkn_export``.

``runtime`` checks ONNX files against PyTorch models in general; what it needs to know
about Batch Kalman Normalization is small and lives here, so that a change on the
``bkn_export`` side is a change to this file only:

* the op contract (:data:`OP_DOMAIN`, :func:`is_op_node`): to detect a training-mode
  export and to find the op's nodes;
* the BKN layers of a model (:func:`bkn_layers`): the training reference runs exactly
  them in train mode, as the training-mode export does;
* the export call (:func:`export_onnx`) for :func:`runtime.assert_parity`;
* the TensorRT plugin helpers (:func:`plugin_nodes`, :func:`prepare_model_for_plugin`,
  :func:`find_plugin_library`, plugin name / version / namespace);
* the shared atomic writer (:func:`write_bytes_atomic`, :func:`write_text_atomic`);
* the exceptions both packages raise (bad input, unreadable model file, a runtime that
  cannot load a model): one hierarchy, so the CLI maps every one of them to exit 2.

Everything heavy (torch, onnx) is imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bkn_export.errors import BKNError, BKNInputError, ModelFileError, PluginLibraryNotFoundError, RuntimeLoadError

__all__ = [
    "OP_DOMAIN",
    "OP_TYPE",
    "BKNError",
    "BKNInputError",
    "ModelFileError",
    "PluginLibraryNotFoundError",
    "RuntimeLoadError",
    "bkn_layers",
    "export_onnx",
    "find_plugin_library",
    "is_op_node",
    "plugin_identity",
    "plugin_nodes",
    "prepare_model_for_plugin",
    "write_bytes_atomic",
    "write_text_atomic",
]

#: The custom domain and op type of a training-mode export (``bkn_export.export.op_spec``);
#: spelled here so that detecting a mode does not import the export package.
OP_DOMAIN = "ai.bkn"
OP_TYPE = "BatchKalmanNorm"


def is_op_node(node: Any) -> bool:
    """Whether an ONNX NodeProto is an ``ai.bkn::BatchKalmanNorm`` node."""
    return bool(node.domain == OP_DOMAIN and node.op_type == OP_TYPE)


def bkn_layers(model: Any) -> list[tuple[str, Any]]:
    """(qualified name, module) of every BKN layer of an ``nn.Module``."""
    from bkn_export.convert import bkn_layers as layers

    return list(layers(model))


def export_onnx(model: Any, example_inputs: Any, path: str | os.PathLike[str], **options: Any) -> Any:
    """:func:`bkn_export.export.export_onnx` (both modes)."""
    from bkn_export.export import export_onnx as export

    return export(model, example_inputs, path, **options)


def plugin_identity() -> tuple[str, str, str]:
    """(name, version, namespace) under which the TensorRT plugin registers its creator."""
    from bkn_export.export import op_spec

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


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))
