"""QLoRA data-parallel through Lightning's DDP on CPU (gloo), or the single-process reference on the same global batch.

    python tests/ddp_worker.py --out DIR --devices 2 --batch 4     # 2 ranks x 4 rows
    python tests/ddp_worker.py --out DIR --devices 1 --batch 8     # 1 process x 8 rows: the same global batches

Each rank saves its adapter weights to DIR/adapters_rank<R>.pt; AdapterCheckpoint writes DIR/adapter (rank zero).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, DistributedSampler

from lightning_qlora import AdapterCheckpoint, LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.strategy import trainable_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from helpers import CausalLMModule, token_loader  # noqa: E402


class SeededInit(CausalLMModule):
    def setup(self, stage: str) -> None:
        # The same adapter initialization in every run: DDP re-seeds each rank at launch, a single process does not.
        torch.manual_seed(11)

    def configure_optimizers(self):
        # Plain SGD: the update is linear in the gradient, so DDP's averaged gradient and the single-process gradient
        # of the same global batch give the same step up to float rounding (Adam would amplify rounding noise in
        # near-zero gradients).
        return torch.optim.SGD((p for p in self.parameters() if p.requires_grad), lr=0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(3, verbose=False)
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    module = SeededInit(config, lr=3e-3)
    trainer = Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="qlora_ddp" if args.devices > 1 else "qlora",
        # fp32 compute: the comparison with one process is then about DDP's averaging, not bf16 rounding of
        # matmuls whose batch size differs (4 vs 8 rows).
        plugins=[QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, alpha=8, dropout=0.0))],
        callbacks=[AdapterCheckpoint(out / "adapter", every_n_train_steps=0)],
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Rank r takes rows r, r + N, ...: a global batch is then exactly the single-process batch of N x batch rows.
        use_distributed_sampler=False,
    )
    loader = token_loader(n=64, batch_size=args.batch)
    if args.devices > 1:
        sampler = DistributedSampler(loader.dataset, num_replicas=args.devices, rank=trainer.global_rank, shuffle=False)
        loader = DataLoader(loader.dataset, batch_size=args.batch, sampler=sampler)
    trainer.fit(module, loader)
    torch.save(trainable_state_dict(module), out / f"adapters_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
