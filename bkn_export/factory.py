"""Build a model from a ``pkg.module:factory`` spec and an optional checkpoint.

Shared by ``bkn export`` and ``bkn parity``: the same spec + checkpoint always gives the
same model. The spec names an importable module (or a ``.py`` file) and a callable in
it that returns an ``nn.Module``; the checkpoint (``torch.save``) is a state dict, or a
dict holding one under ``"state_dict"`` or ``"model"``, loaded strictly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bkn_export.errors import BKNError, CheckpointError, FactoryError

__all__ = ["load_checkpoint", "load_factory", "load_model", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, str]:
    """'pkg.module:factory' -> ('pkg.module', 'factory'); the attribute may be dotted ('mod:Cls.build')."""
    module, sep, attribute = spec.rpartition(":")
    if not sep or not module or not attribute:
        raise FactoryError(
            f"model spec {spec!r} is not of the form 'pkg.module:factory' (or 'path/to/file.py:factory')"
        )
    return module, attribute


def _import_failure(what: str, error: BaseException) -> FactoryError:
    """A FactoryError for a module that raised while it was imported (syntax error, its own exception)."""
    if isinstance(error, SyntaxError):
        where = f"{error.filename}, line {error.lineno}" if error.lineno else str(error.filename)
        return FactoryError(f"cannot import {what}: SyntaxError at {where}: {error.msg}")
    return FactoryError(
        f"cannot import {what}: importing it raised {type(error).__name__}: {error}. Fix the module (or its "
        "dependencies) so that it imports"
    )


def _import(module: str) -> Any:
    if module.endswith(".py"):
        path = Path(module)
        if path.is_dir():
            raise FactoryError(f"model spec file {module} is a directory, not a .py file")
        if not path.is_file():
            raise FactoryError(f"model spec file {module} does not exist")
        name = f"_bkn_factory_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise FactoryError(f"cannot load {module} as a Python module")
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        try:
            spec.loader.exec_module(loaded)
        except Exception as error:  # the user's file may raise anything at import
            del sys.modules[name]
            raise _import_failure(f"model spec file {module}", error) from error
        return loaded
    _search_current_directory()
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise FactoryError(
            f"cannot import module {module!r} of the model spec: {error}. Is the package installed, or the "
            "module in the current directory (or on PYTHONPATH)?"
        ) from error
    except Exception as error:  # the module itself raised while importing
        raise _import_failure(f"module {module!r} of the model spec", error) from error


def _search_current_directory() -> None:
    """Put the current directory at the end of ``sys.path`` (``bkn export mynet:factory`` from the folder holding
    ``mynet.py``: the console script, unlike ``python -m``, does not put it there). Last, so that it never shadows an
    installed package; kept, since the factory may import its own siblings when it is called (a review, 2026-12-07)."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``spec``; raises :class:`FactoryError` if absent or not callable."""
    module_name, attribute = parse_spec(spec)
    target: Any = _import(module_name)
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FactoryError(f"{module_name!r} has no attribute {attribute!r} (model spec {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise FactoryError(f"{spec!r} names a {type(target).__name__}, not a callable that returns an nn.Module")
    return target  # type: ignore[no-any-return]


def load_checkpoint(checkpoint: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The state dict in ``checkpoint`` (plain, or under 'state_dict' / 'model')."""
    path = Path(checkpoint)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file saved with torch.save")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a device, pipe or socket: give the file saved with torch.save")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): not a file saved with torch.save")
    _check_zip_checksums(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises pickle/zip/runtime errors
        text = str(error).strip()
        if "weights only load failed" in text.lower():
            # torch's message advises retrying with weights_only=False, which can run arbitrary code: not repeated.
            cause = text.partition("WeightsUnpickler error:")[2].strip().split("\n\n")[0].strip()
            text = (
                f"the safe (weights-only) load refused it ({cause or 'unreadable content'}): it is corrupt, "
                "or holds objects other than tensors and plain containers"
            )
        elif isinstance(error, (EOFError, struct.error)) or "unexpected eof" in text.lower():
            raise CheckpointError(
                f"checkpoint {path} is truncated: its content ends early, at {path.stat().st_size} bytes: {_TRUNCATED}"
            ) from error
        else:
            text = (text.splitlines() or [""])[0].rstrip(". ")
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(error).__name__}: {text}. Save it with "
            "torch.save(model.state_dict(), path)."
        ) from error
    if isinstance(content, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(content.get(key), Mapping):
                return content[key]  # type: ignore[no-any-return]
        return content
    raise CheckpointError(f"checkpoint {path} holds a {type(content).__name__}, not a state dict")


#: What a checkpoint that ends early is, and what to do.
_TRUNCATED = "it was partly written or cut off in transfer. Nothing was loaded: save it again, or copy the whole file"

#: The first bytes of a zip file's first local header: how ``torch.load`` tells its zip format from the legacy one
#: (``zipfile.is_zipfile`` looks for an end record anywhere near the end, which a legacy file's raw tensor bytes can
#: hold by chance).
_ZIP_MAGIC = b"PK\x03\x04"


def _check_zip_checksums(path: Path) -> None:
    """CheckpointError where a ``torch.save`` (zip) file's stored CRC-32 of a record disagrees with its bytes.

    ``torch.load`` does not verify them: a file damaged on disk or in transfer loaded with exit 0, some weights
    changed (a 64-byte corruption changed 17 conv weights by up to 3.5e3). One more read of the file. Not checked:
    the legacy (non-zip) format, which has no checksums, and a record whose stored CRC is 0, which is what
    ``torch.save`` writes for every record under ``torch.utils.serialization.config.save.compute_crc32 = False``
    (an empty record's CRC is 0 too; any other content has that CRC with probability 2⁻³²). A zip file whose
    end-of-archive record does not read (cut off) is refused as truncated."""
    with path.open("rb") as handle:
        if handle.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
            return
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        # torch.load would say "failed finding central directory ... an internal miniz error".
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged: it begins as a torch.save (zip) file of "
            f"{path.stat().st_size} bytes, but its end-of-archive record does not read: {_TRUNCATED}"
        ) from error
    damaged: str | None = None
    try:
        with archive:
            for record in archive.infolist():
                if record.CRC == 0:
                    continue
                try:
                    with archive.open(record) as data:
                        while data.read(1 << 20):  # the reader compares the CRC-32 at the record's end
                            pass
                except zipfile.BadZipFile as error:
                    if "CRC" not in str(error):
                        raise
                    damaged = record.filename
                    break
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupt: its zip records do not read ({error})") from error
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: the bytes of record {damaged!r} do not match their stored checksum "
            "(damaged on disk or in transfer, or partly written); nothing was loaded"
        )


#: A module's extra state (BKN: its wiring record and options, as a uint8 tensor of JSON text). Its length is not
#: a shape: the layer's own loader compares its content (and warns where an option differs).
_EXTRA_STATE = "_extra_state"


def _check_shapes(model: nn.Module, state: Mapping[str, Any], checkpoint: str, spec: str) -> None:
    """CheckpointError naming the tensors whose shapes differ (checked before anything else reads the state)."""
    own = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)}, model {tuple(own[key].shape)}"
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and isinstance(own.get(key), torch.Tensor)
        and value.shape != own[key].shape
        and key.rpartition(".")[2] != _EXTRA_STATE
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {checkpoint} does not fit the model built by {spec!r}: {len(mismatched)} tensor(s) differ "
            f"in shape ({'; '.join(mismatched[:3])}{'; ...' if len(mismatched) > 3 else ''}). Build the model with "
            "the same factory arguments as when it was saved."
        )


def load_model(spec: str, checkpoint: str | None = None, **factory_kwargs: Any) -> nn.Module:
    """Call the factory named by ``spec`` with ``factory_kwargs``; load ``checkpoint`` strictly.

    Raises :class:`FactoryError` (bad spec, import failure, factory error, not a module)
    and :class:`CheckpointError` (missing/unreadable file, keys that do not match).
    """
    factory = load_factory(spec)
    try:
        model = factory(**factory_kwargs)
    except BKNError:
        raise
    except Exception as error:  # the user's factory may raise anything
        raise FactoryError(
            f"factory {spec!r} raised {type(error).__name__}: {error} (keyword arguments: {factory_kwargs})"
        ) from error
    if not isinstance(model, nn.Module):
        raise FactoryError(f"factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        _check_shapes(model, state, checkpoint, spec)
        try:
            with warnings.catch_warnings():  # the layers' pointer to load_batchnorm_state_dict: the hint below says it
                from bkn_export.nn import BatchNormCheckpointWarning

                warnings.simplefilter("ignore", BatchNormCheckpointWarning)
                # strict=False, then the same refusal as strict=True: the keys summarised, not listed in full.
                result = model.load_state_dict(state, strict=False)
        except CheckpointError:
            raise
        except BKNError as error:  # a BKN layer refusing its entries (a wiring record that does not read)
            raise CheckpointError(f"checkpoint {checkpoint}: {error}") from error
        except Exception as error:  # RuntimeError for key/shape mismatches; other types for odd values
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit the model built by {spec!r}: {str(error).rstrip('. ')}. "
                + _batchnorm_checkpoint_hint(model, state)
            ) from error
        if result.missing_keys or result.unexpected_keys:
            from bkn_export.convert import module_prefix_hint, summarize_keys

            prefix_hint = module_prefix_hint(result.unexpected_keys, model.state_dict()).rstrip("; ")
            hint = prefix_hint[:1].upper() + prefix_hint[1:] + "." if prefix_hint else ""
            raise CheckpointError(
                f"checkpoint {checkpoint} does not fit the model built by {spec!r}: "
                + "; ".join(
                    f"{len(keys)} {kind} key(s) ({summarize_keys(keys)})"
                    for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
                    if keys
                )
                + ". "
                + (hint or _batchnorm_checkpoint_hint(model, state))
            )
    return model


def _batchnorm_checkpoint_hint(model: nn.Module, state: Mapping[str, Any]) -> str:
    """What to do about a checkpoint that does not load: a BatchNorm model's checkpoint (it lacks only BKN-only
    entries) loads with :func:`bkn_export.load_batchnorm_state_dict`; otherwise, build the same model."""
    from bkn_export.convert import BKN_ONLY_SUFFIXES, batchnorm_fills_in

    own = model.state_dict()
    missing = [key for key in own if key not in state]
    if (
        missing
        and all(key in own for key in state)
        and all(key.endswith(BKN_ONLY_SUFFIXES) or batchnorm_fills_in(key, state) for key in missing)
    ):
        return (
            f"It lacks only BKN-only entries ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it is "
            "the checkpoint of the model with BatchNorm. Load it in the factory, after converting, with "
            "bkn_export.load_batchnorm_state_dict(model, torch.load(path)), and pass no --checkpoint."
        )
    return "Build the model with the same factory arguments as when it was saved."
