"""Faults while writing: nothing lost, nothing half-written, nothing mixed.

Specification (:mod:`bkn_export.atomic`, :func:`bkn_export.export.save_onnx`):

* a full disk (a fake write failure here; a real small tmpfs where the test may mount one)
  raises OutputWriteError naming the path and the reason, keeps the old file and leaves no
  partial or temporary file;
* a reader never loads one write's model with another write's external data, even with two
  processes saving to the same path in a loop; a reader that opened the old model may fail
  loudly on a missing data file instead;
* a killed writer's temporaries are removed by the next write; a live writer's are not;
* a new file gets 0666 & ~umask, a replaced file keeps its mode, a symlink at the path is
  replaced (its target is untouched); no stale external-data file survives a re-export.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bkn_export.atomic import (
    atomic_writer,
    pid_alive,
    remove_dead_temporaries,
    temporary_name,
    write_bytes_atomic,
    write_text_atomic,
)
from bkn_export.errors import OutputWriteError
from bkn_export.export import save_onnx

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, directory: Path, capacity: int) -> None:
    """Make files opened from descriptors under ``directory`` accept ``capacity`` bytes in all, then fail ENOSPC.

    Patches ``os.fdopen`` (how :mod:`bkn_export.atomic` opens the files it creates) for
    paths under ``directory`` only; everything else writes normally.
    """
    real_fdopen = os.fdopen
    left = [capacity]
    root = str(directory.resolve())

    class FullDisk:
        def __init__(self, handle: object) -> None:
            self.inner = handle

        def write(self, data: bytes) -> int:
            view = memoryview(data)
            if len(view) > left[0]:
                self.inner.write(view[: left[0]])  # type: ignore[attr-defined]
                left[0] = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            left[0] -= len(view)
            return self.inner.write(view)  # type: ignore[attr-defined,no-any-return]

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.close()  # type: ignore[attr-defined]

    def fdopen(fd: int, *args: object, **kwargs: object) -> object:
        handle = real_fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]
        try:
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return handle
        return FullDisk(handle) if opened.startswith(root + os.sep) else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def stamped_model(stamp: int, values: int = 4096) -> onnx.ModelProto:
    """y = x + w with every w equal to ``stamp`` (16 KiB of weights); the stamp also in metadata."""
    weight = numpy_helper.from_array(np.full(values, stamp, dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "stamped",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [values])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [values])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key="stamp", value=str(stamp))
    return model


def read_stamps(path: Path) -> tuple[int, set[int]]:
    """(the model's metadata stamp, the distinct values of its weight), loading external data."""
    model = onnx.load(path)
    stamp = int(next(p.value for p in model.metadata_props if p.key == "stamp"))
    return stamp, {int(v) for v in np.unique(numpy_helper.to_array(model.graph.initializer[0]))}


def data_files(directory: Path, name: str = "m.onnx") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(name + ".") and p.name.endswith(".data"))


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def dead_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)
    assert not pid_alive(pid)
    return pid


# --------------------------------------------------------------------------- full disk


def test_full_disk_keeps_the_old_file_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')
    fill_disk_after(monkeypatch, tmp_path, 10)
    with pytest.raises(OutputWriteError, match=rf"cannot write {target}: No space left on device"):
        write_text_atomic(target, '{"new": "a report much longer than ten bytes"}')
    assert target.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_full_disk_in_the_external_data_keeps_the_old_pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.onnx"
    save_onnx(stamped_model(1), target, external_data_threshold=0)
    before = sorted(p.name for p in tmp_path.iterdir())
    fill_disk_after(monkeypatch, tmp_path, 5000)  # the 16 KiB data file does not fit
    with pytest.raises(OutputWriteError, match=r"m\.onnx \(external data m\.onnx\.\d+-[0-9a-f]+\.data\): No space"):
        save_onnx(stamped_model(2), target, external_data_threshold=0)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert read_stamps(target) == (1, {1})


def test_full_disk_reported_by_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Some file systems (NFS, delayed allocation) report ENOSPC only when the data is flushed."""
    target = tmp_path / "m.onnx"
    save_onnx(stamped_model(1), target)

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        save_onnx(stamped_model(2), target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert read_stamps(target) == (1, {1})


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test (root only, where mounting is allowed)."""
    target = tmp_path / "tmpfs"
    target.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)], check=False).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_a_real_full_disk(small_tmpfs: Path) -> None:
    target = small_tmpfs / "m.onnx"
    save_onnx(stamped_model(1, values=1024), target, external_data_threshold=0)  # 4 KiB of data
    with pytest.raises(OutputWriteError, match="No space left on device"):
        save_onnx(stamped_model(2, values=40_000), target, external_data_threshold=0)  # 160 KiB > 64 KiB
    assert read_stamps(target) == (1, {1})
    assert len(data_files(small_tmpfs)) == 1
    assert not [p for p in small_tmpfs.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- permissions and symlinks


def test_new_files_get_0666_minus_umask(tmp_path: Path, umask_022: None) -> None:
    assert (write_bytes_atomic(tmp_path / "a.bin", b"x").stat().st_mode & 0o777) == 0o644
    save_onnx(stamped_model(1), tmp_path / "m.onnx", external_data_threshold=0)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644
    (data,) = data_files(tmp_path)
    assert (tmp_path / data).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o664])
def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask_022: None, mode: int) -> None:
    target = tmp_path / "m.onnx"
    save_onnx(stamped_model(1), target)
    target.chmod(mode)
    save_onnx(stamped_model(2), target, external_data_threshold=0)
    assert target.stat().st_mode & 0o777 == mode
    (data,) = data_files(tmp_path)
    assert (tmp_path / data).stat().st_mode & 0o777 == mode  # the data file gets its model's mode


def test_a_symlink_at_the_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("precious")
    link = tmp_path / "report.json"
    link.symlink_to(elsewhere)
    write_text_atomic(link, "report")
    assert not link.is_symlink() and link.read_text() == "report"
    assert elsewhere.read_text() == "precious"
    model_link = tmp_path / "m.onnx"
    model_link.symlink_to(elsewhere)
    save_onnx(stamped_model(3), model_link)
    assert not model_link.is_symlink() and elsewhere.read_text() == "precious"


# --------------------------------------------------------------------------- stale data and killed writers


def test_no_stale_external_data_after_a_re_export(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_bytes(b"from an earlier version, fixed name")
    save_onnx(stamped_model(1), target, external_data_threshold=0)
    first = data_files(tmp_path)
    assert len(first) == 1 and first != ["m.onnx.data"]
    save_onnx(stamped_model(2), target, external_data_threshold=0)
    second = data_files(tmp_path)
    assert len(second) == 1 and second != first
    save_onnx(stamped_model(3), target)  # inline this time
    assert data_files(tmp_path) == []
    assert read_stamps(target) == (3, {3})


def test_a_reader_of_the_old_model_fails_loudly_never_mixes(tmp_path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model

    target = tmp_path / "m.onnx"
    save_onnx(stamped_model(1), target, external_data_threshold=0)
    old_header = onnx.load(target, load_external_data=False)  # a reader opened the old model ...
    (old_data,) = data_files(tmp_path)
    save_onnx(stamped_model(2), target, external_data_threshold=0)  # ... a writer replaced the pair
    # onnx reports the missing file as "should be stored in <old data file>, but it is not regular file"
    with pytest.raises((FileNotFoundError, onnx.checker.ValidationError), match=old_data.replace(".", r"\.")):
        load_external_data_for_model(old_header, str(tmp_path))
    assert read_stamps(target) == (2, {2})


def test_dead_writers_temporaries_are_removed_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    dead = dead_pid()
    dead_temp = tmp_path / f".m.onnx.{dead}-0123456789ab.tmp"
    dead_data = tmp_path / f"m.onnx.{dead}-0123456789ab.data"
    live_temp = tmp_path / temporary_name("m.onnx")  # this process: alive
    other_temp = tmp_path / f".other.onnx.{dead}-0123456789ab.tmp"  # another target's
    for path in (dead_temp, dead_data, live_temp, other_temp):
        path.write_bytes(b"left behind")
    save_onnx(stamped_model(1), target)
    assert not dead_temp.exists() and not dead_data.exists()
    assert live_temp.exists() and other_temp.exists()
    assert remove_dead_temporaries(tmp_path / "other.onnx") == [other_temp]


WRITER = textwrap.dedent(
    """
    import sys, time
    from bkn_export.atomic import atomic_writer
    with atomic_writer(sys.argv[1]) as handle:
        handle.write(b"half of a report")
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])  # no handler: both end the writer
def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path: Path, signal_number: int) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal_number)
    writer.wait(timeout=30)
    (left,) = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert f".{writer.pid}-" in left.name and target.read_text() == "old"
    with atomic_writer(target) as handle:
        handle.write(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    assert target.read_text() == "new"


# --------------------------------------------------------------------------- concurrent writers


CONCURRENT_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from bkn_export.export.io import save_onnx

    path, writer, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(rounds):
        stamp = writer * 100000 + i
        weight = numpy_helper.from_array(np.full(4096, stamp, dtype=np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["y"])], "stamped",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4096])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4096])], [weight],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.metadata_props.add(key="stamp", value=str(stamp))
        save_onnx(model, path, external_data_threshold=0)
    """
)


def _concurrent_round(directory: Path, rounds: int) -> dict[str, int]:
    """Two writer processes save ``rounds`` models each to one path while this process reads it."""
    target = directory / "m.onnx"
    save_onnx(stamped_model(0), target, external_data_threshold=0)
    writers = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(target), str(w), str(rounds)], cwd=REPO)
        for w in (1, 2)
    ]
    counts = {"consistent": 0, "mixed": 0, "loud": 0}
    while any(w.poll() is None for w in writers):
        try:
            stamp, values = read_stamps(target)
        except (OSError, RuntimeError, onnx.checker.ValidationError):  # the old model's data was removed
            # onnx reports a data file that vanished as FileNotFoundError, ValidationError ("not regular file")
            # or RuntimeError ("filesystem error: cannot get link count"), depending on when it vanished
            counts["loud"] += 1
            continue
        counts["consistent" if values == {stamp} else "mixed"] += 1
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    stamp, values = read_stamps(target)
    assert values == {stamp} and stamp % 100000 == rounds - 1
    save_onnx(stamped_model(7), target, external_data_threshold=0)  # the writers have ended: all their data goes
    assert len(data_files(directory)) == 1
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    return counts


def test_concurrent_writers_never_give_a_reader_mixed_pairs(tmp_path: Path) -> None:
    counts = _concurrent_round(tmp_path, rounds=25)
    assert counts["mixed"] == 0, counts
    assert counts["consistent"] > 0, counts


@pytest.mark.slow
def test_concurrent_writers_stress(tmp_path: Path) -> None:
    counts = _concurrent_round(tmp_path, rounds=300)
    assert counts["mixed"] == 0, counts
    assert counts["consistent"] > 0, counts
    print(counts)


def test_many_writes_in_one_process_leave_one_data_file(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    for stamp in range(20):
        save_onnx(stamped_model(stamp), target, external_data_threshold=0)
    assert len(data_files(tmp_path)) == 1
    assert read_stamps(target) == (19, {19})


# --------------------------------------------------------------------------- reading: what is actually wrong


def test_reading_says_what_is_actually_wrong(tmp_path: Path) -> None:
    from bkn_export.errors import ModelFileError
    from bkn_export.export.io import load_onnx_file

    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelFileError, match=r"folder\.onnx is a directory, not an ONNX file"):
        load_onnx_file(tmp_path / "folder.onnx")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_onnx_file(tmp_path / "absent.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="is empty"):
        load_onnx_file(tmp_path / "empty.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00 not protobuf \x12\x99")
    with pytest.raises(ModelFileError, match="truncated or not an ONNX model"):
        load_onnx_file(tmp_path / "junk.onnx")

    target = tmp_path / "m.onnx"
    save_onnx(stamped_model(5), target, external_data_threshold=0)
    (data,) = data_files(tmp_path)
    assert read_stamps(target) == (5, {5}) and load_onnx_file(target).graph.initializer[0].raw_data
    (tmp_path / data).write_bytes((tmp_path / data).read_bytes()[:100])
    with pytest.raises(ModelFileError, match=rf"{data.replace('.', '[.]')} .*holds 100 bytes.*truncated"):
        load_onnx_file(target)
    (tmp_path / data).unlink()
    with pytest.raises(ModelFileError, match=rf"external-data file {data.replace('.', '[.]')}, which is missing"):
        load_onnx_file(target)
