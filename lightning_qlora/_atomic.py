"""Writes that a reader sees whole or not at all, and that never touch anything but the files they write.

- :func:`write_file_atomically`: a file is written beside its target under a hidden temporary name, synced, then
  renamed over it; a process killed at any point leaves the previous file (or none) and a stale temporary the next
  write removes.
- :func:`output_directory`: the directory files are written into, created with the usual permissions; a *file* at
  that path is refused. Other files in the directory are left alone (as transformers and PEFT do).
- :func:`writer_lock`: two writers of one directory take turns instead of interleaving their files.
- :func:`atomic_directory`: a fresh directory that appears complete or not at all (for caches this library owns).

Errors while writing (a read-only directory, a full disk) are raised as :class:`OutputWriteError`, naming the path
and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning_qlora.errors import QLoRAError

log = logging.getLogger(__name__)



def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The mode a plain open() gives a new file here: some writers (safetensors) create theirs readable by the owner only.
FILE_MODE = 0o666 & ~_current_umask()


class OutputWriteError(QLoRAError, OSError):
    """A file could not be written (permissions, a full disk, a file where a directory should be)."""


def output_directory(path: str | os.PathLike) -> Path:
    """``path`` as a directory to write into: created (with its parents) if needed.

    Raises:
        OutputWriteError: when ``path`` is an existing file, or cannot be created.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputWriteError(
            errno.ENOTDIR, f"{directory} is a file, not a directory: choose a directory to write into (nothing was "
            "overwritten)."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(directory, err) from err
    return directory


def write_file_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(temporary_path)`` and rename the result over ``path`` once it is complete and synced.

    Raises:
        OutputWriteError: when the directory is not writable or the disk is full (``path`` is then unchanged).
    """
    write_files_atomically({path: write})


def write_files_atomically(writes: dict[Path, Callable[[Path], object]]) -> None:
    """Write every file to a temporary name first; only once all are complete and synced, rename each over its
    target. A failure (a full disk) while writing leaves every target as it was.

    Raises:
        OutputWriteError: when a directory is not writable or the disk is full.
    """
    staged: dict[Path, Path] = {}
    try:
        for path, write in writes.items():
            for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a write that was killed
                stale.unlink(missing_ok=True)
            staging = staged[path] = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            _guarded(path, write, staging)
            os.chmod(staging, FILE_MODE)
            with open(staging, "rb") as handle:
                os.fsync(handle.fileno())
        for path, staging in staged.items():
            os.replace(staging, path)
    except OutputWriteError:
        raise
    except OSError as err:
        raise _write_error(next(iter(writes)), err) from err
    finally:
        for staging in staged.values():
            with contextlib.suppress(OSError):  # (a read-only file system refuses even this)
                staging.unlink(missing_ok=True)


def _guarded(path: Path, write: Callable[[Path], object], staging: Path) -> None:
    try:
        write(staging)
    except OSError:
        raise
    except Exception as err:  # e.g. safetensors' own error type, "... (os error 28)", for an OS error
        found = re.search(r"os error (\d+)", str(err))
        if found:
            raise _write_error(path, OSError(int(found.group(1)), str(err))) from err
        raise


@contextmanager
def writer_lock(directory: Path) -> Iterator[None]:
    """Hold ``directory``'s writer lock for the block: concurrent writers (threads or processes) take turns. The lock
    is taken on the directory itself (``flock``), so it leaves no file behind.

    Raises:
        OutputWriteError: when the directory cannot be opened.
    """
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError as err:
        raise _write_error(directory, err) from err
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _write_error(path: Path, err: OSError) -> OutputWriteError:
    if err.errno == errno.ENOSPC:
        reason = "the disk is full"
        fix = "free space there or write elsewhere; the previous files are intact"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = "permission denied (read-only directory or file system)"
        fix = "choose a writable directory"
    else:
        reason = err.strerror or str(err)
        fix = "check the path"
    return OutputWriteError(err.errno or errno.EIO, f"Could not write {path}: {reason}. {fix[0].upper()}{fix[1:]}.")


@contextmanager
def files_into(target: Path) -> Iterator[Path]:
    """Yield a hidden staging directory inside ``target`` (an existing directory); once the block succeeds, each file
    written there is renamed over its namesake in ``target``, one atomic rename each; other files stay.

    Raises:
        OutputWriteError: when ``target`` is not writable or the disk fills up.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=".staging.tmp-", dir=target))
    except OSError as err:
        raise _write_error(target, err) from err
    try:
        yield staging
        for file in sorted(staging.iterdir()):
            if file.is_file():
                os.chmod(file, FILE_MODE)
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(file, target / file.name)
    except OSError as err:
        raise _write_error(target, err) from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it becomes ``target`` in one rename.

    Only for directories this library owns whole (its caches): an existing ``target`` is replaced. A killed run
    leaves ``target`` as it was, plus a staging directory the next call removes (not one of a process still running:
    its name carries its writer's pid).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        if not _writer_alive(leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
        for file in staging.iterdir():
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            backup = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _writer_alive(name: str) -> bool:
    """Whether the process whose pid follows ``.tmp-`` in a staging directory's name still runs (other names: no)."""
    pid = name.rsplit(".tmp-", 1)[-1].removeprefix("old-").split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def cache_lock(target: Path) -> contextlib.AbstractContextManager[None]:
    """A lock across processes for filling cache directory ``target`` once (the writer lock of its parent): DDP ranks
    or parallel test workers that ask at the same moment wait for the first, then find its result.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    return writer_lock(target.parent)
