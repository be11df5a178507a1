"""Stopping a run on SIGTERM or Ctrl-C without losing the steps it made.

Schedulers, ``docker stop`` and spot preemption send SIGTERM; Lightning then finishes the batch in flight and raises
``SIGTERMException`` (an exit with status 0, by default). The QLoRA strategies turn a first Ctrl-C into the same
graceful stop (a second one interrupts at once), write a resumable checkpoint of the step reached (``last.ckpt`` in
the ``ModelCheckpoint`` directory, so ``ckpt_path="last"`` finds it) and make the process exit non-zero: 143 for
SIGTERM, 130 for Ctrl-C, as shells report them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

EXIT_SIGTERM = 128 + signal.SIGTERM
EXIT_SIGINT = 128 + signal.SIGINT


class GracefulInterrupt:
    """While installed, the first SIGINT (Ctrl-C) asks Lightning to stop after the current batch, as SIGTERM does; a
    second one raises ``KeyboardInterrupt`` as usual. Only in the main thread, where signal handlers live.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous is not None:
            return
        self.pressed = False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def remove(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        rank_zero_info("Ctrl-C: stopping after this batch and saving the step reached (press again to stop now).")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own graceful path: finish the batch, then stop


def is_graceful_stop(exception: BaseException) -> bool:
    """Whether ``exception`` is Lightning's stop after SIGTERM (or a first Ctrl-C turned into one)."""
    return isinstance(exception, SIGTERMException)


def interrupted_checkpoint_path(trainer: Trainer) -> Path:
    """Where the step reached is saved: ``last.ckpt`` beside the ``ModelCheckpoint``'s checkpoints (found again by
    ``ckpt_path="last"``), else ``<default_root_dir>/checkpoints/last.ckpt``.
    """
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


def save_interrupted_run(trainer: Trainer, exception: SIGTERMException, by_ctrl_c: bool) -> Path:
    """Save a resumable checkpoint of the step reached and set the exit status; returns the checkpoint's path.

    Called on every rank (saving is collective under FSDP); rank zero writes.
    """
    path = interrupted_checkpoint_path(trainer)
    trainer.save_checkpoint(path)
    if exception.code is None:  # Lightning's SIGTERMException exits with status 0 otherwise
        exception.code = EXIT_SIGINT if by_ctrl_c else EXIT_SIGTERM
    rank_zero_info(
        f"Stopped by {'Ctrl-C' if by_ctrl_c else 'SIGTERM'} at step {trainer.global_step}: the run is saved in {path}. "
        f'Resume it exactly with trainer.fit(..., ckpt_path="{path}") (app: lightning-qlora resume={path}).'
    )
    return path
