"""Issue 20's benchmark: a Qwen3-MoE model (random weights, built on the meta device), ours beside PEFT + bitsandbytes.

    python benchmarks/bench_moe.py --side ours --shape qwen3-30b-a3b     # Trainer(strategy="qlora") + QLoRAPlugin
    python benchmarks/bench_moe.py --side peft --shape qwen3-30b-a3b     # the anchor's recipe with Qwen3-MoE's config

``ours``: a LightningModule whose ``configure_model`` builds ``Qwen3MoeForCausalLM`` on the meta device, converted by
``Trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r, alpha 2r, dropout 0.05, attention projections,
target_experts=True))])``: NF4 + double quant on every linear and on the 3-D expert weights, per-expert adapters,
activation checkpointing, fused AdamW, the loss with the head in chunks. ``peft``: built as
``../shared/anchors/peft_qlora.py`` builds its Llama (each ``nn.Linear`` but the head quantized with bitsandbytes'
``Linear4bit`` as it is materialized on the GPU, ``prepare_model_for_kbit_training``, ``get_peft_model`` with
``target_modules="all-linear"``, autocast bf16, fused AdamW), with Qwen3-MoE's config class: PEFT's all-linear
leaves the fused experts in bf16 and without adapters. One row of ``--seq`` random tokens per step. Prints one JSON
line: step seconds (median of the timed steps), tokens/s, peak allocated GiB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chat import meta_model

SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                 vocab_size=512),
}
GIB = 2**30


def config(shape: str, seq: int):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(max_position_embeddings=max(4096, seq), **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    return cfg


def run_ours(a) -> dict:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from transformers import Qwen3MoeForCausalLM

    from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
    from lightning_qlora.kernels.chunked_loss import causal_lm_loss

    cfg = config(a.shape, a.seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    class Module(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: nn.Module | None = None

        def configure_model(self) -> None:
            if self.model is not None:
                return
            model = meta_model(cfg, Qwen3MoeForCausalLM)
            if a.ckpt:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model = model

        def training_step(self, batch, batch_idx):
            return causal_lm_loss(self.model, batch, input_ids=batch)

        def configure_optimizers(self):
            params = [p for p in self.parameters() if p.requires_grad]
            if a.optim.startswith("adamw8bit"):  # 8-bit moments: 2 bytes per adapter value instead of 8
                from lightning_qlora import AdamW8bit, OptimizerInBackward

                if a.optim.endswith("inbwd"):  # each gradient stepped and freed as backward produces it
                    return OptimizerInBackward(params, AdamW8bit, lr=1e-4)
                return AdamW8bit(params, lr=1e-4)
            return torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())

    class Times(Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, cfg.vocab_size, (a.seq,), generator=generator) for _ in range(a.steps + a.warmup + 1)]
    loader = torch.utils.data.DataLoader(rows, batch_size=1)
    times = Times()
    compute = "bf16" if device == "cuda" else "fp32"
    lora = LoRAConfig(r=a.rank, alpha=2 * a.rank, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      target_experts=True)
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype=compute), lora=lora, compile=False)
    trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, strategy="qlora",
                      max_steps=a.steps + a.warmup + 1, plugins=[plugin], callbacks=[times], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    started = time.perf_counter()
    trainer.fit(Module(), loader)
    steps = [b - s for s, b in zip(times.marks[a.warmup:], times.marks[a.warmup + 1:], strict=False)]
    step_s = statistics.median(steps)
    summary = plugin.summary
    return dict(side="ours", fit_s=round(time.perf_counter() - started, 1), step_s=round(step_s, 4),
                tok_s=round(a.seq / step_s), trainable=summary.trainable_params if summary else None,
                not_quantized_params=summary.full_precision.not_quantized_params if summary else None,
                experts_bytes_after_gib=round(summary.experts.bytes_after / GIB, 2) if summary else None)


def run_peft(a) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Qwen3MoeForCausalLM

    cfg = config(a.shape, a.seq)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model = model.to(torch.bfloat16)

    def materialise(mod: nn.Module) -> None:  # the anchor's build, plus modules holding their own 3-D weights
        for name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                w = torch.empty(child.out_features, child.in_features, device="cuda", dtype=torch.bfloat16).normal_(
                    0, 0.02)
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4").cuda()
                del w
                setattr(mod, name, q)
                continue
            own = list(child.parameters(recurse=False)) + list(child.buffers(recurse=False))
            if own:
                child.to_empty(device="cuda", recurse=False)
                for p in child.parameters(recurse=False):
                    if "norm" in type(child).__name__.lower():
                        nn.init.ones_(p)
                    else:
                        nn.init.normal_(p, 0, 0.02)
            materialise(child)

    materialise(model)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device="cuda")
    if a.peft_prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    model.train()
    generator = torch.Generator().manual_seed(1)
    steps = []
    for i in range(a.steps + a.warmup):
        ids = torch.randint(0, cfg.vocab_size, (1, a.seq), generator=generator).cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            steps.append(time.perf_counter() - start)
    step_s = statistics.median(steps)
    return dict(side="peft", step_s=round(step_s, 4), tok_s=round(a.seq / step_s),
                trainable=sum(p.numel() for p in params))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["ours", "peft"], required=True)
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ckpt", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--optim", choices=["adamw", "adamw8bit", "adamw8bit-inbwd"], default="adamw", help="ours: torch's fused AdamW or "
                    "lightning_qlora.AdamW8bit (-inbwd: stepped inside backward)")
    ap.add_argument("--no-peft-prepare", dest="peft_prepare", action="store_false", help="peft: skip "
                    "prepare_model_for_kbit_training (which casts every weight that is not 4-bit, the fused experts "
                    "too, to fp32): the experts stay in bf16, as a user short of memory would try next")
    a = ap.parse_args()
    torch.manual_seed(0)
    facts = run_ours(a) if a.side == "ours" else run_peft(a)
    facts.update(shape=a.shape, seq=a.seq, rank=a.rank, ckpt=a.ckpt, optim=a.optim if a.side == "ours" else "adamw")
    if a.side == "peft":
        facts.update(prepare_model_for_kbit_training=a.peft_prepare)
    if torch.cuda.is_available():
        facts.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                     peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
                     gpu=torch.cuda.get_device_name())
    print(json.dumps(facts), flush=True)


if __name__ == "__main__":
    main()
