"""``TrainingCurves``: one PNG with the training loss and the peak memory over steps."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora._imports import require
from lightning_qlora.lightning.callbacks.peak_memory import GIB, current_rss_bytes, peak_rss_bytes


class TrainingCurves(Callback):
    """Record ``train/loss`` and peak memory at every step and draw them into ``path`` at the end of fit.

    Args:
        path: the PNG to write; ``None`` writes ``<trainer.default_root_dir>/training_curves.png``.
        loss_key: the logged metric to plot.
    """

    def __init__(self, path: str | os.PathLike | None = None, loss_key: str = "train/loss") -> None:
        self.path = Path(path) if path is not None else None
        self.loss_key = loss_key
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.memory_gib: list[float] = []
        self.current_gib: list[float] = []
        self.memory_label = "peak memory (GiB)"
        self.current_label = "current"

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        self.steps.append(trainer.global_step)
        self.losses.append(float(loss.detach()))
        if trainer.strategy.root_device.type == "cuda":
            import torch

            device = trainer.strategy.root_device
            self.memory_gib.append(torch.cuda.max_memory_allocated(device) / GIB)
            self.current_gib.append(torch.cuda.memory_allocated(device) / GIB)
            self.memory_label, self.current_label = "peak allocated (CUDA)", "allocated after step"
        else:
            self.memory_gib.append(peak_rss_bytes() / GIB)
            current = current_rss_bytes()
            if current is not None:
                self.current_gib.append(current / GIB)
            self.memory_label, self.current_label = "peak RSS (CPU process)", "RSS after step"

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        path = self.path or Path(trainer.default_root_dir) / "training_curves.png"
        self.write(path)
        rank_zero_info(f"Training curves written to {path}")

    def write(self, path: Path) -> Path:
        matplotlib = require("matplotlib", "TrainingCurves (the loss and memory PNG)", "pip install matplotlib")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_loss, ax_mem) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        ax_loss.plot(self.steps, self.losses, color="tab:blue", linewidth=1.2)
        ax_loss.set_ylabel(self.loss_key)
        ax_loss.set_title("QLoRA fine-tuning")
        ax_loss.grid(alpha=0.3)
        ax_mem.plot(self.steps, self.memory_gib, color="tab:red", linewidth=1.4, label=self.memory_label)
        if len(self.current_gib) == len(self.steps):
            ax_mem.plot(self.steps, self.current_gib, color="tab:orange", linewidth=1.0, label=self.current_label)
        ax_mem.set_ylabel("memory (GiB)")
        ax_mem.legend(loc="lower right")
        ax_mem.set_xlabel("optimizer step")
        ax_mem.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, path)
        return path


