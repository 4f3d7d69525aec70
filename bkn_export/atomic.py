"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Every file bkn_export writes (ONNX models through :func:`bkn_export.export.save_onnx`,
checkpoints, reports, demo outputs) goes through here:

1. a temporary file is created beside the target (same directory, hence same file system)
   as ``.<name>.<pid>-<random>.tmp``, with ``O_CREAT | O_EXCL`` and mode 0666, so the
   kernel applies the umask (and any default ACL) exactly as for a plain ``open``;
2. the data is written and ``fsync``-ed; if the target is a regular file its permission
   bits are copied onto the temporary (a replaced file keeps its mode; a new one gets
   ``0666 & ~umask``; ownership is the writer's, as with any replace);
3. ``os.replace`` renames it over the target; a symlink at the target is replaced by the
   file, not written through; then the directory is ``fsync``-ed so the rename survives a
   crash. A target that is not a regular file (a directory, ``/dev/null``, a named pipe, a
   socket, or a symlink to one) is refused before anything is written: the rename would
   replace it (:func:`check_writable`).

On any failure (a full disk, a read-only directory) the temporary is removed, the target is
left as it was and :class:`~bkn_export.errors.OutputWriteError` names the path and the
reason. A writer killed mid-write (SIGKILL, power loss) leaves its temporary behind; the
next write to the same target removes the temporaries whose PID is no longer alive on this
machine (no signal handlers are installed: the library does not own the process). A PID
recycled by an unrelated process keeps its temporary until a later write; temporaries on a
file system shared by several machines are only cleaned by a writer on the machine that
made them if it sees the PID dead.

API: :func:`write_bytes_atomic`, :func:`write_text_atomic`, :func:`atomic_writer` (a context
manager yielding the binary file to fill, for large or streamed data such as
``torch.save``), :func:`check_writable`, :func:`remove_dead_temporaries`,
:func:`pid_alive`, :func:`existing_mode`, :func:`new_file` (create a file that must not exist yet, with the same
error handling; used for ONNX external data under a name unique to the write).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from bkn_export.errors import OutputWriteError

__all__ = [
    "atomic_writer",
    "check_creatable",
    "check_folder_creatable",
    "check_writable",
    "create_directories",
    "existing_mode",
    "new_file",
    "pid_alive",
    "remove_dead_temporaries",
    "temporary_name",
    "write_bytes_atomic",
    "write_text_atomic",
]

_TEMP_PATTERN = r"\.{name}\.(?P<pid>\d+)-[0-9a-f]+\.tmp"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (signal 0; a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_name(name: str) -> str:
    """``.<name>.<pid>-<random>.tmp``: the temporary of a write of ``name`` by this process."""
    return f".{name}.{os.getpid()}-{secrets.token_hex(6)}.tmp"


def remove_dead_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of writes to ``path`` whose writer process is gone; return what was removed."""
    target = Path(path)
    pattern = re.compile(_TEMP_PATTERN.format(name=re.escape(target.name)))
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer removed it first
            entry.unlink()
            removed.append(entry)
    return removed


def _describe(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "No space left on device (free some space or write elsewhere)"
    if error.errno == errno.EDQUOT:
        return "Disk quota exceeded (free some space or write elsewhere)"
    return error.strerror or str(error)


def check_writable(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if a file can be created there, else :class:`OutputWriteError` saying why.

    Call it before slow work (an export, a training run) so that a bad path fails first.
    """
    target = Path(path)
    directory = target.parent
    if not directory.exists():
        raise OutputWriteError(f"cannot write {target}: directory {directory} does not exist")
    if not directory.is_dir():
        raise OutputWriteError(f"cannot write {target}: {directory} is a file, not a directory")
    kind = _not_a_file(target)
    if kind == "directory":
        raise OutputWriteError(f"cannot write {target}: it is a directory; give a file name")
    if kind is not None:
        raise OutputWriteError(
            f"cannot write {target}: it is a {kind}, not a regular file; the write would replace it by a file (a new "
            "file is renamed over the destination), so give a file path"
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write {target}: directory {directory} is not writable")
    _check_name_length(target)
    return target


def _check_name_length(target: Path) -> None:
    """Refuse a name too long for its write's temporary (``.<name>.<pid>-<random>.tmp``, the longest name a write
    makes beside it): that write would fail only at its end, after the work."""
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    length, needed = len(os.fsencode(target.name)), len(os.fsencode(temporary_name(target.name)))
    if needed > limit:
        raise OutputWriteError(
            f"cannot write {target}: its name is {length} bytes, and the write's temporary file beside it "
            f"('.<name>.<pid>-<random>.tmp') would be {needed}, over the {limit} a name may have here; give a name of "
            f"at most {length - (needed - limit)} bytes"
        )


_SPECIAL_KINDS = (
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
)


def _not_a_file(target: Path) -> str | None:
    """What is at ``target`` (a symlink followed) where it is neither absent nor a regular file: "directory",
    "character device" (``/dev/null``, ``/dev/stdout``'s terminal), "block device", "named pipe", "socket"."""
    try:
        mode = os.stat(target).st_mode
    except OSError:  # absent, a dangling symlink, a loop: the write reports its own error
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), None)


def check_creatable(path: str | os.PathLike[str], directory: bool = False) -> Path:
    """:func:`check_writable` for a writer that creates missing parent directories (the parity reports): the
    nearest existing ancestor must be a writable directory. Raises :class:`OutputWriteError` saying why.

    directory: the writer may write into ``path`` as a folder (``--repro``, the folder form of ``--save-outputs``):
    an existing directory there must be writable instead of being refused."""
    target = Path(path)
    if directory and target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise OutputWriteError(f"cannot write into {target}: the directory is not writable")
        return target
    if target.parent.exists():
        return check_writable(target)
    ancestor = next(parent for parent in target.parents if parent.exists())
    if not ancestor.is_dir():
        raise OutputWriteError(f"cannot write {target}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputWriteError(f"cannot write {target}: directory {ancestor} is not writable")
    return target


def check_folder_creatable(path: str | os.PathLike[str]) -> Path:
    """:func:`check_creatable` for a writer that always writes into ``path`` as a folder (``--repro``): an existing
    file there, or a broken symlink (which ``mkdir`` cannot follow), is refused too. Raises
    :class:`OutputWriteError`."""
    target = Path(path)
    if target.is_symlink() and not target.exists():
        raise OutputWriteError(f"{target} is a broken symlink; give a folder path")
    if target.exists() and not target.is_dir():
        raise OutputWriteError(
            f"{target} is not a directory: this writes into a folder (created if missing); give a folder path"
        )
    broken = next((parent for parent in target.parents if parent.is_symlink() and not parent.exists()), None)
    if broken is not None:
        raise OutputWriteError(f"cannot create the folder {target}: {broken} is a broken symlink")
    checked = check_creatable(target, directory=True)
    # os.access grants root every directory, /proc and /sys included: create (and remove) a folder where the writer's
    # files or folder would go
    where = target if target.is_dir() else next(parent for parent in target.parents if parent.exists())
    try:
        probe = tempfile.mkdtemp(prefix=".bkn-probe-", dir=where)
    except OSError as error:
        raise OutputWriteError(
            f"cannot write into {target}: a folder cannot be created in {where} ({error.strerror or error})"
        ) from error
    shutil.rmtree(probe, ignore_errors=True)
    return checked


def create_directories(directory: str | os.PathLike[str]) -> Path:
    """``mkdir -p directory``; where it cannot be made, :class:`OutputWriteError` naming it and the reason (not a
    bare ``FileNotFoundError``: below ``/proc`` or ``/sys`` a root user passes the permission check of
    :func:`check_creatable` and creation still fails)."""
    target = Path(directory)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputWriteError(f"cannot create directory {target}: {_describe(error)}") from error
    return target


def existing_mode(target: str | os.PathLike[str]) -> int | None:
    """The permission bits of the regular file at ``target`` (not following a symlink), or None."""
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a directory we may write but not open for reading
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_file(
    path: str | os.PathLike[str], mode: int | None = None, label: str | os.PathLike[str] | None = None
) -> Iterator[BinaryIO]:
    """Create ``path`` (it must not exist), yield it open for binary writing, fsync and close it.

    Permission bits: ``mode`` if given, else 0666 & ~umask. On failure the file is removed
    and :class:`OutputWriteError` names ``label`` (default: the path). Not atomic by itself: callers publish the file by
    renaming something that refers to it (see :func:`bkn_export.export.save_onnx`).
    """
    target = Path(path)
    shown = target if label is None else label
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:
        raise OutputWriteError(f"cannot write {shown}: {_describe(error)}") from error
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        if isinstance(error, OSError) and not isinstance(error, OutputWriteError):
            raise OutputWriteError(f"cannot write {shown}: {_describe(error)}") from error
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file; when the block ends without error, it replaces ``path`` atomically.

    See the module docstring for the temporary's name, modes, symlinks and cleanup. Raises
    :class:`OutputWriteError` (path + reason) when the file cannot be written; the target
    is then untouched and no temporary is left.
    """
    target = check_writable(path)
    remove_dead_temporaries(target)
    temporary = target.parent / temporary_name(target.name)
    with new_file(temporary, existing_mode(target), label=target) as handle:
        yield handle
    try:
        os.replace(temporary, target)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise OutputWriteError(f"cannot write {target}: {_describe(error)}") from error
    _fsync_directory(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring); return the path."""
    with atomic_writer(path) as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` (encoded with ``encoding``) to ``path`` atomically; return the path. A file name that is not
    valid UTF-8 reaches Python as lone surrogates (PEP 383); in the text (a report naming the file) they are
    written back as the name's own bytes."""
    return write_bytes_atomic(path, text.encode(encoding, errors="surrogateescape"))
