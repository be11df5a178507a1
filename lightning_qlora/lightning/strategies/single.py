"""``strategy="qlora"``: QLoRA on one device."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy
from typing_extensions import override

from lightning_qlora.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_qlora.lightning.strategies.mixin import QLoRAStrategyMixin


class QLoRAStrategy(QLoRAStrategyMixin, SingleDeviceStrategy):
    """Single-device strategy that converts the model on the accelerator and checkpoints adapters only.

    - Quantization runs on the training device, one linear at a time, so on CUDA conversion never holds more than the
      4-bit model plus one full-precision layer there. Layers built on the meta device (e.g. in ``configure_model``)
      are materialized one at a time on the device and quantized right away.
    - Without a :class:`~lightning_qlora.QLoRAPlugin` in ``plugins`` it uses ``QLoRAPlugin()`` (NF4, double quant,
      bf16, LoRA r=16).
    - GPTQ codes and the error-correcting adapter init are calibrated at set-up on the datamodule's first training
      rows.
    - Lightning checkpoints (``.ckpt``) hold the trainable (adapter) weights, optimizer, schedulers, loops and RNG
      state, never the frozen base, which is rebuilt from the pretrained weights on resume. They are written
      atomically (:class:`~lightning_qlora.lightning.checkpoint_io.AtomicCheckpointIO`).
    - CUDA out-of-memory errors are re-raised as ``QLoRAOutOfMemoryError`` with the peak and the remedies.

    For several devices use :class:`~lightning_qlora.QLoRADDPStrategy` (``strategy="qlora_ddp"``).

    Args:
        device: the device (default: the one ``accelerator=`` and ``devices=`` choose, else the CPU).
        **kwargs: passed to Lightning's ``SingleDeviceStrategy``.

    Example:
        >>> trainer = Trainer(strategy="qlora", accelerator="cpu", max_steps=10)  # doctest: +SKIP
    """

    strategy_name = "qlora"
    supports_calibration = True
    supports_optimizer_in_backward = True

    def __init__(self, device: torch.device | str | int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        # Filled in by the Trainer from `accelerator=`/`devices=` when the strategy is chosen by name.
        self.parallel_devices: list[torch.device] | None = None if device is None else [self._root_device]

    @property
    @override
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            return self.parallel_devices[0]
        return self._root_device

    @override
    def setup(self, trainer: Trainer) -> None:
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='qlora' trains on one device, but devices={len(self.parallel_devices)} were requested. "
                "Use strategy='qlora_ddp' for several devices (each rank quantizes its own copy; only adapter "
                "gradients are all-reduced)."
            )
        super().setup(trainer)
