"""``PeakMemoryMonitor``: peak accelerator memory per logging window (CUDA) or the process's peak RSS (CPU)."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

GIB = 2**30


class PeakMemoryMonitor(Callback):
    """Log peak memory every ``getattr(trainer, "log_every_n_steps", 50)`` steps and a summary at the end of fit.

    On CUDA it logs ``memory/peak_allocated_gib`` and ``memory/peak_reserved_gib`` (peaks within the window; the
    CUDA peak counters are reset after each log). On CPU it logs ``memory/peak_rss_gib``, the process's peak resident
    set size so far (the OS offers no per-window reset). At the end of fit it logs ``memory/run_peak_*_gib`` and
    keeps them in :attr:`summary`.

    Attributes:
        history: ``(global_step, {metric: value})`` for every logged window, e.g. for plots.
        summary: the run's peak values in GiB, filled at the end of fit.
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, float]]] = []
        self.summary: dict[str, float] = {}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.history.clear()
        self.summary.clear()
        if _is_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % max(1, getattr(trainer, "log_every_n_steps", 50)) != 0:
            return
        metrics = self._read(trainer)
        self.history.append((trainer.global_step, metrics))
        self._update_summary(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if _is_cuda(trainer):
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._update_summary(self._read(trainer))
        for logger in trainer.loggers:
            logger.log_metrics(dict(self.summary), step=trainer.global_step)
        rank_zero_info("Peak memory: " + ", ".join(f"{k} = {v:.3f}" for k, v in self.summary.items()))

    def _update_summary(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            run_key = key.replace("memory/", "memory/run_")
            self.summary[run_key] = max(value, self.summary.get(run_key, 0.0))

    @staticmethod
    def _read(trainer: Trainer) -> dict[str, float]:
        if _is_cuda(trainer):
            device = trainer.strategy.root_device
            return {
                "memory/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "memory/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
            }
        return {"memory/peak_rss_gib": peak_rss_bytes() / GIB}


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    """The process's resident set size now, from /proc (Linux); ``None`` where /proc is absent."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


def _is_cuda(trainer: Trainer) -> bool:
    return trainer.strategy.root_device.type == "cuda"
