"""The longest sequence one training step survives under a memory cap: issue 21's benchmark (ours; the anchor is
``peft_qlora.py --shape llama3-8b --rank 32 --ckpt 1 --steps 1 --mem-cap-gib 80``, searched by the same
``max_context.py``).

    python .anchors/max_context.py --lo 8192 --hi 524288 --step 8192 -- \\
        python benchmarks/bench_long_context.py --shape llama3-8b --rank 32 --mem-cap-gib 80
    python benchmarks/bench_long_context.py --shape llama3-8b --rank 32 --mem-cap-gib 80 --seq 32768 --steps 3

One row of ``--seq`` random tokens (batch 1), every token trained on. The model is built on the meta device and
converted by ``Trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=32, alpha=64), memory_budget_gib=CAP,
max_batch_tokens=SEQ)])``: NF4 + double quant, bf16 compute, LoRA on every linear layer but the head (as the anchor),
and the memory plan chooses checkpointing, MLP tiles and offloading for the budget (the module asks for none itself).
The loss is the app's (head and cross-entropy in chunks). ``torch.cuda.set_per_process_memory_fraction`` caps the
process at ``--mem-cap-gib`` as the anchor does. Prints one JSON line after the steps: the plan, peak allocated GiB,
step seconds, tokens/s (the first step included when ``--steps 1``).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chat import SHAPES as CHAT_SHAPES  # noqa: E402  (llama3-8b, tiny)
from bench_chat import meta_model  # noqa: E402

from lightning_qlora import LoRAConfig, QLoRAPlugin  # noqa: E402
from lightning_qlora.kernels.chunked_loss import causal_lm_loss  # noqa: E402

SHAPES = {
    **CHAT_SHAPES,
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256),
}
GIB = 2**30


class LongRow(LightningModule):
    chunked_loss = True  # (what the memory plan counts on: the loss below never builds the whole row's logits)

    def __init__(self, shape: str, seq: int, everything: bool = False) -> None:
        super().__init__()
        self.shape, self.seq, self.everything = shape, seq, everything
        self.model: nn.Module | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import LlamaConfig

        model = meta_model(
            LlamaConfig(max_position_embeddings=max(8192, self.seq), rope_theta=500000.0, **SHAPES[self.shape])
        )
        if self.everything:  # every measure at once, whatever the plan would choose (the mechanisms' own limit)
            from lightning_qlora.kernels.offload import HostOffload, offload_block_inputs
            from lightning_qlora.kernels.tiled_mlp import tile_block_mlps
            from lightning_qlora.memory_plan import enable_checkpointing

            enable_checkpointing(model)
            layers = list(model.model.layers)
            tile_block_mlps(layers, 8192)
            offload_block_inputs(layers, HostOffload(self.trainer.strategy.root_device))
        self.model = model

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        loss = causal_lm_loss(self.model, ids, input_ids=ids)
        self.losses.append(round(float(loss.detach()), 4))
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-4, fused=torch.cuda.is_available())


class StepTimes(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--mem-cap-gib", type=float, default=80.0)
    ap.add_argument("--budget-gib", type=float, default=None, help="memory_budget_gib (default: the cap)")
    ap.add_argument("--everything", action="store_true",
                    help="no plan: checkpointing, MLP tiles of 8,192 tokens and every block offloaded")
    ap.add_argument("--accelerator", default="gpu")
    a = ap.parse_args()
    seed_everything(0)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.mem_cap_gib * GIB / total))
    ids = torch.randint(0, SHAPES[a.shape]["vocab_size"], (a.steps, a.seq), generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=1)
    plugin = QLoRAPlugin(lora=LoRAConfig(r=a.rank, alpha=2 * a.rank, dropout=0.0),
                         memory_budget_gib=None if a.everything else a.budget_gib or a.mem_cap_gib,
                         max_batch_tokens=a.seq)
    times = StepTimes()
    trainer = Trainer(accelerator=a.accelerator, devices=1, strategy="qlora", plugins=[plugin], max_steps=a.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[times])
    module = LongRow(a.shape, a.seq, a.everything)
    began = time.perf_counter()
    trainer.fit(module, loader)
    steps = [t - s for s, t in zip([times.start, *times.times[:-1]], times.times, strict=True)]
    timed = steps[1:] or steps
    plan = plugin.memory_plan
    print(json.dumps({
        "system": "lightning_qlora", "shape": a.shape, "seq": a.seq, "rank": a.rank, "cap_gib": a.mem_cap_gib,
        "plan": plan.describe_choices() if plan else "everything" if a.everything else None,
        "plan_estimate_gib": round(plan.estimated_bytes / GIB, 2) if plan else None,
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if torch.cuda.is_available() else None,
        "step_s": round(sum(timed) / len(timed), 2), "tok_s": round(a.seq * len(timed) / sum(timed), 1),
        "first_step_s": round(steps[0], 2), "wall_s": round(time.perf_counter() - began, 1), "losses": module.losses,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }))


if __name__ == "__main__":
    main()
