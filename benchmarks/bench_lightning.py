"""One QLoRA training run through Lightning's ``Trainer`` and our strategies, on a random-weight Llama shape.

    python benchmarks/bench_lightning.py --strategy qlora      --devices 1 --shape 7b --seq 2048 --rank 16 --out DIR
    python benchmarks/bench_lightning.py --strategy qlora_ddp  --devices 2 --shape 7b --seq 2048 --rank 16 --out DIR
    python benchmarks/bench_lightning.py --strategy qlora_fsdp --devices 2 --shape 65b --seq 512 --rank 64 \
        --optimizer adamw8bit --epochs 2 --save-epoch 0 --out DIR [--resume DIR/epoch0.ckpt]

What a user writes: a LightningModule whose ``configure_model`` builds the model on the meta device, and
``Trainer(strategy=..., devices=N, plugins=[QLoRAPlugin(...)])``; the strategy quantizes it layer by layer on each
GPU (NF4 + double quant, bf16 compute) and injects LoRA on every linear layer (r, alpha 2r, dropout 0.05).
Launching is Lightning's: it re-runs this script once per extra rank. Each rank writes ``DIR/facts_rank<R>.json``:
step times, tokens/s (all ranks together), peak allocated/reserved GiB (conversion, steps, and the whole run with
checkpoints), losses, and for DDP the largest difference between its adapters and rank zero's. ``AdapterCheckpoint``
writes the PEFT adapter to ``DIR/adapter/last``; ``--save-epoch E`` writes ``DIR/epoch<E>.ckpt`` (adapter-only
Lightning checkpoint) at the end of epoch E, which ``--resume`` continues from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qlora import SHAPES  # noqa: E402

from lightning_qlora import AdamW8bit, AdapterCheckpoint, LoRAConfig, QLoRAPlugin, QuantConfig  # noqa: E402
from lightning_qlora.lora import trainable_state_dict  # noqa: E402

VOCAB = 32000
GIB = 2**30


class RepeatedSequence(Dataset):
    """One random token sequence, ``rows`` times: the loss falls within a few steps when the adapters learn."""

    def __init__(self, rows: int, seq: int) -> None:
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, VOCAB, (1, seq), generator=generator).expand(rows, seq)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.ids[index]


class RandomLlama(LightningModule):
    def __init__(self, shape: str, checkpointing: bool, lr: float, optimizer: str) -> None:
        super().__init__()
        self.shape, self.checkpointing, self.lr, self.optimizer_name = shape, checkpointing, lr, optimizer
        self.model: nn.Module | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPES[self.shape])
        config._attn_implementation = "sdpa"
        with torch.device("meta"):  # never materialized whole: the strategy quantizes it layer by layer
            model = LlamaForCausalLM(config)
        with torch.device("cpu"):  # what has no reset_parameters(): norms at one, the rotary table computed
            for module in model.modules():
                if type(module).__name__.endswith("RMSNorm"):
                    module.weight = nn.Parameter(torch.ones(module.weight.shape))
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        if self.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(round(loss.item(), 5))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adamw8bit":
            return AdamW8bit(params, lr=self.lr, weight_decay=0.0)
        return torch.optim.AdamW(params, lr=self.lr, fused=torch.cuda.is_available())


class Measure(Callback):
    """Step times (after CUDA work finished) and peak memory: conversion, training steps, the whole run."""

    def __init__(self, save_epoch: int | None, out: Path, profile_step: int | None = None) -> None:
        self.times: list[float] = []
        self.save_epoch, self.out, self.profile_step = save_epoch, out, profile_step
        self.peak: dict[str, float] = {}
        self.profiler = None
        self.profile: dict[str, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.profile_step is not None and trainer.global_step == self.profile_step:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.profile_started = time.perf_counter()

    def _record(self, name: str) -> None:
        if not torch.cuda.is_available():
            return
        self.peak[f"{name}_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        self.peak[f"{name}_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)

    def on_train_start(self, trainer, pl_module) -> None:
        self._record("setup")
        if torch.cuda.is_available():
            self.peak["static_alloc_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
            torch.cuda.reset_peak_memory_stats()
        self.saved = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        if self.profiler is not None:  # one profiled step: where its time goes, per rank
            self.profiler.__exit__(None, None, None)
            wall = time.perf_counter() - self.profile_started
            events = self.profiler.key_averages()
            kernels = sum(e.self_device_time_total for e in self.profiler.events()
                          if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
            nccl = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower()) / 1e6
            self.profile = {"profiled_step_s": round(wall, 4), "gpu_kernel_s": round(kernels, 4),
                            "nccl_kernel_s": round(nccl, 4), "gpu_busy": round(kernels / wall, 3) if wall else None}
            table = events.table(sort_by="self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total",
                                 row_limit=30, max_name_column_width=70)
            (self.out / f"profile_rank{trainer.global_rank}.txt").write_text(json.dumps(self.profile) + "\n" + table)
            self.profiler = None
        if not self.saved:  # the training steps alone, before any checkpoint was written
            self._record("steps")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.save_epoch is not None and trainer.current_epoch == self.save_epoch:
            trainer.save_checkpoint(self.out / f"epoch{self.save_epoch}.ckpt")  # every rank: gathered under FSDP
            self.saved = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="qlora", choices=["qlora", "qlora_ddp", "qlora_fsdp"])
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ckpt", type=int, default=1, help="activation checkpointing")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--compile", default="", help="QLoRAPlugin(compile=...): a torch.compile mode, e.g. reduce-overhead")
    ap.add_argument("--steps", type=int, default=13, help="optimizer steps per epoch on each rank (batch 1)")
    ap.add_argument("--profile-step", type=int, default=None,
                    help="profile this step (torch.profiler; DIR/profile_rank<R>.txt) and time only the steps before it")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--save-epoch", type=int, default=None, help="write DIR/epoch<E>.ckpt at the end of epoch E")
    ap.add_argument("--resume", default=None, help="a checkpoint written by --save-epoch")
    ap.add_argument("--out", required=True)
    ap.add_argument("--accelerator", default="gpu", help="cpu only to smoke-test this script (tiny shape, gloo)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0, verbose=False)  # every rank builds the same random base
    measure = Measure(a.save_epoch, out, a.profile_step)
    module = RandomLlama(a.shape, bool(a.ckpt), a.lr, a.optimizer)
    trainer = Trainer(
        accelerator=a.accelerator,
        devices=a.devices,
        strategy=a.strategy,
        plugins=[QLoRAPlugin(quant=QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="bf16"),
                             lora=LoRAConfig(r=a.rank, alpha=2 * a.rank, dropout=0.05), compile=a.compile or False)],
        callbacks=[measure, AdapterCheckpoint(out / "adapter", every_n_train_steps=0)],
        max_epochs=a.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dataset = RepeatedSequence(a.steps * a.devices, a.seq)  # Lightning's sampler gives each rank `steps` rows
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False)
    started = time.perf_counter()
    trainer.fit(module, loader, ckpt_path=a.resume)
    fit_s = time.perf_counter() - started
    measure._record("run")  # since training started: steps, checkpoints, the adapter save
    facts = {"strategy": a.strategy, "devices": a.devices, "world_size": trainer.world_size, "shape": a.shape,
             "seq": a.seq, "rank": a.rank, "ckpt": a.ckpt, "optimizer": a.optimizer, "epochs": a.epochs,
             "compile": a.compile or None,
             "global_step": trainer.global_step, "fit_s": round(fit_s, 1), "losses": module.losses,
             "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, **measure.peak,
             **measure.profile}
    # The first epoch (later ones include checkpoint writes), and only the steps before a profiled one.
    times = measure.times[: min(a.steps, a.profile_step if a.profile_step is not None else a.steps)]
    if len(times) > a.warmup + 1:
        step_s = (times[-1] - times[a.warmup]) / (len(times) - 1 - a.warmup)
        facts.update(step_s=round(step_s, 4), tok_s=round(trainer.world_size * a.seq / step_s),
                     timed_steps=len(times) - 1 - a.warmup)
    state = trainable_state_dict(module)  # whole adapters (gathered under FSDP)
    facts["adapter_values"] = sum(t.numel() for t in state.values())
    facts["adapter_checksum"] = float(sum(t.double().sum().item() for t in state.values()))
    if trainer.world_size > 1 and a.strategy == "qlora_ddp":
        import torch.distributed as dist

        worst = 0.0
        device = torch.device("cuda", torch.cuda.current_device()) if a.accelerator == "gpu" else torch.device("cpu")
        for name in sorted(state):  # each rank's adapters against rank zero's, tensor by tensor
            # (after fit Lightning has moved the module back to the CPU; NCCL broadcasts GPU tensors)
            mine = state[name].detach().to(device)
            reference = mine.clone()
            dist.broadcast(reference, src=0)
            worst = max(worst, (reference - mine).abs().max().item())
        facts["max_diff_vs_rank0"] = worst
    (out / f"facts_rank{trainer.global_rank}.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps({k: v for k, v in facts.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
