"""Atomic ONNX writes: a temporary file beside the target, then ``os.replace``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from bkn_export.errors import ExportError

__all__ = ["DEFAULT_EXTERNAL_DATA_THRESHOLD", "save_model_atomic"]

#: Models whose initializers exceed this many bytes are saved with external data
#: (protobuf cannot hold more than 2 GiB in one file).
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2 * 1024**3


def _initializer_bytes(model: onnx.ModelProto) -> int:
    total = sum(len(t.raw_data) for t in model.graph.initializer)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                total += len(attribute.t.raw_data)
    return total


def save_model_atomic(
    model: onnx.ModelProto, path: str | os.PathLike[str], external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD
) -> Path:
    """Write ``model`` to ``path`` so that readers see either nothing or the whole file.

    Above ``external_data_threshold`` bytes of initializers, tensors go to
    ``<name>.data`` beside the model (written first, also atomically). Raises
    :class:`ExportError` naming the path when the directory is not writable.
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise ExportError(f"cannot write {target}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise ExportError(f"cannot write {target}: directory {directory} is not writable")
    external = _initializer_bytes(model) > external_data_threshold
    data_name = target.name + ".data"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_data = directory / f".{data_name}.tmp"
    try:
        if external:
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model)
            # Save to the temp name with the *final* data location recorded in the model,
            # by writing under a temp data file and renaming it afterwards.
            onnx.save_model(
                to_save,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=tmp_data.name,
                size_threshold=1024,
            )
            for tensor in _external_tensors(to_save):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(to_save, str(tmp), save_as_external_data=False)
            os.replace(tmp_data, directory / data_name)
        else:
            onnx.save_model(model, str(tmp))
        os.replace(tmp, target)
    except OSError as error:
        raise ExportError(f"cannot write {target}: {error}") from error
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()
    return target


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
