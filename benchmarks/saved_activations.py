"""What one training forward saves for backward, per block configuration: the bytes autograd keeps.

    python benchmarks/saved_activations.py --shape 7b --layers 2 --seq 2048 [--device cuda]

Builds bench_qlora's model with only ``--layers`` decoder layers, then for each variant (eager or compiled, with or
without activation checkpointing, and the way compiled blocks checkpoint) runs one forward under
``torch.autograd.graph.saved_tensors_hooks``, and prints the saved bytes per layer, the largest saved tensors and the
peak allocated memory of the step. Answers "does the compiled backward keep the bf16 weights / the activations"
without a full benchmark run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_qlora  # noqa: E402

VARIANTS = {
    "eager": dict(compile=False, ckpt=False),
    "eager-ckpt": dict(compile=False, ckpt=True),
    "compiled": dict(compile=True, ckpt=False),
    "compiled-ckpt-must-recompute": dict(compile=True, ckpt=True, checkpointing="must-recompute"),
    "compiled-ckpt-full": dict(compile=True, ckpt=True, checkpointing="torch-default"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b", choices=sorted(bench_qlora.SHAPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    from lightning_qlora.kernels import compile_blocks

    bench_qlora.SHAPES[a.shape] = {**bench_qlora.SHAPES[a.shape], "num_hidden_layers": a.layers}
    cuda = a.device.startswith("cuda")
    for name in a.variants.split(","):
        variant = VARIANTS[name]
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = bench_qlora.build(a.shape, "nf4", a.rank, a.device)
        if variant["compile"]:
            compile_blocks(model, checkpointing=variant.get("checkpointing", "must-recompute"))
        if variant["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        ids = torch.randint(0, 32000, (1, a.seq), device=a.device)
        # Tensors that exist before the step (weights, packed weights, their constants) cost nothing when saved.
        existing = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
        for module in model.modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            for holder in (state, getattr(state, "state2", None)):
                for value in vars(holder).values() if holder is not None else ():
                    if isinstance(value, torch.Tensor):
                        existing.add(value.untyped_storage().data_ptr())
        for _ in range(2):  # compile, then measure
            saved, seen = [], set()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()

            def pack(tensor):
                storage = tensor.untyped_storage().data_ptr()
                if storage in existing or storage in seen:
                    return tensor
                seen.add(storage)
                saved.append((tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""),
                               tensor.numel() * tensor.element_size()))
                return tensor

            started = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
        total = sum(s[2] for s in saved)
        largest = sorted(saved, key=lambda s: -s[2])[:6]
        print(json.dumps(dict(
            variant=name, saved_tensors=len(saved), saved_gib=round(total / 2**30, 3),
            saved_gib_per_layer=round(total / 2**30 / a.layers, 3), largest=largest,
            step_peak_gib_above_start=round((torch.cuda.max_memory_allocated() - base) / 2**30, 3) if cuda else None,
            step_s=round(seconds, 4))), flush=True)
        del model, loss


if __name__ == "__main__":
    main()
