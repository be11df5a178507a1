"""``strategy="qlora_ddp"``: data-parallel QLoRA through Lightning's own DDP."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy

from lightning_qlora.lightning.checkpoint_io import AtomicCheckpointIO
from lightning_qlora.lightning.strategies.mixin import QLoRAStrategyMixin


class QLoRADDPStrategy(QLoRAStrategyMixin, DDPStrategy):
    """Data-parallel QLoRA through Lightning's own DDP: ``Trainer(strategy="qlora_ddp", devices=N)``.

    Each rank quantizes its own copy of the base on its device (layer by layer); DDP all-reduces only the gradients
    of parameters that require grad, i.e. the adapters. Checkpoints are adapter-only and written by rank zero;
    launching is Lightning's (its subprocess launcher, ``torchrun`` or SLURM), never ours.

    Args:
        **kwargs: passed to Lightning's ``DDPStrategy``.

    Example:
        >>> trainer = Trainer(strategy="qlora_ddp", accelerator="gpu", devices=2)  # doctest: +SKIP
    """

    strategy_name = "qlora_ddp"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(**kwargs)
