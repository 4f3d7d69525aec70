"""``save_onnx``: the one writer of ONNX files, atomic for the model and its external data as a pair.

A reader (or a concurrent writer) never gets a model with another write's data:

1. When the model's tensors hold more than ``external_data_threshold`` bytes (protobuf
   cannot hold more than 2 GiB in one file), every tensor of at least 1 KiB (smaller
   ones, such as shape constants that runtimes must read while building a session, stay
   inline, as ``onnx.save`` does) goes to a data file under a name **unique to this
   write**, ``<model file name>.<pid>-<random>.data`` (e.g. ``model.onnx.4242-9f3a1c0b2e7d.data``),
   each tensor at a 4 KiB-aligned offset, recorded as ONNX external data with a
   ``location`` relative to the model's directory. The data file is fsync-ed in full before
   anything refers to it.
2. The model is written through :func:`bkn_export.atomic.atomic_writer` (a temporary
   beside it, fsync, ``os.replace``): renaming it into place is the single step that
   publishes the new pair.
3. Then the data files of earlier writes that the model now at the path does not refer
   to are removed (no stale ``.data``, also after an export without external data),
   except those of a writer process that is still alive (it may be about to publish its
   own pair) — they go on a later write, once that process has ended. The old fixed name
   ``<model>.data`` of earlier versions is removed the same way.

A reader that opened the old model just before step 3 may then fail loudly on a missing
data file (re-open the path); it never reads one write's model with another's data.
Writers in one process are serialised by a lock. A writer killed mid-write leaves a
temporary model (``.<name>.<pid>-<random>.tmp``) and possibly an unreferenced data file;
the next write to the same path removes both (their PID is dead). The data file gets the
permission bits of the model it accompanies (a replaced model's mode, else 0666 & ~umask).
Errors: :class:`~bkn_export.errors.OutputWriteError` (path + reason; a full disk, a
read-only directory, a directory in the way) — the file at the path is then unchanged and
nothing of this write is left; :class:`~bkn_export.errors.OptionError` for a negative or
non-integer threshold.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import set_external_data

from bkn_export.atomic import atomic_writer, check_writable, existing_mode, new_file, pid_alive
from bkn_export.errors import ModelFileError, OptionError

__all__ = [
    "DEFAULT_EXTERNAL_DATA_THRESHOLD",
    "check_external_data_threshold",
    "check_writable",
    "data_file_name",
    "load_onnx_file",
    "model_tensors",
    "save_onnx",
    "tensor_bytes",
]

#: Models whose tensors exceed this many bytes are saved with external data.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
#: Tensors smaller than this stay inline even in an external-data model (as onnx does).
_INLINE_TENSOR_BYTES = 1024
_ALIGNMENT = 4096
_SAVE_LOCK = threading.Lock()


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


def check_external_data_threshold(threshold: object) -> int:
    """``threshold`` if it is an int >= 0 (bytes), else :class:`OptionError` saying what is expected."""
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise OptionError(
            f"external_data_threshold must be a whole number of bytes >= 0 (0 puts every tensor of 1 KiB or "
            f"more in the data file), got {threshold!r}"
        )
    return threshold


def data_file_name(model_name: str) -> str:
    """A data file name unique to one write of ``model_name``: ``<model_name>.<pid>-<random>.data``."""
    return f"{model_name}.{os.getpid()}-{secrets.token_hex(6)}.data"


def _data_pattern(model_name: str) -> re.Pattern[str]:
    """Data files of ``model_name``: this version's unique names, and the fixed ``<name>.data`` of earlier ones."""
    return re.compile(rf"{re.escape(model_name)}\.(?:(?P<pid>\d+)-[0-9a-f]+\.)?data")


def _externalize(model: onnx.ModelProto, data_name: str, handle: BinaryIO, min_bytes: int) -> None:
    """Move ``model``'s (a copy's) raw tensors of ``min_bytes`` or more into ``handle``, recorded as ``data_name``."""
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


def _referenced_locations(path: Path) -> set[str] | None:
    """The external-data locations the model file at ``path`` refers to; None if it cannot be read."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # whatever is at the path now: do not delete what it may use
        return None
    locations: set[str] = set()
    for tensor in model_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return locations


def _remove_unreferenced_data(target: Path) -> list[Path]:
    """Remove data files of ``target`` that its current model does not use and no live writer may publish."""
    referenced = _referenced_locations(target)
    if referenced is None:
        return []
    pattern = _data_pattern(target.name)
    own = os.getpid()
    removed: list[Path] = []
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or entry.name in referenced:
            continue
        pid = int(match["pid"]) if match["pid"] else None
        if pid is not None and pid != own and pid_alive(pid):
            continue  # another live writer may rename its model (referring to it) next
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return removed


def save_onnx(
    model_proto: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write ``model_proto`` to ``path``: readers see the old model with its data, or the new one with its own.

    Above ``external_data_threshold`` bytes of tensors (strictly), tensors of 1 KiB or more
    go to ``<name>.<pid>-<random>.data`` beside the model (see the module docstring for the
    protocol, permissions and cleanup). ``model_proto`` itself is not modified. Returns the
    path. Raises :class:`OutputWriteError` (nothing written, the old file kept) or
    :class:`OptionError` (bad threshold).
    """
    threshold = check_external_data_threshold(external_data_threshold)
    target = check_writable(path)
    with _SAVE_LOCK:
        to_save = model_proto
        data_path: Path | None = None
        if tensor_bytes(model_proto) > threshold:
            data_name = data_file_name(target.name)
            data_path = target.parent / data_name
            to_save = onnx.ModelProto()
            to_save.CopyFrom(model_proto)
            with new_file(data_path, existing_mode(target), label=f"{target} (external data {data_name})") as handle:
                _externalize(to_save, data_name, handle, _INLINE_TENSOR_BYTES)
        try:
            with atomic_writer(target) as handle:
                handle.write(to_save.SerializeToString())
        except BaseException:
            if data_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    data_path.unlink()
            raise
        _remove_unreferenced_data(target)
    return target


def _external_locations(model: onnx.ModelProto) -> dict[str, int]:
    """External-data file name -> the end offset the model reads up to in it (0: unknown length)."""
    ends: dict[str, int] = {}
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        ends[location] = max(ends.get(location, 0), end)
    return ends


def _names_a_file_beside(file: Path, location: str) -> bool:
    """Whether an external-data ``location`` is a relative path to a file under ``file``'s folder.

    An empty location, ``.``, an absolute path or one that climbs out with ``..`` names no such
    file (onnx itself refuses to read them).
    """
    relative = Path(location)
    if not location or relative.is_absolute() or ".." in relative.parts:
        return False
    return not (file.parent / relative).is_dir()


def load_onnx_file(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file; :class:`ModelFileError` says what is actually wrong.

    Distinguishes a missing path, a directory, an empty file, a file that is not (or no
    longer) an ONNX model, and a model whose external-data file is missing or shorter than
    the model says (each named, with what to do). Not a check of the graph (onnx.checker).
    """
    file = Path(path)
    if file.is_dir():
        raise ModelFileError(f"{file} is a directory, not an ONNX file; give the .onnx file inside it")
    if not file.exists():
        raise ModelFileError(f"ONNX file {file} does not exist (export one with `bkn export` or export_onnx)")
    if file.stat().st_size == 0:
        raise ModelFileError(f"ONNX file {file} is empty; re-export it")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and onnx's own: the bytes are not a model
        raise ModelFileError(
            f"ONNX file {file} cannot be parsed ({type(error).__name__}: {error}); it is truncated or not an ONNX "
            "model. Re-export it."
        ) from error
    for location, end in _external_locations(model).items():
        data = file.parent / location
        if not _names_a_file_beside(file, location):
            raise ModelFileError(
                f"ONNX file {file} keeps weights in external data at location {location!r}, which names no file in "
                f"the model's folder {file.parent} (an external-data location is a relative file name there); the "
                "model is malformed: re-export it"
            )
        if not data.is_file():
            raise ModelFileError(
                f"ONNX file {file} keeps its weights in the external-data file {location}, which is missing from "
                f"{file.parent}; copy it together with the model, or re-export"
            )
        if data.stat().st_size < end:
            raise ModelFileError(
                f"the external-data file {data} of {file} holds {data.stat().st_size} bytes but the model reads up to "
                f"byte {end}: it is truncated or belongs to another export; re-export"
            )
    if load_external_data:
        from onnx.external_data_helper import load_external_data_for_model

        try:
            load_external_data_for_model(model, str(file.parent))
        except Exception as error:  # the data file vanished or changed since the check above
            raise ModelFileError(
                f"cannot read the external data of {file}: {error}; re-export or open it again"
            ) from error
    return model
