"""Write a directory so that readers see either the old complete one or the new complete one, never a half."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on success it replaces ``target`` in one swap.

    The staging directory is ``.<name>.tmp-*``; an existing ``target`` is moved to ``.<name>.old-*`` just before the
    new one is renamed into place and deleted after. If the block raises (disk full, ...), ``target`` is untouched.
    A process killed between the two renames leaves the complete backup, which :func:`recover_interrupted_write`
    puts back.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_write(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        for file in staging.iterdir():
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def recover_interrupted_write(target: Path) -> None:
    """After a killed :func:`atomic_directory`: put a complete backup back, drop half-written staging copies."""
    if not target.parent.is_dir():
        return
    backups = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and backups:
        backups.pop().rename(target)
        log.warning("Recovered %s from the backup of an interrupted write.", target)
    for leftover in backups + list(target.parent.glob(f".{target.name}.tmp-*")):
        shutil.rmtree(leftover, ignore_errors=True)
