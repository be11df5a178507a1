"""Training progress a person can read: a bar that counts steps of ``max_steps`` on a terminal, plain log lines
everywhere else (``nohup``, CI, ``| tee``), where a redrawn bar shows nothing until it ends.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora.lightning.callbacks.throughput import count_tokens


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar over optimizer steps of ``max_steps`` (not ``Epoch 0/-2``), with the loss and tokens/s."""

    def __init__(self, refresh_rate: int = 1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self._clock = _TokenClock()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._clock.start(trainer)

    @override
    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if trainer.max_steps > 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("Training steps")

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._clock.count(batch)
        if trainer.max_steps > 0:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k != "v_num"}
        rate = self._clock.tokens_per_second()
        if rate is not None:
            metrics["tok/s"] = f"{rate:,.0f}"
        return metrics


class PlainProgress(Callback):
    """One log line every ``every_n_steps`` optimizer steps: the step of ``max_steps``, the loss, the learning
    rate, tokens/s, elapsed time and an estimate of what is left.

    Args:
        every_n_steps: how often to write a line (and at the last step).
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"PlainProgress(every_n_steps={every_n_steps}) must be >= 1.")
        self.every_n_steps = every_n_steps
        self._clock = _TokenClock()

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._clock.start(trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._clock.count(batch)
        step, total = trainer.global_step, trainer.max_steps
        if step % self.every_n_steps and step != total:
            return
        parts = [f"step {step}/{total}" if total > 0 else f"step {step}"]
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            parts.append(f"loss {float(loss.detach()):.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        rate = self._clock.tokens_per_second()
        if rate is not None:
            parts.append(f"{rate:,.0f} tokens/s")
        elapsed = self._clock.elapsed()
        parts.append(f"elapsed {_duration(elapsed)}")
        done = step - self._clock.first_step
        if total > 0 and done > 0:
            parts.append(f"left ~{_duration(elapsed / done * (total - step))}")
        rank_zero_info(" | ".join(parts))


def progress_callback(every_n_steps: int = 10, interactive: bool | None = None) -> Callback:
    """The bar on a terminal, plain lines otherwise (``interactive=None``: whether stdout is a terminal)."""
    terminal = sys.stdout.isatty() if interactive is None else interactive
    return StepProgressBar() if terminal else PlainProgress(every_n_steps)


class _TokenClock:
    """Tokens seen since training started (``attention_mask`` sums, else every token) and the time it took."""

    def __init__(self) -> None:
        self.tokens = 0
        self.first_step = 0
        self._started = time.perf_counter()

    def start(self, trainer: Trainer) -> None:
        self.tokens, self.first_step, self._started = 0, trainer.global_step, time.perf_counter()

    def count(self, batch: Any) -> None:
        with contextlib.suppress(TypeError, KeyError, IndexError, AttributeError):  # (no token ids: no tokens/s)
            self.tokens += count_tokens(batch)

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def tokens_per_second(self) -> float | None:
        seconds = self.elapsed()
        return self.tokens / seconds if self.tokens and seconds > 0 else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
