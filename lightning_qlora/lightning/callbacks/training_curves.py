"""``TrainingCurves``: one PNG with the training loss, validation points, the learning rate and memory over steps."""

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
    """Record ``train/loss``, the learning rate and peak memory at every step, and ``val_key`` after each
    validation, and draw them into ``path`` at the end of fit, titled with the run.

    Args:
        path: the PNG to write; ``None`` writes ``<trainer.default_root_dir>/training_curves.png``.
        loss_key: the logged metric to plot.
        val_key: the validation metric drawn as points on the loss panel (when logged).
        title: the figure's title (e.g. the run's name, settings and date); default: the PNG's directory.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        loss_key: str = "train/loss",
        val_key: str = "val/loss",
        title: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.loss_key = loss_key
        self.val_key = val_key
        self.title = title
        self.learning_rates: list[float] = []
        self.validation: list[tuple[int, float]] = []
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
        if trainer.optimizers:
            self.learning_rates.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
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

    def add_validation(self, step: int, value: float) -> None:
        """A validation point drawn on the loss panel (validation runs also add theirs by themselves)."""
        self.validation.append((step, value))

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.val_key)
        if value is not None and not trainer.sanity_checking:
            self.validation.append((trainer.global_step, float(value)))

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

        fig, (ax_loss, ax_mem) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
        ax_loss.plot(self.steps, self.losses, color="tab:blue", linewidth=1.2, label=self.loss_key)
        if self.validation:
            steps, values = zip(*self.validation, strict=True)
            ax_loss.plot(steps, values, "o", color="tab:green", markersize=6, label=self.val_key)
        ax_loss.set_ylabel("loss")
        ax_loss.legend(loc="upper right")
        ax_loss.grid(alpha=0.3)
        if len(self.learning_rates) == len(self.steps) and self.learning_rates:
            ax_lr = ax_loss.twinx()
            ax_lr.plot(self.steps, self.learning_rates, color="tab:gray", linewidth=0.9, linestyle="--")
            ax_lr.set_ylabel("learning rate", color="tab:gray")
            ax_lr.tick_params(axis="y", labelcolor="tab:gray")
        fig.suptitle(self.title or f"QLoRA fine-tuning: {path.parent.name}", fontsize=10)
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


