"""A small QLoRA fine-tune run as a separate process, so tests can SIGKILL it mid-run and resume it.

    python tests/resume_worker.py --out DIR --max-steps 24 [--kill-at 10] [--resume]

Writes one "step loss" line per optimizer step to DIR/losses.txt (flushed immediately), and Lightning checkpoints
(adapter-only, strategy="qlora") to DIR/checkpoints after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_qlora import AdapterCheckpoint, LoRAConfig, QLoRAPlugin
from lightning_qlora.app.data import InstructionDataModule
from lightning_qlora.app.models import CausalLMFineTune


class RecordLoss(Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with self.path.open("a") as handle:
            handle.write(f"{trainer.global_step} {float(outputs['loss']):.8f}\n")
            handle.flush()
            os.fsync(handle.fileno())


class KillAt(Callback):
    def __init__(self, step: int, signum: int = signal.SIGKILL) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # In the middle of a step: after the checkpoint of the previous step, before this step's update.
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True, help="a tiny random-weight Llama directory")
    parser.add_argument("--data", required=True, help="a JSONL file")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT"])
    parser.add_argument("--checkpoint-every", type=int, default=1)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # deterministic CPU reductions across processes
    seed_everything(7, verbose=False)
    datamodule = InstructionDataModule(args.model, source="file", path=args.data, max_length=48, max_tokens=96,
                                       batch_size=2, val_size=4)
    module = CausalLMFineTune(args.model, lr=5e-3, warmup_steps=2)
    callbacks = [RecordLoss(out / "losses.txt"),
                 ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=args.checkpoint_every, save_last=True,
                                 save_top_k=0),
                 AdapterCheckpoint(out / "adapter", every_n_train_steps=0)]
    if args.kill_at >= 0:
        callbacks.append(KillAt(args.kill_at, getattr(signal, f"SIG{args.signal}")))
    trainer = Trainer(
        accelerator="cpu", strategy="qlora", max_steps=args.max_steps, callbacks=callbacks, logger=False,
        plugins=[QLoRAPlugin(lora=LoRAConfig(r=4, alpha=8, dropout=0.1))],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule, ckpt_path="last" if args.resume else None)
    (out / "done.json").write_text(json.dumps({"global_step": trainer.global_step}))


if __name__ == "__main__":
    sys.exit(main())
