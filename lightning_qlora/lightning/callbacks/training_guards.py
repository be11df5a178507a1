"""``TrainingGuard``: stop (or skip) on a non-finite loss, and fail fast when no gradient reaches the adapters."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_qlora.errors import QLoRAError
from lightning_qlora.optim.in_backward import OptimizerInBackward

log = logging.getLogger(__name__)


class NonFiniteLossError(QLoRAError, RuntimeError):
    """The training loss became NaN or infinite."""


class NoAdapterGradientError(QLoRAError, RuntimeError):
    """Backward ran but no gradient reached the LoRA adapters: training would learn nothing."""


class TrainingGuard(Callback):
    """Catch the two ways a long fine-tune silently goes wrong, before they cost hours.

    - A NaN or infinite loss: ``on_nan="stop"`` raises :class:`NonFiniteLossError` naming the step and batch index
      before the optimizer step, so the adapters (and the last adapter checkpoint) stay at their last good values;
      ``on_nan="skip"`` drops that batch's gradients (no update) and warns, up to ``max_skips`` times in a row.
    - Gradients that never reach the adapters (for example a frozen layer whose backward is missing): during the
      first ``check_steps`` steps, if fewer than ``min_gradient_fraction`` of the ``lora_B`` weights receive a
      non-zero gradient, it raises :class:`NoAdapterGradientError` naming adapters that got none. (A broken base
      layer blocks the gradient to every adapter before it, so most adapters go silent, not just one.)

    Args:
        on_nan: ``"stop"`` or ``"skip"``.
        max_skips: with ``"skip"``, how many non-finite batches in a row are tolerated before stopping anyway.
        check_steps: how many first steps to check gradient flow on (0 disables the check).
    """

    def __init__(
        self,
        on_nan: Literal["stop", "skip"] = "stop",
        max_skips: int = 10,
        check_steps: int = 2,
        min_gradient_fraction: float = 0.5,
    ) -> None:
        if on_nan not in ("stop", "skip"):
            raise ValueError(f"TrainingGuard(on_nan={on_nan!r}) must be 'stop' or 'skip'.")
        self.on_nan = on_nan
        self.max_skips = max_skips
        self.check_steps = check_steps
        self.min_gradient_fraction = min_gradient_fraction
        self.skipped: list[tuple[int, int]] = []
        self._consecutive = 0
        self._skip_this_batch = False

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._skip_this_batch = False
        if torch.isfinite(loss.detach()).all():
            self._consecutive = 0
            self._prepare_steps_in_backward(trainer)
            return
        progress: Any = trainer.fit_loop.epoch_loop.batch_progress.current  # a _ProcessedTracker at run time
        step, batch_idx = trainer.global_step, progress.processed
        where = f"loss is {loss.detach().float().item()} at optimizer step {step}, batch index {batch_idx}"
        if self.on_nan == "stop" or self._consecutive >= self.max_skips:
            raise NonFiniteLossError(
                f"Training stopped: the {where}. The adapters were not updated with it. Check that batch for bad "
                "data, lower the learning rate, or enable gradient clipping (trainer.gradient_clip_val=1.0); "
                "TrainingGuard(on_nan='skip') skips such batches instead."
            )
        self._consecutive += 1
        self._skip_this_batch = True
        self.skipped.append((step, batch_idx))
        rank_zero_warn(f"Skipping a batch: the {where} ({self._consecutive} in a row).")
        self._prepare_steps_in_backward(trainer)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if not self._skip_this_batch:
            broken = _non_finite_gradients(pl_module)
            if broken:
                lr = optimizer.param_groups[0].get("lr")
                where = (f"gradients of {len(broken)} adapter tensor(s) hold NaN or inf at optimizer step "
                         f"{trainer.global_step} although the loss is finite (e.g. {broken[0]})")
                if self.on_nan == "stop" or self._consecutive >= self.max_skips:
                    raise NonFiniteLossError(
                        f"Training stopped before the update: the {where}. The adapters were not updated with them "
                        f"and no adapter holding them is saved. The learning rate (lr={lr}) may be too high, or the "
                        "model overflows in its compute dtype: lower lr, clip gradients (trainer.gradient_clip_val="
                        "1.0), or skip such batches with TrainingGuard(on_nan='skip')."
                    )
                self._consecutive += 1
                self._skip_this_batch = True
                rank_zero_warn(f"Skipping a batch: the {where} ({self._consecutive} in a row).")
        if self._skip_this_batch:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None  # AdamW leaves parameters without a gradient untouched
            return
        if trainer.global_step < self.check_steps:
            self._check_gradient_flow(pl_module, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        broken = _non_finite_parameters(pl_module)
        if broken:
            lrs = [group.get("lr") for optimizer in trainer.optimizers for group in optimizer.param_groups]
            raise NonFiniteLossError(
                f"Training stopped: after optimizer step {trainer.global_step} {len(broken)} adapter tensor(s) hold "
                f"NaN or inf (e.g. {broken[0]}): the update diverged (lr={lrs[0] if lrs else '?'}). Adapters holding "
                "them are never saved: the last good adapter on disk stays. Lower the learning rate or clip gradients."
            )

    def _prepare_steps_in_backward(self, trainer: Trainer) -> None:
        """An optimizer stepping inside backward must hear before backward: skip this batch, record gradients."""
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, OptimizerInBackward):
                if self._skip_this_batch:
                    optimizer.skip_next_backward()
                optimizer.record_gradients = trainer.global_step < self.check_steps

    def _check_gradient_flow(self, pl_module: LightningModule, optimizer: Any = None) -> None:
        adapters = [(n, p) for n, p in pl_module.named_parameters() if n.endswith("lora_B.weight") and p.requires_grad]
        if not adapters:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        if isinstance(optimizer, OptimizerInBackward):  # the gradients are gone already; it kept which ones came
            flowing = {n for n, p in adapters if p in optimizer.gradients_seen}
        else:
            flowing = {n for n, p in adapters if p.grad is not None and bool(p.grad.detach().abs().sum() > 0)}
        if len(flowing) < self.min_gradient_fraction * len(adapters):
            silent = [n for n, _ in adapters if n not in flowing]
            raise NoAdapterGradientError(
                f"Only {len(flowing)} of {len(adapters)} LoRA adapters received a gradient at step "
                f"{pl_module.trainer.global_step} (none reached e.g. {', '.join(silent[:3])}): training would learn "
                "(almost) nothing. Typical causes: a frozen layer whose backward is missing (bitsandbytes' CPU "
                "inference layout after generate() on a plain bnb.nn.Linear4bit), a loss detached from the model, "
                "or torch.no_grad() around the forward."
            )
        if len(flowing) < len(adapters):
            log.info("Gradient check: %d of %d adapters received gradient.", len(flowing), len(adapters))


def _non_finite_gradients(module: LightningModule) -> list[str]:
    """Names of the trainable parameters whose gradient holds NaN or inf (empty when all are finite)."""
    return [
        name for name, param in module.named_parameters()
        if param.requires_grad and param.grad is not None and not bool(param.grad.detach().isfinite().all())
    ]


def _non_finite_parameters(module: LightningModule) -> list[str]:
    """Names of the trainable parameters holding NaN or inf."""
    return [n for n, p in module.named_parameters() if p.requires_grad and not bool(p.detach().isfinite().all())]
