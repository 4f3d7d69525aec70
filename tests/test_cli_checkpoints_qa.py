"""Checkpoints as a new user hands them to ``bkn export`` / ``bkn parity`` (cold QA, 2026-12-05).

* A ``torch.save`` file damaged on disk loads in ``torch.load`` without a word (it does not verify the zip's CRC-32
  records): the CLI compares them first and refuses the file (exit 2), instead of exporting changed weights.
* A checkpoint cut off on disk or in transfer (either format) is refused as truncated, with its size, instead of
  torch's "internal miniz error" or a bare ``EOFError``.
* A BKN layer's ``_extra_state`` (its wiring record, JSON text as a uint8 tensor) has a length, not a shape: a
  checkpoint saved from the same model converted at another example size loads, as ``load_state_dict`` loads it.
* A checkpoint of another layout (``module.`` keys of a DDP wrapper, another network) is refused in one readable
  line: the keys counted and the first few named, with the hint that applies.
* A value that starts with '-' reaches the option's own parser (``--val-range -1,1``, ``--input-shape -1,...``).
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
from test_hardening_cli import assert_one_line, export_argv, models, run_cli  # noqa: F401  (fixture)

from bkn_export.cli import attach_signed_values, format_warning
from bkn_export.errors import CheckpointError
from bkn_export.factory import _check_shapes, load_checkpoint, load_model


def _damage_largest_storage(path: Path) -> str:
    """Flip bytes inside the largest tensor's storage record (``<archive>/data/<key>``); returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        storages = [item for item in archive.infolist() if "/data/" in item.filename]
        info = max(storages, key=lambda item: item.file_size)
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length
    for offset in range(start, start + min(16, info.file_size)):
        raw[offset] ^= 0x5A
    path.write_bytes(bytes(raw))
    return info.filename


def _saved(tmp_path: Path, models: str, factory: str = "converted_chain", **kwargs: object) -> Path:  # noqa: F811
    model = load_model(f"{models}:{factory}", **kwargs)
    path = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), path)
    return path


def test_a_damaged_checkpoint_is_refused_not_loaded(
    tmp_path: Path,
    models: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = _saved(tmp_path, models)
    torch.load(path, weights_only=True)  # intact: loads
    record = _damage_largest_storage(path)
    torch.load(path, weights_only=True)  # what made this silent: torch.load still loads it
    with pytest.raises(CheckpointError, match=rf"is corrupt: the bytes of record '{record}' do not match"):
        load_checkpoint(path)
    out = tmp_path / "m.onnx"
    code, err = run_cli(export_argv(f"{models}:converted_chain", out, "--checkpoint", str(path)), capsys)
    assert code == 2
    assert_one_line(err, "CheckpointError", "is corrupt")
    assert not out.exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_a_truncated_checkpoint_is_refused_as_truncated(
    tmp_path: Path,
    models: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    legacy: bool,
    fraction: float,
) -> None:
    model = load_model(f"{models}:converted_chain")
    whole = tmp_path / "whole.pt"
    torch.save(model.state_dict(), whole, _use_new_zipfile_serialization=not legacy)
    data = whole.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=rf"is truncated.*{path.stat().st_size} bytes.*Nothing was loaded"):
        load_checkpoint(path)
    out = tmp_path / "m.onnx"
    code, err = run_cli(export_argv(f"{models}:converted_chain", out, "--checkpoint", str(path)), capsys)
    assert code == 2
    assert_one_line(err, "CheckpointError", "is truncated", "cut off in transfer")
    assert not out.exists()


def test_a_legacy_checkpoint_without_checksums_still_loads(tmp_path: Path, models: str) -> None:  # noqa: F811
    model = load_model(f"{models}:converted_chain")
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    state = load_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_legacy_checkpoint_whose_bytes_hold_a_zip_end_record_still_loads(tmp_path: Path) -> None:
    """``zipfile.is_zipfile`` finds an end-of-archive signature anywhere near a file's end: one float32 weight with
    those 4 bytes made a legacy file read as a corrupt zip. The format is told by the first bytes, as torch does."""
    raw = bytearray(torch.randn(4096, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    raw[100:104] = b"PK\x05\x06"
    weight = torch.frombuffer(raw, dtype=torch.float32).clone()
    path = tmp_path / "legacy.pt"
    torch.save({"weight": weight}, path, _use_new_zipfile_serialization=False)
    assert zipfile.is_zipfile(path)
    assert torch.equal(load_checkpoint(path)["weight"], weight)


def test_a_checkpoint_saved_without_checksums_loads(tmp_path: Path, models: str) -> None:  # noqa: F811
    """``torch.utils.serialization.config.save.compute_crc32 = False`` (a documented speed option) stores CRC 0 for
    every record; ``torch.load`` loads such a file and so must the CLI."""
    from torch.utils.serialization import config

    model = load_model(f"{models}:converted_chain")
    path = tmp_path / "nocrc.pt"
    previous = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(model.state_dict(), path)
    finally:
        config.save.compute_crc32 = previous
    with zipfile.ZipFile(path) as archive:
        assert {record.CRC for record in archive.infolist()} == {0}
    state = load_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_extra_state_length_is_not_a_shape(tmp_path: Path, models: str) -> None:  # noqa: F811
    """Converted at 8x8 and at 16x16, the wiring records differ in length; the state loads either way."""
    small = load_model(f"{models}:converted_chain_at", size=8)
    large = load_model(f"{models}:converted_chain_at", size=16)
    extra = [k for k in small.state_dict() if k.endswith("._extra_state")]
    assert extra and any(small.state_dict()[k].shape != large.state_dict()[k].shape for k in extra)
    _check_shapes(large, small.state_dict(), "ckpt.pt", "spec")  # no CheckpointError
    path = tmp_path / "ckpt.pt"
    torch.save(small.state_dict(), path)
    loaded = load_model(f"{models}:converted_chain_at", str(path), size=16)
    for key, value in small.state_dict().items():
        if not key.endswith("._extra_state"):
            assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.eval()(x), small.eval()(x))


def test_a_wiring_record_that_does_not_read_is_a_checkpoint_error_naming_the_file(
    tmp_path: Path,
    models: str,  # noqa: F811
) -> None:
    """The layer's own loader refuses it (ChainWiringError); the CLI's loader said so without naming the file."""
    state = dict(load_model(f"{models}:converted_chain").state_dict())
    key = next(k for k in state if k.endswith("._extra_state"))
    state[key] = torch.zeros(7, dtype=torch.uint8)
    path = tmp_path / "garbage.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: .*extra-state tensor is not the JSON of a BKN"):
        load_model(f"{models}:converted_chain", str(path))


def test_a_ddp_checkpoint_is_refused_in_one_short_line_with_the_prefix_hint(
    tmp_path: Path,
    models: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = load_model(f"{models}:converted_chain").state_dict()
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    code, err = run_cli(
        export_argv(f"{models}:converted_chain", tmp_path / "m.onnx", "--checkpoint", str(path)), capsys
    )
    assert code == 2
    assert_one_line(err, "CheckpointError", f"{len(state)} unexpected key(s)", "... and", "start with 'module.'")
    assert len(err) < 1000, err


def test_another_networks_checkpoint_names_counts_and_the_factory_hint(
    tmp_path: Path,
    models: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "other.pt"
    torch.save(load_model(f"{models}:small").state_dict(), path)
    code, err = run_cli(
        export_argv(f"{models}:converted_chain", tmp_path / "m.onnx", "--checkpoint", str(path)), capsys
    )
    assert code == 2
    assert_one_line(err, "CheckpointError", "missing key(s)", "same factory arguments")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["parity", "--val-range", "-1,1"], ["parity", "--val-range=-1,1"]),
        (["export", "--input-shape", "-1,3,8,8"], ["export", "--input-shape=-1,3,8,8"]),
        (["parity", "--shape-set", "-2,3"], ["parity", "--shape-set=-2,3"]),
        (["parity", "--val-range", "x:[-1,1]"], ["parity", "--val-range=x:[-1,1]"]),
        # several values (nargs="+"): each attached, as argparse would have read them, up to the next option
        (["parity", "--val-range", "-1,1", "-2,2"], ["parity", "--val-range=-1,1", "--val-range=-2,2"]),
        (
            ["parity", "--val-range", "0,1", "-2,2", "--seed", "3"],
            ["parity", "--val-range=0,1", "--val-range=-2,2", "--seed", "3"],
        ),
        (["parity", "--val-range", "-1,1", "y:0,2"], ["parity", "--val-range=-1,1", "--val-range=y:0,2"]),
        (["parity", "--val", "-inf,0"], ["parity", "--val=-inf,0"]),  # argparse's abbreviation; -inf
        (["parity", "--input-sh", "-1,3"], ["parity", "--input-sh=-1,3"]),
        # a positional after the values stays one (argparse's nargs="+" would have read it as a value)
        (["parity", "m:f", "--val-range", "-1,1", "m.onnx"], ["parity", "m:f", "--val-range=-1,1", "m.onnx"]),
        (["parity", "--val-range", "x:[0,inf]", "m.py:f"], ["parity", "--val-range=x:[0,inf]", "m.py:f"]),
        (["parity", "--val-range", "--iterations", "2"], ["parity", "--val-range", "--iterations", "2"]),
        (["parity", "--", "--val-range", "-1,1"], ["parity", "--", "--val-range", "-1,1"]),
    ],
)
def test_signed_values_are_attached_to_their_option(argv: list[str], expected: list[str]) -> None:
    assert attach_signed_values(argv) == expected


def test_a_negative_shape_is_refused_by_the_shape_check(
    tmp_path: Path,
    models: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = run_cli(export_argv(f"{models}:small", tmp_path / "m.onnx", shape="-1,1,8,8"), capsys)
    assert code == 2
    assert_one_line(err, "--input-shape '-1,1,8,8': expected positive integers")


def test_warnings_print_as_one_line_without_source() -> None:
    text = format_warning(UserWarning("layer 'a': options differ"), UserWarning, "/x/nn.py", 7, "super().f(")
    assert text == "bkn: UserWarning: layer 'a': options differ\n"


def test_a_report_directory_that_cannot_be_made_is_an_output_write_error(tmp_path: Path) -> None:
    """Below a file (or /proc as root, where the permission check passes) mkdir fails: the shared writer's error,
    naming the directory, not a bare FileNotFoundError / NotADirectoryError."""
    from bkn_export.atomic import create_directories
    from bkn_export.errors import OutputWriteError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputWriteError, match=r"cannot create directory .*a-file/sub"):
        create_directories(blocker / "sub")
    assert create_directories(tmp_path / "x" / "y").is_dir()
