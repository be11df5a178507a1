"""Profile one training step of bench_qlora's model: where does the time go (GPU kernels vs Python/launch)?

    python benchmarks/profile_step.py --shape 7b --seq 2048 --rank 16 --ckpt 1 --out prof/

Prints the top kernels by GPU time and the GPU-busy fraction of the step (sum of kernel time / wall time); writes
both tables (by GPU and by CPU time) to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_qlora import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ckpt", type=int, default=1)
    ap.add_argument("--compile", type=int, default=0, help="torch.compile each decoder layer (compile_blocks)")
    ap.add_argument("--compile-mode", default=None)
    ap.add_argument("--out", default="prof")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = build(a.shape, a.quant, a.rank, "cuda")
    if a.compile:
        from lightning_qlora.kernels import compile_blocks

        compile_blocks(model, **({"mode": a.compile_mode} if a.compile_mode else {}))
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    model.train()

    def step():
        ids = torch.randint(0, 32000, (1, a.seq), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    print(f"step wall {(time.perf_counter() - started) / 5:.4f} s (not profiled, mean of 5)")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    # Only kernel rows: operator rows (aten::mm, ...) repeat the time of the kernels they launch.
    kernel_rows = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_total = sum(e.self_device_time_total for e in kernel_rows) / 1e6
    kernels = sum(e.count for e in kernel_rows)
    print(f"step wall {wall:.3f} s (profiled), GPU kernel time {gpu_total:.3f} s ({100 * gpu_total / wall:.0f}% busy), "
          f"~{kernels} kernel launches")
    table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60)
    print(table)
    (out / "top_kernels.txt").write_text(table)
    cpu_table = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    (out / "top_cpu.txt").write_text(cpu_table)


if __name__ == "__main__":
    main()
