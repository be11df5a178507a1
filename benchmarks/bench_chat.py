"""Variable-length rows through ``Trainer`` with the plugin's defaults: issue 19's benchmark (ours; the anchor is
``peft_qlora.py --shape llama3-8b --lengths lognormal:350:4096 --bs 4 --ckpt 1``, run beside it).

    python benchmarks/bench_chat.py --shape llama3-8b --out DIR                      # the defaults (compile='auto')
    python benchmarks/bench_chat.py --shape llama3-8b --compile false --out DIR      # eager, for comparison
    python benchmarks/bench_chat.py --shape llama3-8b --compile reduce-overhead --in-backward --out DIR  # hand-set

Rows have the anchor's lengths (log-normal, sigma 0.8, mean 350 tokens, cut to [16, 4096]; random token ids, every
token trained on, as the anchor's labels) and are packed by the app's packing (best-fit decreasing into 4,096-token
budgets, positions restarting per row: ``lightning_qlora.app.data.packing``) in a datamodule that says its batches
have one shape. The model is built on the meta device in ``configure_model`` and converted by
``Trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=16, alpha=32, dropout=0.05))])`` (NF4 + double
quant, bf16 compute, LoRA on every linear layer but the head, as the anchor), activation checkpointing on, torch's
fused AdamW (lr 1e-4) like the anchor, the loss as the app's module takes it (head and cross-entropy in chunks;
``--plain-loss``: transformers' own). Prints one JSON line: real tokens/s (non-padding tokens), peak allocated GiB,
MFU, step time.

MFU counts FLOPs per token as 4 x (linear parameters, the head included) + 6 x layers x hidden x (the token's row
length): the LoRA convention, no weight gradients for the frozen base, checkpoint recompute not counted; against
989 TFLOP/s (the H200's and H100's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_qlora import LoRAConfig, QLoRAPlugin  # noqa: E402
from lightning_qlora.app.data.packing import PackedRows, collate_packed  # noqa: E402
from lightning_qlora.kernels.chunked_loss import causal_lm_loss  # noqa: E402
from lightning_qlora.optim.in_backward import OptimizerInBackward  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
PEAK_FLOPS = 989e12
GIB = 2**30


def lognormal_lengths(count: int, mean: float, cap: int, seed: int = 1) -> list[int]:
    """The anchor's row lengths: log-normal with sigma 0.8 and the given mean, clamped to [16, cap]."""
    generator = torch.Generator().manual_seed(seed)
    sigma = 0.8
    mu = math.log(mean) - sigma**2 / 2
    return torch.exp(mu + sigma * torch.randn(count, generator=generator)).clamp(16, cap).long().tolist()


def meta_model(config, model_class=None) -> nn.Module:
    """A ``model_class`` (default ``LlamaForCausalLM``) of ``config`` (SDPA attention) on the meta device, for the
    strategy to materialize and quantize block by block: the norms' weights (ones) and the rotary tables built for
    real on the CPU.
    """
    if model_class is None:
        from transformers import LlamaForCausalLM as model_class

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = model_class(config)
    with torch.device("cpu"):
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight = nn.Parameter(torch.ones(module.weight.shape))
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


class LognormalRows(LightningDataModule):
    """Random-token rows of log-normal lengths, packed into ``budget``-token rows, ``batch_size`` per step."""

    static_batch_shapes = True  # packed: every batch has one shape

    def __init__(self, rows: int, mean: float, budget: int, vocab: int, batch_size: int, flops_per_row) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        lengths = lognormal_lengths(rows, mean, budget)
        self.rows = []
        for n in lengths:
            ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
            self.rows.append({"input_ids": ids, "labels": ids})
        self.budget, self.batch_size, self.flops_per_row = budget, batch_size, flops_per_row

    def _collate(self, items):
        batch = collate_packed(items, budget=self.budget, pad_token_id=0)
        batch["flops"] = torch.tensor(float(sum(self.flops_per_row(len(r["input_ids"])) for rows in items
                                                for r in rows)))
        return batch

    def train_dataloader(self):
        packed = PackedRows(self.rows, self.budget)
        return torch.utils.data.DataLoader(packed, batch_size=self.batch_size, shuffle=True, drop_last=True,
                                           collate_fn=self._collate, generator=torch.Generator().manual_seed(3))


class RandomLlama(LightningModule):
    def __init__(self, shape: str, checkpointing: bool, in_backward: bool, chunked_loss: bool = True) -> None:
        super().__init__()
        self.shape, self.checkpointing, self.in_backward = shape, checkpointing, in_backward
        self.chunked_loss = chunked_loss
        self.model: nn.Module | None = None
        self.tokens: list[int] = []
        self.flops: list[float] = []
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaConfig

        model = meta_model(LlamaConfig(max_position_embeddings=8192, **SHAPES[self.shape]))
        if self.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model

    def training_step(self, batch, batch_idx):
        # The loss as the app's module takes it: the head and cross-entropy in chunks (no whole-row logits).
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        if self.chunked_loss:
            loss = causal_lm_loss(self.model, batch["labels"], **inputs)
        else:
            loss = self.model(**inputs, labels=batch["labels"]).loss
        self.tokens.append(int(batch["tokens"]))
        self.flops.append(float(batch["flops"]))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(round(float(outputs["loss"]), 4))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        fused = torch.cuda.is_available()
        if self.in_backward:
            return OptimizerInBackward(params, torch.optim.AdamW, lr=1e-4, fused=fused)
        return torch.optim.AdamW(params, lr=1e-4, fused=fused)


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            self.static_gib = torch.cuda.memory_allocated() / GIB
            self.setup_peak_gib = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def linear_parameters(shape: str) -> int:
    s = SHAPES[shape]
    h, inter, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + h * vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--mean", type=float, default=350)
    ap.add_argument("--budget", type=int, default=4096, help="tokens per packed row")
    ap.add_argument("--batch-size", type=int, default=1, help="packed rows per step")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ckpt", type=int, default=1)
    ap.add_argument("--compile", default="auto", help="QLoRAPlugin(compile=...): auto, false, true or a mode")
    ap.add_argument("--in-backward", action="store_true", help="AdamW stepped inside backward")
    ap.add_argument("--plain-loss", action="store_true", help="the whole row's logits (transformers' own loss)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=6, help="steps left out of the timing (compile, CUDA graphs)")
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0, verbose=False)
    s = SHAPES[a.shape]
    linear = linear_parameters(a.shape)
    flops_per_row = partial(lambda n, p, per_token_attn: n * (4 * p + per_token_attn * n), p=linear,
                            per_token_attn=6 * s["num_hidden_layers"] * s["hidden_size"])
    data = LognormalRows(a.rows, a.mean, a.budget, s["vocab_size"], a.batch_size, flops_per_row)
    module = RandomLlama(a.shape, bool(a.ckpt), a.in_backward, chunked_loss=not a.plain_loss)
    compile_setting = {"false": False, "true": True}.get(a.compile, a.compile)
    times = StepTimes()
    trainer = Trainer(
        accelerator=a.accelerator, devices=1, strategy="qlora", max_steps=a.steps,
        plugins=[QLoRAPlugin(lora=LoRAConfig(r=a.rank, alpha=2 * a.rank, dropout=0.05), compile=compile_setting)],
        callbacks=[times], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=None if a.in_backward else 1.0,
    )
    started = time.perf_counter()
    trainer.fit(module, data)
    fit_s = time.perf_counter() - started
    timed = slice(a.warmup + 1, len(times.times))
    seconds = times.times[-1] - times.times[a.warmup]
    tokens = sum(module.tokens[timed])
    flops = sum(module.flops[timed])
    facts = {
        "shape": a.shape, "rows": a.rows, "mean": a.mean, "budget": a.budget, "batch_size": a.batch_size,
        "rank": a.rank, "ckpt": a.ckpt, "compile": a.compile, "in_backward": a.in_backward,
        "chunked_loss": not a.plain_loss,
        "timed_steps": len(times.times) - 1 - a.warmup,
        "step_s": round(seconds / (len(times.times) - 1 - a.warmup), 4),
        "real_tok_s": round(tokens / seconds),
        "fill": round(tokens / ((len(times.times) - 1 - a.warmup) * a.budget * a.batch_size), 3),
        "mfu": round(flops / seconds / PEAK_FLOPS, 3),
        "fit_s": round(fit_s, 1),
        "losses": module.losses,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        facts.update(static_gib=round(times.static_gib, 2), setup_peak_gib=round(times.setup_peak_gib, 2),
                     peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                     peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
    (out / f"bench_chat_{a.compile}{'_inbwd' if a.in_backward else ''}{'_plainloss' if a.plain_loss else ''}.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps({k: v for k, v in facts.items() if k != "losses"}), flush=True)


if __name__ == "__main__":
    main()
