"""Tokens per second to the logger, through Lightning's own ``ThroughputMonitor``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def token_throughput_monitor(window_size: int = 20) -> ThroughputMonitor:
    """A ``ThroughputMonitor`` that counts real (non-padding) tokens of ``{"input_ids", "attention_mask"}`` batches.

    Logs ``train/samples_per_sec`` and ``train/items_per_sec`` (items = tokens) and their ``device/`` variants,
    every ``log_every_n_steps`` once ``window_size`` batches have been seen.
    """
    return ThroughputMonitor(batch_size_fn=_batch_size, length_fn=_token_count, window_size=window_size)


def _batch_size(batch: Any) -> int:
    return int(batch["input_ids"].size(0))


def _token_count(batch: Any) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
