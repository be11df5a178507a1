"""Optimizers for adapters: ``AdamW8bit`` (8-bit moments, FSDP2-aware) and ``OptimizerInBackward``. Plain torch."""

from lightning_qlora.optim.adamw8bit import AdamW8bit
from lightning_qlora.optim.in_backward import OptimizerInBackward

__all__ = ["AdamW8bit", "OptimizerInBackward"]
