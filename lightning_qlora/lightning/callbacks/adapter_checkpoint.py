"""``AdapterCheckpoint``: save only the LoRA adapters, in PEFT format, atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_qlora.lightning.interruption import is_graceful_stop
from lightning_qlora.lora.peft_format import adapter_state_dict, save_adapter

log = logging.getLogger(__name__)


class AdapterCheckpoint(Callback):
    """Write the adapters (never the base weights) as PEFT adapter directories during and after training.

    Every ``every_n_train_steps`` optimizer steps it writes ``<dirpath>/step-<N>``; with ``save_last`` it also keeps
    ``<dirpath>/last`` up to date and writes it at the end of fit. Each directory holds
    ``adapter_model.safetensors`` + ``adapter_config.json`` and loads with ``peft.PeftModel.from_pretrained``. Writes
    are atomic: an interrupted save leaves the previous adapter intact. Only rank zero writes.

    Args:
        dirpath: where adapter directories go; ``None`` uses ``<trainer.default_root_dir>/adapters``.
        every_n_train_steps: save every N optimizer steps; ``0`` or ``None`` saves only at the end.
        save_last: keep ``<dirpath>/last`` (updated at every save and at the end of fit).
        base_model_name_or_path: recorded in ``adapter_config.json``; by default the model's ``config._name_or_path``.

    Example:
        >>> trainer = Trainer(strategy="qlora", callbacks=[AdapterCheckpoint("adapters/", every_n_train_steps=100)])

    Attributes:
        last_path: the most recent adapter directory written (``None`` before the first save).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_train_steps: int | None = None,
        save_last: bool = True,
        base_model_name_or_path: str | None = None,
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps={every_n_train_steps} must be >= 0 (0 or None: only at the end).")
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_last = save_last
        self.base_model_name_or_path = base_model_name_or_path
        self.last_path: Path | None = None
        self._last_saved_step = -1

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "adapters"

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self.save(trainer, pl_module, f"step-{step:06d}")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._last_saved_step == trainer.global_step and self.last_path is not None:
            return  # a periodic save at this very step already wrote (and refreshed `last`)
        if self.save_last or not self.every_n_train_steps:
            self.save(trainer, pl_module, "last" if self.save_last else f"step-{trainer.global_step:06d}")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if is_graceful_stop(exception) and (self.save_last or not self.every_n_train_steps):
            self.save(trainer, pl_module, "last" if self.save_last else f"step-{trainer.global_step:06d}")

    def save(self, trainer: Trainer, pl_module: LightningModule, name: str) -> Path | None:
        """Save the adapters under ``dirpath/name`` (and refresh ``dirpath/last``), on rank zero only.

        Adapters holding NaN or inf are never written (the last good adapter on disk stays): an error is logged and
        ``None`` returned.
        """
        assert self.dirpath is not None
        names = [name] + (["last"] if self.save_last and name != "last" else [])
        state = adapter_state_dict(pl_module)  # on every rank: sharded (FSDP) adapters are gathered collectively
        broken = [key for key, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
        if broken:
            log.error(
                "Not saving the adapters at step %d: %d tensor(s) hold NaN or inf (e.g. %s); the last adapter saved "
                "in %s stays as it was. Lower the learning rate or clip gradients.",
                trainer.global_step, len(broken), broken[0], self.dirpath,
            )
            return None
        if trainer.is_global_zero:
            metadata = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
            for each in names:
                path = save_adapter(
                    pl_module, self.dirpath / each, base_model_name_or_path=self.base_model_name_or_path,
                    metadata=metadata, state=state,
                )
                size = sum(f.stat().st_size for f in path.iterdir())
                rank_zero_info(f"Adapter saved to {path} ({size / 2**20:.1f} MiB, step {trainer.global_step})")
        self.last_path = self.dirpath / names[-1]
        self._last_saved_step = trainer.global_step
        trainer.strategy.barrier("AdapterCheckpoint.save")
        return self.last_path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath) if self.dirpath else None, "last_saved_step": self._last_saved_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_saved_step = state_dict.get("last_saved_step", -1)
