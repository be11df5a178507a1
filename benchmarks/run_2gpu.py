"""Issue 9's two-GPU measurement in one run: DDP speed-up on the 7B shape, FSDP memory and resume on the 65B shape.

    python benchmarks/run_2gpu.py --out benchmarks/results/$(date +%F)-h200-2gpu.json

Every configuration is one ``benchmarks/bench_lightning.py`` process (Lightning's Trainer with our strategies;
Lightning launches the second rank), run one after another on the same 2-GPU machine:

- ``7b-1gpu``: ``strategy="qlora"`` on GPU 0 alone, the baseline (7B shape, seq 2048, r 16, all linear layers,
  activation checkpointing, batch 1, fused AdamW);
- ``7b-ddp-2gpu``: the same with ``strategy="qlora_ddp", devices=2`` (batch 1 per GPU);
- ``7b-1gpu-compiled``, ``7b-ddp-2gpu-compiled``: both with ``QLoRAPlugin(compile="reduce-overhead")``;
- ``7b-ddp-2gpu-profiled``: one DDP step profiled on each rank (``profile_rank<R>.txt``), after 13 timed ones;
- ``65b-fsdp-2gpu``: ``strategy="qlora_fsdp", devices=2``, 65B shape, seq 512, r 64, checkpointing, AdamW8bit,
  2 epochs, an adapter-only checkpoint after epoch 0 and the PEFT adapter at the end;
- ``65b-fsdp-2gpu-resumed``: the same, resumed from that checkpoint;
- ``65b-fsdp-2gpu-adamw``: one epoch with torch's fused AdamW (fp32 moments), for the memory comparison.

Writes the JSON (each process's facts per rank, and the verdicts) and a markdown table next to it (.md). The
results file is rewritten after each process, so a run cut short keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "bench_lightning.py")
B7 = ["--shape", "7b", "--seq", "2048", "--rank", "16", "--ckpt", "1", "--steps", "13", "--warmup", "3"]
B65 = ["--shape", "65b", "--seq", "512", "--rank", "64", "--ckpt", "1", "--steps", "4", "--warmup", "1", "--lr", "1e-3"]

# (id, GPUs visible, arguments); "{work}" is the scratch folder.
RUNS: list[tuple[str, str, list[str]]] = [
    ("7b-1gpu", "0", ["--strategy", "qlora", "--devices", "1", *B7]),
    ("7b-ddp-2gpu", "0,1", ["--strategy", "qlora_ddp", "--devices", "2", *B7]),
    # The compiled + CUDA-graph path (P1's settings but AdamW stepped normally: DDP reduces after backward), GPU-bound.
    ("7b-1gpu-compiled", "0", ["--strategy", "qlora", "--devices", "1", *B7, "--compile", "reduce-overhead"]),
    ("7b-ddp-2gpu-compiled", "0,1", ["--strategy", "qlora_ddp", "--devices", "2", *B7, "--compile", "reduce-overhead"]),
    # Where a DDP step's time goes on each rank (one profiled step after the timed ones; not part of the verdicts).
    ("7b-ddp-2gpu-profiled", "0,1", ["--strategy", "qlora_ddp", "--devices", "2", *B7, "--profile-step", "13",
                                     "--steps", "14"]),
    ("65b-fsdp-2gpu", "0,1", ["--strategy", "qlora_fsdp", "--devices", "2", *B65, "--optimizer", "adamw8bit",
                              "--epochs", "2", "--save-epoch", "0"]),
    ("65b-fsdp-2gpu-resumed", "0,1", ["--strategy", "qlora_fsdp", "--devices", "2", *B65, "--optimizer", "adamw8bit",
                                      "--epochs", "2", "--resume", "{work}/65b-fsdp-2gpu/epoch0.ckpt"]),
    ("65b-fsdp-2gpu-adamw", "0,1", ["--strategy", "qlora_fsdp", "--devices", "2", *B65, "--optimizer", "adamw"]),
]
# NVLink multicast stays off on shared hosts (device README); children inherit these.
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def smoke_args(args: list[str]) -> list[str]:
    """The same runs on the CPU with the tiny shape (gloo): checks this script, measures nothing."""
    small = {"7b": "tiny", "65b": "tiny", "2048": "64", "512": "64", "16": "4", "64": "4"}
    return [small.get(a, a) for a in args] + ["--accelerator", "cpu"]


def run_one(run_id: str, gpus: str, args: list[str], work: Path, timeout: int, smoke: bool = False) -> dict:
    out = work / run_id
    shutil.rmtree(out, ignore_errors=True)
    args = smoke_args(args) if smoke else args
    argv = [sys.executable, WORKER, *[a.replace("{work}", str(work)) for a in args], "--out", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, **NCCL_SAFETY)
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {run_id}: CUDA_VISIBLE_DEVICES={gpus} {' '.join(argv[1:])}", flush=True)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall_s": round(time.time() - started, 1)}
    result: dict = {"command": f"CUDA_VISIBLE_DEVICES={gpus} python " + " ".join(argv[1:]),
                    "wall_s": round(time.time() - started, 1), "returncode": proc.returncode}
    ranks = sorted(out.glob("facts_rank*.json"))
    result["ranks"] = [json.loads(p.read_text()) for p in ranks]
    if proc.returncode != 0 or not ranks:
        result["error"] = (proc.stderr or proc.stdout)[-3000:]
    return result


def adapter_facts(adapter: Path) -> dict:
    """What the saved PEFT adapter holds: files, tensor count, a whole (not sharded) weight's shape."""
    from safetensors import safe_open

    files = sorted(p.name for p in adapter.iterdir()) if adapter.is_dir() else []
    facts: dict = {"files": files}
    weights = adapter / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
            facts["tensors"] = len(keys)
            q_a = next((k for k in keys if "layers.0.self_attn.q_proj.lora_A" in k), None)
            facts["layer0_q_proj_lora_A_shape"] = list(f.get_slice(q_a).get_shape()) if q_a else None
        facts["size_gib"] = round(weights.stat().st_size / 2**30, 2)
    config = adapter / "adapter_config.json"
    if config.is_file():
        peft = json.loads(config.read_text())
        facts["peft_config"] = {k: peft.get(k) for k in ("peft_type", "r", "lora_alpha", "target_modules")}
    return facts


def max_adapter_diff(a: Path, b: Path) -> float | None:
    from safetensors import safe_open

    a, b = a / "adapter_model.safetensors", b / "adapter_model.safetensors"
    if not (a.is_file() and b.is_file()):
        return None
    worst = 0.0
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return float("inf")
        for key in fa.keys():
            worst = max(worst, (fa.get_tensor(key) - fb.get_tensor(key)).abs().max().item())
    return worst


def verdicts(runs: dict, work: Path) -> dict:
    def rank(run_id: str, r: int = 0) -> dict:
        ranks = runs.get(run_id, {}).get("ranks") or []
        return ranks[r] if len(ranks) > r else {}

    out: dict = {}
    for suffix in ("", "-compiled"):  # eager defaults, and compiled with CUDA graphs: the same settings on 1 and 2 GPUs
        one, ddp = rank("7b-1gpu" + suffix), rank("7b-ddp-2gpu" + suffix)
        if not (one.get("tok_s") and ddp.get("tok_s")):
            continue
        speedup = round(ddp["tok_s"] / one["tok_s"], 3)
        diffs = [r.get("max_diff_vs_rank0") for r in runs["7b-ddp-2gpu" + suffix]["ranks"]]
        checksums = {r.get("adapter_checksum") for r in runs["7b-ddp-2gpu" + suffix]["ranks"]}
        out["ddp_7b" + suffix.replace("-", "_")] = {
            "target": "tokens/s >= 1.8x one GPU's; adapters identical across ranks",
            "one_gpu_tok_s": one["tok_s"], "two_gpu_tok_s": ddp["tok_s"], "speedup": speedup,
            "max_diff_vs_rank0": diffs, "same_checksum": len(checksums) == 1,
            "met": speedup >= 1.8 and len(diffs) == 2 and all(d == 0.0 for d in diffs)}
    fsdp = runs.get("65b-fsdp-2gpu", {}).get("ranks") or []
    if fsdp:
        keys = ("setup_alloc_gib", "steps_alloc_gib", "run_alloc_gib")
        # Every phase of both runs, the resume's set-up (loading the checkpoint) included: a user resumes too.
        both = fsdp + (runs.get("65b-fsdp-2gpu-resumed", {}).get("ranks") or [])
        peaks = [max(r.get(k) or 0 for k in keys) for r in both]
        resumed = rank("65b-fsdp-2gpu-resumed")
        losses = rank("65b-fsdp-2gpu").get("losses") or []
        steps_per_epoch = len(losses) // 2
        adapter = adapter_facts(work / "65b-fsdp-2gpu" / "adapter" / "last")
        diff = max_adapter_diff(work / "65b-fsdp-2gpu" / "adapter" / "last",
                                work / "65b-fsdp-2gpu-resumed" / "adapter" / "last")
        trains = len(losses) >= 2 and losses[-1] < losses[0]
        out["fsdp_65b"] = {
            "target": "peak allocated <= 24 GiB per GPU without CPU offload; trains, saves a PEFT adapter, resumes",
            "peak_alloc_gib_per_rank_and_run": peaks,
            "peaks_by_phase_rank0": {k: fsdp[0].get(k) for k in (*keys, "static_alloc_gib", "run_reserved_gib")},
            "resumed_peaks_by_phase_rank0": {k: resumed.get(k) for k in keys},
            "losses": losses, "resumed_losses": resumed.get("losses"),
            "epoch1_losses_uninterrupted": losses[steps_per_epoch:],
            "resumed_vs_uninterrupted_max_adapter_diff": diff, "adapter": adapter,
            "met": bool(peaks) and max(peaks) <= 24 and trains and adapter.get("tensors", 0) > 0
            and diff is not None and resumed.get("global_step") == rank("65b-fsdp-2gpu").get("global_step"),
        }
    adamw = runs.get("65b-fsdp-2gpu-adamw", {}).get("ranks") or []
    if adamw:
        out["fsdp_65b_fused_adamw_for_comparison"] = {
            "peak_alloc_gib_per_rank": [max(r.get(k) or 0 for k in ("setup_alloc_gib", "steps_alloc_gib",
                                                                     "run_alloc_gib")) for r in adamw]}
    return out


def markdown(results: dict) -> str:
    rows = ["| run | strategy | GPUs | shape | seq | rank | optimizer | step s | tokens/s (all GPUs) | peak alloc GiB "
            "(setup / steps / whole run, per rank) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run_id, r in results["runs"].items():
        ranks = r.get("ranks") or []
        if not ranks:
            rows.append(f"| {run_id} | failed: {str(r.get('error', ''))[-100:]!r} | | | | | | | | |")
            continue
        f = ranks[0]
        peaks = "; ".join(f"{x.get('setup_alloc_gib')} / {x.get('steps_alloc_gib')} / {x.get('run_alloc_gib')}"
                          for x in ranks)
        rows.append(f"| {run_id} | {f['strategy']} | {f['world_size']} | {f['shape']} | {f['seq']} | {f['rank']} | "
                    f"{f['optimizer']} | {f.get('step_s')} | {f.get('tok_s')} | {peaks} |")
    rows += ["", "| target | measured | met |", "|---|---|---|"]
    for name, v in results["verdicts"].items():
        if "target" not in v:
            continue
        measured = ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("target", "met", "adapter", "losses",
                                                                                 "resumed_losses"))
        rows.append(f"| {name}: {v['target']} | {measured} | {'yes' if v['met'] else 'no'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / f"{datetime.date.today()}-h200-2gpu.json"))
    ap.add_argument("--work", default="/tmp/lightning_qlora_2gpu", help="scratch folder (checkpoints, adapters)")
    ap.add_argument("--runs", default=None, help="comma-separated run ids (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process")
    ap.add_argument("--smoke", action="store_true", help="tiny shape on 2 CPU processes: tests this script only")
    a = ap.parse_args()
    out, work = Path(a.out), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"date": str(datetime.date.today()), "host": platform.node(), "command": " ".join(sys.argv),
                     "runs": {}, "verdicts": {}}
    try:
        import torch

        results["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        results["torch"] = torch.__version__
    except ImportError:
        pass
    for run_id, gpus, args in RUNS:
        if a.runs and run_id not in a.runs.split(","):
            continue
        results["runs"][run_id] = run_one(run_id, gpus, args, work, a.timeout, a.smoke)
        print(json.dumps({k: v for k, v in results["runs"][run_id].items() if k != "error"})[:1500], flush=True)
        if "error" in results["runs"][run_id]:
            print(results["runs"][run_id]["error"], flush=True)
        results["verdicts"] = verdicts(results["runs"], work)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(json.dumps(results["verdicts"], indent=1))


if __name__ == "__main__":
    main()
