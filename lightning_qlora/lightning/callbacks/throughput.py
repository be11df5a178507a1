"""Tokens per second to the logger, through Lightning's own ``ThroughputMonitor``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import ThroughputMonitor


def token_throughput_monitor(window_size: int = 20) -> ThroughputMonitor:
    """A ``ThroughputMonitor`` that counts tokens: non-padding ones of ``{"input_ids", "attention_mask"}`` batches,
    every element of ``(input_ids, ...)`` batches.

    Logs ``train/device/items_per_sec`` (tokens/s of this device) and ``train/device/samples_per_sec``, plus the
    world totals ``train/items_per_sec`` and ``train/samples_per_sec`` when several devices train, every
    ``log_every_n_steps`` once ``window_size`` batches have been seen.
    """
    return ThroughputMonitor(batch_size_fn=_batch_size, length_fn=count_tokens, window_size=window_size)


def _batch_size(batch: Any) -> int:
    return int(_input_ids(batch).size(0))


def count_tokens(batch: Any) -> int:
    """The non-padding tokens of an ``{"input_ids", "attention_mask"}`` batch, every element of ``(input_ids, ...)``."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return int(mask.sum()) if mask is not None else int(_input_ids(batch).numel())


def _input_ids(batch: Any) -> torch.Tensor:
    # {"input_ids": ...} from our data module, or (input_ids, ...) from a TensorDataset.
    if isinstance(batch, dict):
        return batch["input_ids"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch
