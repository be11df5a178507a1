"""Lightning callbacks: adapter-only checkpoints, peak memory, training curves."""

from lightning_qlora.lightning.callbacks.adapter_checkpoint import AdapterCheckpoint
from lightning_qlora.lightning.callbacks.peak_memory import PeakMemoryMonitor
from lightning_qlora.lightning.callbacks.progress import PlainProgress, StepProgressBar, progress_callback
from lightning_qlora.lightning.callbacks.training_curves import TrainingCurves
from lightning_qlora.lightning.callbacks.training_guards import (
    NoAdapterGradientError,
    NonFiniteLossError,
    TrainingGuard,
)

__all__ = [
    "AdapterCheckpoint",
    "NoAdapterGradientError",
    "NonFiniteLossError",
    "PeakMemoryMonitor",
    "PlainProgress",
    "StepProgressBar",
    "TrainingCurves",
    "TrainingGuard",
    "progress_callback",
]
