"""Inputs and outputs in the files Polygraphy reads and writes, without importing Polygraphy.

Polygraphy's JSON (``polygraphy/json/serde.py``, ``polygraphy/comparator/struct.py``,
checked against 0.53.6 in the tests) is plain JSON with a type marker:

* an array: ``{"array": base64 of np.save(array, allow_pickle=False), "polygraphy_class": "ndarray"}``;
* inputs (``polygraphy run --save-inputs`` / ``--load-inputs``): a list of feed dicts
  ``[{input name: array}, ...]``, one per iteration, in one file; or a folder (a path
  without an extension) of per-iteration files ``0000000000.json``, ``0000000001.json``, ...
  each holding one feed dict (or a list of them);
* outputs (``--save-outputs`` / ``--load-outputs``): a ``RunResults``:
  ``{"lst": [[runner name, [IterationResult, ...]], ...], "polygraphy_class": "RunResults"}``
  with ``IterationResult = {"outputs": {name: {"values": array, "polygraphy_class": "LazyArray"}},
  "runtime": seconds, "runner_name": name, "polygraphy_class": "IterationResult"}``; also in
  the folder form, one ``RunResults`` per iteration file.

Reading accepts what Polygraphy accepts for arrays (base64 ``np.save`` bytes, an ``.npz``
payload, the legacy type marker). Writing goes through the shared atomic writer. No
pickle is ever loaded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime._bkn import create_directories, write_text_atomic
from runtime.errors import BKNInputError, SavedDataError

__all__ = [
    "ITERATION_FILE_WIDTH",
    "decode_array",
    "encode_array",
    "load_inputs",
    "load_outputs",
    "save_inputs",
    "save_outputs",
]

TYPE_MARKER = "polygraphy_class"
_LEGACY_MARKER = "polygraphy_serialized_json_type"
#: Zero-padded index width of per-iteration file names (``0000000000.json``), as Polygraphy.
ITERATION_FILE_WIDTH = 10

Feed = dict[str, np.ndarray]


def encode_array(array: np.ndarray) -> dict[str, str]:
    """An array as Polygraphy encodes it; an object array (ONNX strings) is refused: the format stores no pickles."""
    array = np.asarray(array)
    if array.dtype.kind == "O":
        raise BKNInputError(
            "an array of Python objects (ONNX string tensors) cannot be saved in Polygraphy's JSON, which stores "
            "arrays without pickling: check string inputs / outputs through the Python API (run_parity)"
        )
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return {"array": base64.b64encode(buffer.getvalue()).decode("ascii"), TYPE_MARKER: "ndarray"}


def decode_array(data: Mapping[str, Any], where: str = "file") -> np.ndarray:
    """The array of an encoded ``ndarray`` (base64 ``np.save`` bytes or an ``.npz`` payload)."""
    text = data.get("array")
    if not isinstance(text, str):
        raise SavedDataError(f"{where}: an ndarray entry has no 'array' string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = text.encode("latin-1", errors="strict")  # Polygraphy's pre-base64 encoding
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as error:
        raise SavedDataError(f"{where}: an array cannot be decoded ({type(error).__name__}: {error})") from error
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        if not loaded.files:
            raise SavedDataError(f"{where}: an array payload is an empty .npz archive")
        return np.asarray(loaded[loaded.files[0]])


def _decoder(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> Any:
        data = dict(pairs)
        kind = data.get(TYPE_MARKER)
        for legacy in ("__polygraphy_encoded_ndarray", "__polygraphy_encoded_LazyArray"):
            if data.get(legacy) == _LEGACY_MARKER:
                kind = legacy.removeprefix("__polygraphy_encoded_")
        if kind is None:
            return data
        if kind == "ndarray":
            return decode_array(data, where)
        if kind in ("LazyArray", "LazyNumpyArray"):
            return data["values"]
        if kind == "IterationResult":
            return {
                "outputs": dict(data["outputs"]),
                "runner_name": data.get("runner_name"),
                "runtime": data.get("runtime"),
            }
        if kind == "RunResults":
            return {"runs": [(str(name), list(iterations)) for name, iterations in data["lst"]]}
        raise SavedDataError(f"{where}: holds a Polygraphy {kind!r}, not inputs or outputs")

    return hook


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SavedDataError(f"{path}: cannot be read ({type(error).__name__}: {error})") from error
    try:
        return json.loads(text, object_pairs_hook=_decoder(str(path)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:  # ValueError: a malformed pair
        raise SavedDataError(f"{path}: not a Polygraphy JSON file ({type(error).__name__}: {error})") from error


def _iteration_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.json"))
    if not files:
        raise SavedDataError(f"{path}: a folder of per-iteration files, but it holds no *.json file")
    return files


def _feed(value: Any, where: str) -> Feed:
    if not isinstance(value, dict) or not all(isinstance(v, np.ndarray) for v in value.values()):
        raise SavedDataError(f"{where}: expected a feed dict {{input name: array}}, got {type(value).__name__}")
    return {str(name): array for name, array in value.items()}


def load_inputs(path: str | os.PathLike[str]) -> list[Feed]:
    """Input sets from ``.npz`` (one set), Polygraphy inputs JSON (a list of feed dicts), or a folder of them."""
    source = Path(path)
    if not source.exists():
        raise SavedDataError(f"inputs file {source} does not exist")
    if source.is_dir():
        feeds: list[Feed] = []
        for file in _iteration_files(source):
            value = _read_json(file)
            feeds.extend(_feed(v, str(file)) for v in (value if isinstance(value, list) else [value]))
        return feeds
    if source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as data:
                return [{key: np.asarray(data[key]) for key in data.files}]
        except Exception as error:  # BadZipFile, ValueError (a pickled entry), OSError
            raise SavedDataError(
                f"inputs file {source}: cannot read it as an .npz archive ({type(error).__name__}: {error})"
            ) from error
    if source.suffix != ".json":
        raise SavedDataError(
            f"inputs file {source}: expected .npz (np.savez, keyed by input name), Polygraphy inputs .json, "
            "or a folder of per-iteration .json files"
        )
    value = _read_json(source)
    return [_feed(v, str(source)) for v in (value if isinstance(value, list) else [value])]


def save_inputs(path: str | os.PathLike[str], feeds: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Write input sets as ``polygraphy run --load-inputs`` reads them (a folder when ``path`` has no extension)."""
    target = Path(path)
    encoded = [{name: encode_array(array) for name, array in feed.items()} for feed in feeds]
    if target.suffix:
        create_directories(target.parent)
        return write_text_atomic(target, json.dumps(encoded, indent=4) + "\n")
    create_directories(target)
    for index, feed in enumerate(encoded):
        write_text_atomic(target / f"{index:0{ITERATION_FILE_WIDTH}d}.json", json.dumps(feed, indent=4) + "\n")
    _remove_stale_iterations(target, len(encoded))
    return target


def _remove_stale_iterations(folder: Path, count: int) -> None:
    """Remove the per-iteration files of an earlier, longer save into ``folder`` (index ≥ ``count``): a reader
    takes every ``*.json`` there, and a stale ``0000000002.json`` would be compared as a third input set or
    iteration. Other files are left alone. Each file is written atomically, the folder is not: an interrupted
    save can leave a mix of two runs there (the single-file form replaces its file as a unit)."""
    for stale in folder.glob("*.json"):
        name = stale.stem
        if len(name) == ITERATION_FILE_WIDTH and name.isdigit() and int(name) >= count:
            stale.unlink(missing_ok=True)


def _run_results(runner: str, iterations: Sequence[Mapping[str, np.ndarray]], seconds: Sequence[float]) -> dict:
    results = [
        {
            "outputs": {
                name: {"values": encode_array(array), TYPE_MARKER: "LazyArray"} for name, array in outputs.items()
            },
            "runtime": float(elapsed),
            "runner_name": runner,
            TYPE_MARKER: "IterationResult",
        }
        for outputs, elapsed in zip(iterations, seconds)
    ]
    return {"lst": [[runner, results]], TYPE_MARKER: "RunResults"}


def save_outputs(
    path: str | os.PathLike[str],
    iterations: Sequence[Mapping[str, np.ndarray]],
    runner: str = "pytorch",
    seconds: Sequence[float] | None = None,
) -> Path:
    """Write one runner's outputs as a Polygraphy ``RunResults`` (a folder when ``path`` has no extension)."""
    target = Path(path)
    times = list(seconds) if seconds is not None else [0.0] * len(iterations)
    if target.suffix:
        create_directories(target.parent)
        return write_text_atomic(target, json.dumps(_run_results(runner, iterations, times), indent=4) + "\n")
    create_directories(target)
    for index, (outputs, elapsed) in enumerate(zip(iterations, times)):
        data = _run_results(runner, [outputs], [elapsed])
        write_text_atomic(target / f"{index:0{ITERATION_FILE_WIDTH}d}.json", json.dumps(data, indent=4) + "\n")
    _remove_stale_iterations(target, len(iterations))
    return target


def load_outputs(path: str | os.PathLike[str]) -> dict[str, list[Feed]]:
    """Runner name -> per-iteration outputs, from a ``RunResults`` file or a folder of per-iteration ones."""
    source = Path(path)
    if not source.exists():
        raise SavedDataError(f"outputs file {source} does not exist")
    files = _iteration_files(source) if source.is_dir() else [source]
    runs: dict[str, list[Feed]] = {}
    for file in files:
        value = _read_json(file)
        if not isinstance(value, dict) or "runs" not in value:
            raise SavedDataError(f"{file}: not a Polygraphy RunResults file (polygraphy run --save-outputs)")
        for runner, iterations in value["runs"]:
            for iteration in iterations:
                if not isinstance(iteration, dict) or "outputs" not in iteration:
                    raise SavedDataError(f"{file}: runner {runner!r} has an entry that is not an IterationResult")
                runs.setdefault(runner, []).append(_feed(iteration["outputs"], str(file)))
    if not runs:
        raise SavedDataError(f"{source}: holds no runner's outputs")
    return runs
