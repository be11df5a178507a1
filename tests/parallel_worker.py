"""QLoRA on several processes (FSDP2 "qlora_fsdp" or DDP "qlora_ddp", CPU/gloo or GPU), or a one-process reference.

    python tests/parallel_worker.py --out DIR --devices 2 --batch 4                   # 2 ranks x 4 rows, FSDP
    python tests/parallel_worker.py --out DIR --devices 1 --batch 8 --strategy qlora  # 1 process x 8 rows: same batches
    python tests/parallel_worker.py --out DIR2 --devices 2 --batch 4 --resume DIR/checkpoints/epoch=0-step=4.ckpt

Each rank saves its (gathered) adapter weights to DIR/adapters_rank<R>.pt and facts to DIR/facts_rank<R>.json;
AdapterCheckpoint writes DIR/adapter (rank zero) and ModelCheckpoint writes DIR/checkpoints/*.ckpt each epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

from lightning_qlora import AdapterCheckpoint, LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.lora import trainable_state_dict
from lightning_qlora.modules import iter_linears
from lightning_qlora.optim.adamw8bit import AdamW8bit
from lightning_qlora.quant import is_quantized_linear
from lightning_qlora.sharding import is_sharded

sys.path.insert(0, str(Path(__file__).parent))
from helpers import CausalLMModule, token_loader  # noqa: E402


class SeededInit(CausalLMModule):
    def __init__(self, config, lr: float, optimizer: str) -> None:
        super().__init__(config, lr=lr)
        self.optimizer = optimizer

    def setup(self, stage: str) -> None:
        # The same adapter initialization in every run: Lightning re-seeds each rank at launch, a single process not.
        torch.manual_seed(11)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            # The update is linear in the gradient: FSDP's averaged gradient and one process's gradient of the same
            # global batch give the same step up to float rounding.
            return torch.optim.SGD(params, lr=0.5)
        if self.optimizer == "adamw8bit":  # every tensor 8-bit, even the tiny test model's (shards of 128 values)
            return AdamW8bit(params, lr=self.lr, min_8bit_size=1)
        return torch.optim.AdamW(params, lr=self.lr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--strategy", default="qlora_fsdp")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--quant-storage", default="auto")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--compute-dtype", default="fp32")
    parser.add_argument("--dora", type=int, default=0)
    parser.add_argument("--from-disk", default=None, help="a checkpoint directory streamed by stream_pretrained")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(3, verbose=False)
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    module = SeededInit(config, lr=3e-3, optimizer=args.optimizer)
    if args.from_disk:  # the model as a user streams it: parameters on the meta device, weights read at set-up
        from lightning_qlora import stream_pretrained

        module.model = stream_pretrained(args.from_disk)
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        # fp32 compute: the comparison with one process is then about the sharded averaging, not bf16 rounding of
        # matmuls whose batch size differs (4 vs 8 rows).
        plugins=[QLoRAPlugin(quant=QuantConfig(compute_dtype=args.compute_dtype, quant_storage=args.quant_storage),
                             lora=LoRAConfig(r=4, alpha=8, dropout=0.0, use_dora=bool(args.dora)))],
        callbacks=[
            AdapterCheckpoint(out / "adapter", every_n_train_steps=0),
            ModelCheckpoint(out / "checkpoints", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True),
        ],
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        # Rank r takes rows r, r + N, ...: a global batch is then exactly the single-process batch of N x batch rows.
        use_distributed_sampler=False,
    )
    loader = token_loader(n=32, batch_size=args.batch)
    if args.devices > 1:
        sampler = DistributedSampler(loader.dataset, num_replicas=args.devices, rank=trainer.global_rank, shuffle=False)
        loader = DataLoader(loader.dataset, batch_size=args.batch, sampler=sampler)
    trainer.fit(module, loader, ckpt_path=args.resume)
    rank = trainer.global_rank
    facts = {
        "global_step": trainer.global_step,
        "sharded_adapters": all(is_sharded(p) for p in module.parameters() if p.requires_grad),
        "sharded_base": any(is_sharded(m.weight) for _, m in iter_linears(module.model) if is_quantized_linear(m)),
        "packed_dtypes": sorted({str(m.weight.dtype) for _, m in iter_linears(module.model) if is_quantized_linear(m)}),
        "sharded_units": getattr(trainer.strategy, "sharded_units", []),
        "losses": module.losses,
        "meta_left": [n for n, p in module.named_parameters() if p.is_meta],
    }
    state = trainable_state_dict(module)  # gathered: a collective under FSDP
    torch.save(state, out / f"adapters_rank{rank}.pt")
    (out / f"facts_rank{rank}.json").write_text(json.dumps(facts))


def run_in_this_process(out: Path, *args: object) -> None:
    """The one-process reference run inside the calling (test) process: the same run as the script's, without
    another interpreter's start and imports (seconds per run on a small CPU); the thread count is restored after.
    """
    threads = torch.get_num_threads()
    try:
        main(["--out", str(out), *map(str, args)])
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
