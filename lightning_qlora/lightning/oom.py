"""CUDA out-of-memory errors re-raised with the measured peak and the settings that lower it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_qlora.errors import QLoRAError


class QLoRAOutOfMemoryError(QLoRAError, torch.cuda.OutOfMemoryError):
    """CUDA ran out of memory; the message has the measured peak and the settings that lower it."""


@contextmanager
def explain_out_of_memory(strategy: Any, phase: str) -> Iterator[None]:
    """Turn a ``torch.cuda.OutOfMemoryError`` raised inside into a :class:`QLoRAOutOfMemoryError`.

    Raises:
        QLoRAOutOfMemoryError: naming the phase, the step, the peak, the device's total and what lowers it.
    """
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        if isinstance(err, QLoRAOutOfMemoryError):
            raise
        device = strategy.root_device
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        module = strategy.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        step = trainer.global_step if trainer is not None else "?"
        raise QLoRAOutOfMemoryError(
            f"CUDA ran out of memory in {phase} at step {step} on {torch.cuda.get_device_name(device)}: peak allocated "
            f"{peak:.2f} GiB of {total:.1f} GiB. To lower it: a smaller batch (data.batch_size), shorter sequences "
            "(data.max_length), activation checkpointing (model.gradient_checkpointing=true), a smaller LoRA rank "
            f"(lora.r), or an 8-bit optimizer. (torch: {str(err).splitlines()[0][:200]})"
        ) from err
