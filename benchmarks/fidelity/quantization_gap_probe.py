"""How much of NF4's perplexity cost on SmolLM2 a low-rank correction or a smaller blocksize can win back.

    python benchmarks/fidelity/quantization_gap_probe.py 0:64:1 16:64:1 16:64:3 64:64:1 0:32:1   # rank:blocksize:iters

For every linear (except lm_head) the weight W is replaced by dequant(NF4-DQ(W - L)) + L, where L is the best
rank-r approximation of the quantization residual (LoftQ's initialization, alternated ``iters`` times; r = 0: plain
NF4-DQ), and held-out Jargon perplexity is measured in bf16 as in ``lightning-qlora-report``. This is the starting
point a LoftQ-initialized adapter of rank r would give before any training.
"""

import sys
import time

import bitsandbytes as bnb
import torch

from lightning_qlora.app.data import InstructionDataModule
from lightning_qlora.app.models.pretrained import load_causal_lm, resolve_pretrained
from lightning_qlora.modules import iter_linears
from lightning_qlora.tools.report import _perplexity


def corrected_perplexity(path: str, batches: list, rank: int, blocksize: int, iters: int) -> float:
    model = load_causal_lm(path).eval()
    with torch.no_grad():
        for name, module in iter_linears(model):
            if name.endswith("lm_head"):
                continue
            weight = module.weight.data.float()
            low_rank = torch.zeros_like(weight)
            for _ in range(iters):
                packed, state = bnb.functional.quantize_4bit(
                    (weight - low_rank).contiguous(), blocksize=blocksize, compress_statistics=True, quant_type="nf4"
                )
                dequantized = bnb.functional.dequantize_4bit(packed, state).float()
                if rank:
                    u, s, vh = torch.linalg.svd(weight - dequantized, full_matrices=False)
                    low_rank = (u[:, :rank] * s[:rank]) @ vh[:rank]
            module.weight.data = dequantized + low_rank
    model.to(torch.bfloat16)
    return _perplexity(model, batches)


def main() -> None:
    path = resolve_pretrained("smollm2-135m-instruct")
    data = InstructionDataModule(path, max_length=128, batch_size=8, val_size=64, packing=False)
    data.setup("validate")
    batches = list(data.val_dataloader())
    for spec in sys.argv[1:] or ["0:64:1"]:
        rank, blocksize, iters = map(int, spec.split(":"))
        started = time.perf_counter()
        ppl = corrected_perplexity(path, batches, rank, blocksize, iters)
        print(f"rank {rank} blocksize {blocksize} iters {iters}: held-out perplexity {ppl:.2f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
