"""Faults around the files a command writes (the eighth sweep, docs/zoo-sweep.md): destinations that are not regular
files, outputs that name an input, names too long for the write's temporary, a closed stdout, stale per-iteration
files, SIGTERM during a write, non-UTF-8 names in a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from test_hardening_cli import MODELS, assert_one_line, export_argv, run_cli

from bkn_export.atomic import check_creatable, check_folder_creatable, check_writable, write_text_atomic
from bkn_export.cli import main
from bkn_export.commands.paths import check_distinct_paths, spec_file
from bkn_export.errors import OptionError, OutputWriteError
from runtime.polygraphy_io import load_outputs, save_outputs
from runtime.report.terminal import _ReportConsole


@pytest.fixture
def models(tmp_path: Path) -> str:
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    return str(path)


# --------------------------------------------------------------------------- destinations that are not files


def test_a_character_device_is_refused_not_replaced() -> None:
    """``-o /dev/null`` as root replaced the system's /dev/null by the ONNX file (a rename over it)."""
    with pytest.raises(OutputWriteError, match="it is a character device, not a regular file"):
        check_writable("/dev/null")
    assert Path("/dev/null").is_char_device()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_a_named_pipe_and_a_symlink_to_one_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(fifo)
    for target in (fifo, link):
        with pytest.raises(OutputWriteError, match="named pipe"):
            check_writable(target)
    assert fifo.is_fifo() and link.is_symlink()


def test_a_symlink_to_a_directory_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputWriteError, match="it is a directory"):
        check_writable(tmp_path / "link")
    assert check_creatable(tmp_path / "link", directory=True) == tmp_path / "link"  # a folder output may go there


def test_a_dangling_symlink_and_a_file_are_writable(tmp_path: Path) -> None:
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("old")
    assert check_writable(tmp_path / "dangling") == tmp_path / "dangling"
    assert check_writable(tmp_path / "file") == tmp_path / "file"


def test_a_name_too_long_for_the_temporary_is_refused_before_any_work(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 245-byte name is legal, but its temporary ``.<name>.<pid>-<random>.tmp`` is not: the export failed after
    tracing and writing; now it stops first, saying how long a name may be."""
    out = tmp_path / ("a" * 240 + ".onnx")
    code, err = run_cli(export_argv(f"{models}:small", out), capsys)
    assert code == 2
    assert_one_line(err, "OutputWriteError", "its name is 245 bytes", "give a name of at most")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.py"]


# --------------------------------------------------------------------------- outputs that name an input


def test_spec_file_is_the_py_file_of_a_path_spec() -> None:
    assert spec_file("models/nets.py:build") == "models/nets.py"
    assert spec_file("package.module:build") is None
    assert spec_file(None) is None


def test_an_output_naming_an_input_or_another_output_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    (tmp_path / "link.onnx").symlink_to(model)
    with pytest.raises(OptionError, match=r"--json .*link.onnx is the file of the ONNX model"):
        check_distinct_paths({"--json": str(tmp_path / "link.onnx")}, {"the ONNX model": str(model)})
    with pytest.raises(OptionError, match=r"--html .* is the file of --json"):
        check_distinct_paths({"--json": str(tmp_path / "r"), "--html": str(tmp_path / "sub" / ".." / "r")}, {})
    check_distinct_paths({"--json": str(tmp_path / "r.json"), "--html": None}, {"--checkpoint": None})


def test_export_onto_its_own_checkpoint_keeps_the_checkpoint(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``bkn export --checkpoint ck.pt -o ck.pt`` replaced the checkpoint by the ONNX file, exit 0."""
    checkpoint = tmp_path / "ck.pt"
    small = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    torch.save(small.state_dict(), checkpoint)  # the state of models.py's `small`
    before = checkpoint.read_bytes()
    code, err = run_cli(export_argv(f"{models}:small", checkpoint, "--checkpoint", str(checkpoint)), capsys)
    assert code == 2
    assert_one_line(err, "OptionError", "is the file of --checkpoint")
    assert checkpoint.read_bytes() == before


# --------------------------------------------------------------------------- reports and saved outputs


def test_a_closed_pipe_raises_broken_pipe_not_rich_exit_1() -> None:
    """rich's own handler exits with 1 (the rule's "model problem") when stdout's reader goes away (``| head``)."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

    console = _ReportConsole(file=ClosedPipe(), width=80)  # type: ignore[arg-type]
    assert isinstance(console, Console)
    with pytest.raises(BrokenPipeError):
        console.print("a table")


def test_a_shorter_save_into_a_folder_leaves_no_stale_iteration(tmp_path: Path) -> None:
    """Three iterations, then one, saved into one folder: the folder held the first run's iterations 1 and 2 too,
    and a correct file then failed against them."""
    folder = tmp_path / "reference"
    save_outputs(folder, [{"y": np.full(2, float(i), dtype=np.float32)} for i in range(3)])
    (folder / "notes.json").write_text("{}")  # not an iteration file: left alone
    save_outputs(folder, [{"y": np.full(2, 7.0, dtype=np.float32)}])
    assert sorted(p.name for p in folder.iterdir()) == ["0000000000.json", "notes.json"]
    (folder / "notes.json").unlink()
    assert [feed["y"].tolist() for feed in load_outputs(folder)["pytorch"]] == [[7.0, 7.0]]


def test_a_non_utf8_file_name_in_a_text_report_is_written_as_its_bytes(tmp_path: Path) -> None:
    """A file name that is not UTF-8 reaches Python as lone surrogates; encoding them raised UnicodeEncodeError
    (a traceback from ``--html``)."""
    name = os.fsdecode(b"bad\xff.onnx")
    path = write_text_atomic(tmp_path / "report.html", f"<p>{name}</p>")
    assert path.read_bytes() == b"<p>bad\xff.onnx</p>"
    json.dumps(name)  # the JSON report escapes it (\udcff) on its own


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_during_a_write_of_the_cli_leaves_no_temporary(tmp_path: Path) -> None:
    """``timeout``, ``docker stop`` and CI cancels send SIGTERM; its default action left the write's temporary. The
    CLI's entry point turns it into an exit (128 + 15) that unwinds the write."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from bkn_export import cli
        from bkn_export.atomic import atomic_writer

        cli._own_the_process()
        with atomic_writer({str(tmp_path / "out.bin")!r}) as handle:
            handle.write(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            handle.write(b" never")
        """
    )
    (tmp_path / "out.bin").write_bytes(b"old")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 143, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    assert (tmp_path / "out.bin").read_bytes() == b"old"


# --------------------------------------------------------------------------- checkpoints that are not files


@pytest.mark.parametrize("kind", ["empty", "device"])
def test_a_checkpoint_that_is_empty_or_a_device_says_so(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """An empty checkpoint read as "EOFError: ." and a device as "does not exist"."""
    checkpoint = "/dev/null" if kind == "device" else str(tmp_path / "empty.pt")
    if kind == "empty":
        Path(checkpoint).write_bytes(b"")
    code, err = run_cli(export_argv(f"{models}:small", tmp_path / "m.onnx", "--checkpoint", checkpoint), capsys)
    assert code == 2
    expected = "is empty (0 bytes)" if kind == "empty" else "is a device, pipe or socket"
    assert_one_line(err, "CheckpointError", expected)


# --------------------------------------------------------------------------- bkn parity: reports


def test_parity_prints_its_verdict_before_a_report_write_error(
    tmp_path: Path, models: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reports are written before the table (so that a closed stdout loses none); a report that cannot be
    written (a full disk) still lets the table show the verdict, then its one-line error, exit 2. (The factory
    builds new random weights per call, so the file differs from the model parity builds: a mismatch, the case
    where the verdict matters most.)"""
    from test_hardening_faults import fill_disk_after

    model = tmp_path / "m.onnx"
    assert run_cli(export_argv(f"{models}:small", model, shape="2,1,8,8"), capsys)[0] == 0
    reports = tmp_path / "reports"
    reports.mkdir()
    fill_disk_after(monkeypatch, reports, 100)
    argv = ["parity", f"{models}:small", str(model), "--runtimes", "ort:cpu:all", "--json", str(reports / "r.json")]
    try:
        code = main(argv)
    except SystemExit as stop:
        code = int(stop.code or 0)
    out, err = capsys.readouterr()
    assert code == 2
    assert "ort:cpu:all" in out and "parity FAILED" in out
    assert_one_line(err, "OutputWriteError", "No space left on device")
    assert list(reports.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_a_folder_output_under_a_pseudo_filesystem_is_refused_before_the_run(tmp_path: Path) -> None:
    """A review: as root, ``--repro /proc/x`` passed the up-front check (``os.access`` grants root every directory),
    every runtime ran, and the bundle failed as a note, exit 1. The check now creates (and removes) a folder where
    the new one would go; a creatable folder is still accepted and nothing is left behind."""
    with pytest.raises(OutputWriteError, match="a folder cannot be created in /proc"):
        check_folder_creatable("/proc/bkn-probe-test/x")
    assert check_folder_creatable(tmp_path / "new" / "repro") == tmp_path / "new" / "repro"
    assert list(tmp_path.iterdir()) == []
    # a second review: an existing folder there was not probed; a folder below a broken symlink passed
    if Path("/proc/self/fd").is_dir():
        with pytest.raises(OutputWriteError, match="a folder cannot be created in /proc/self/fd"):
            check_folder_creatable("/proc/self/fd")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputWriteError, match="dangling is a broken symlink"):
        check_folder_creatable(tmp_path / "dangling" / "repro")
    assert check_folder_creatable(tmp_path) == tmp_path and sorted(p.name for p in tmp_path.iterdir()) == ["dangling"]
