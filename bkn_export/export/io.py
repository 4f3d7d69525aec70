"""Atomic ONNX writes: temporary files beside the target, then ``os.replace``.

A reader never sees a half-written model: the model (and its external-data file, if
any) are written in full under unique temporary names in the target's directory,
flushed to disk, and renamed over the targets (data first, then the model that refers
to it). On any failure the temporaries are removed and :class:`ExportError` names the
path; an existing target is left as it was.

External data: when the model's tensors hold more than ``external_data_threshold``
bytes (protobuf cannot hold more than 2 GiB in one file), every tensor of at least
1 KiB is stored (smaller ones, such as shape constants that runtimes must read while
building a session, always stay inline, as ``onnx.save``'s default does) in ``<model file name>.data`` beside the
model, each at a 4 KiB-aligned offset, as ONNX external data (``location`` relative to
the model's directory).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data

from bkn_export.errors import ExportError

__all__ = ["DEFAULT_EXTERNAL_DATA_THRESHOLD", "check_writable", "model_tensors", "save_model_atomic", "tensor_bytes"]

#: Models whose tensors exceed this many bytes are saved with external data.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
#: Tensors smaller than this stay inline even in an external-data model (as onnx does).
_INLINE_TENSOR_BYTES = 1024
_ALIGNMENT = 4096


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: object) -> Iterator[onnx.TensorProto]:
    for node in nodes:  # type: ignore[attr-defined]
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for graph in attribute.graphs:
                yield from _graph_tensors(graph)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model``: initializers and node attributes, in subgraphs and functions too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data held inline (raw_data) in ``model``."""
    return sum(len(tensor.raw_data) for tensor in model_tensors(model))


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _externalize(model: onnx.ModelProto, data_name: str, data_path: Path, min_bytes: int) -> None:
    """Move large raw tensors of ``model`` (a copy) into ``data_path``, recorded as ``data_name``."""
    with open(data_path, "wb") as handle:
        offset = 0
        for tensor in model_tensors(model):
            if len(tensor.raw_data) < min_bytes or tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            padding = (-offset) % _ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            raw = tensor.raw_data
            handle.write(raw)
            set_external_data(tensor, location=data_name, offset=offset, length=len(raw))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(raw)
        handle.flush()
        os.fsync(handle.fileno())


def _temporary(directory: Path, name: str) -> Path:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    return Path(tmp_name)


def check_writable(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if a file can be created there, else :class:`ExportError` naming it."""
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise ExportError(f"cannot write {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ExportError(f"cannot write {target}: directory {directory} is not writable")
    if target.is_dir():
        raise ExportError(f"cannot write {target}: it is a directory; give a file name such as model.onnx")
    return target


def save_model_atomic(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD
) -> Path:
    """Write ``model`` to ``path`` so that readers see either the old file or the whole new one.

    Above ``external_data_threshold`` bytes of tensors, tensors go to ``<name>.data``
    beside the model (see the module docstring). ``model`` itself is not modified.
    Raises :class:`ExportError` naming the path when its directory is missing or not
    writable, or when writing fails; no temporary file is left behind.
    """
    if external_data_threshold < 0:
        raise ValueError(f"external_data_threshold must be >= 0, got {external_data_threshold}")
    target = check_writable(path)
    directory = target.parent
    external = tensor_bytes(model) > external_data_threshold
    data_name = target.name + ".data"
    temporaries: list[Path] = []
    try:
        tmp_model = _temporary(directory, target.name)
        temporaries.append(tmp_model)
        to_save = model
        if external:
            tmp_data = _temporary(directory, data_name)
            temporaries.append(tmp_data)
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            _externalize(to_save, data_name, tmp_data, _INLINE_TENSOR_BYTES)
        _fsync_write(tmp_model, to_save.SerializeToString())
        if external:
            os.replace(tmp_data, directory / data_name)
        os.replace(tmp_model, target)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot write {target}: {error}") from error
    finally:
        for leftover in temporaries:
            if leftover.exists():
                leftover.unlink()
    return target
