"""The H200 benchmark of issue 7 in one run: lightning_qlora and the anchors, side by side, one process each.

    python benchmarks/run_h200.py --anchors ../shared/anchors --out benchmarks/results/$(date +%F)-h200.json

Runs every configuration below as its own process (ours: benchmarks/bench_qlora.py; the anchors unchanged), in
pairs so that each ratio compares runs minutes apart on the same machine. After each process the results file is
rewritten, so a run cut short keeps what finished. At the end it prints (and writes next to the JSON, as .md) the
table for benchmarks/README.md with every ratio and the targets P1-P4 (each judged on the configurations of ours in
``CANDIDATES``: met when one of them meets every part of the target; P4 on pairs with the same settings, either the
defaults or the compiled + CUDA-graph ones, with and without checkpointing; the ``-plain`` and
``-fp32dequant`` rows measure one change each). ``--only 7b`` or ``--only 65b`` runs a part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OURS = str(HERE / "bench_qlora.py")

# The anchors' configurations: the same shape, sequence length and rank on both sides of every ratio.
B7 = ["--shape", "7b", "--seq", "2048", "--rank", "16"]
B65 = ["--shape", "65b", "--seq", "512", "--rank", "64", "--ckpt", "1"]
PEFT = "{anchors}/peft_qlora.py"
PAGED = ["--optim", "paged_adamw_8bit"]

# (id, group, system, arguments); "{anchors}" is the anchors folder.
RUNS: list[tuple[str, str, str, list[str]]] = [
    ("7b-ckpt-ours", "7b", "lightning_qlora nf4-dq", [OURS, *B7, "--ckpt", "1"]),
    ("7b-ckpt-peft", "7b", "PEFT + bnb", [PEFT, *B7, "--ckpt", "1"]),
    ("7b-ckpt-ours-bf16", "7b", "lightning_qlora bf16 LoRA", [OURS, *B7, "--ckpt", "1", "--quant", "none"]),
    ("7b-ckpt-ours-plain", "7b", "lightning_qlora nf4-dq, plain (unfused) path",
     [OURS, *B7, "--ckpt", "1", "--fused", "0"]),
    ("7b-ckpt-ours-compile", "7b", "lightning_qlora nf4-dq, torch.compile per block",
     [OURS, *B7, "--ckpt", "1", "--compile", "1"]),
    ("7b-ckpt-ours-bf16-compile", "7b", "lightning_qlora bf16 LoRA, torch.compile per block",
     [OURS, *B7, "--ckpt", "1", "--quant", "none", "--compile", "1"]),
    ("7b-ckpt-ours-compile-inbwd", "7b", "lightning_qlora nf4-dq, compiled, fused AdamW stepped in backward",
     [OURS, *B7, "--ckpt", "1", "--compile", "1", "--optim-in-backward", "1"]),
    ("7b-ckpt-ours-compile-cudagraphs", "7b", "lightning_qlora nf4-dq, compiled with CUDA graphs (reduce-overhead)",
     [OURS, *B7, "--ckpt", "1", "--compile", "1", "--compile-mode", "reduce-overhead"]),
    ("7b-ckpt-ours-compile-cudagraphs-inbwd", "7b",
     "lightning_qlora nf4-dq, compiled with CUDA graphs, fused AdamW stepped in backward",
     [OURS, *B7, "--ckpt", "1", "--compile", "1", "--compile-mode", "reduce-overhead", "--optim-in-backward", "1"]),
    ("7b-ckpt-ours-bf16-compile-cudagraphs-inbwd", "7b",
     "lightning_qlora bf16 LoRA, compiled with CUDA graphs, fused AdamW stepped in backward",
     [OURS, *B7, "--ckpt", "1", "--quant", "none", "--compile", "1", "--compile-mode", "reduce-overhead",
      "--optim-in-backward", "1"]),
    ("7b-ckpt-ours-fp32dequant", "7b", "lightning_qlora nf4-dq, dequantized to fp32 then cast (before the fix)",
     [OURS, *B7, "--ckpt", "1", "--dequantize-fp32", "1"]),
    ("7b-ckpt-ours-compile-fp32dequant", "7b", "lightning_qlora nf4-dq, compiled, dequantized to fp32 then cast",
     [OURS, *B7, "--ckpt", "1", "--compile", "1", "--dequantize-fp32", "1"]),
    ("7b-nockpt-ours", "7b", "lightning_qlora nf4-dq", [OURS, *B7, "--ckpt", "0"]),
    ("7b-nockpt-litgpt", "7b", "LitGPT nf4-dq", ["{anchors}/litgpt_qlora.py", "--quant", "nf4-dq", "--name",
                                                  "Llama-2-7b-hf", "--seq", "2048", "--rank", "16"]),
    ("7b-nockpt-ours-bf16", "7b", "lightning_qlora bf16 LoRA", [OURS, *B7, "--ckpt", "0", "--quant", "none"]),
    ("7b-nockpt-ours-plain", "7b", "lightning_qlora nf4-dq, plain (unfused) path",
     [OURS, *B7, "--ckpt", "0", "--fused", "0"]),
    ("7b-nockpt-ours-compile", "7b", "lightning_qlora nf4-dq, torch.compile per block",
     [OURS, *B7, "--ckpt", "0", "--compile", "1"]),
    ("7b-nockpt-ours-compile-saveweights", "7b",
     "lightning_qlora nf4-dq, compiled, backward keeps bf16 weights (before change 10)",
     [OURS, *B7, "--ckpt", "0", "--compile", "1", "--recompute-dequantize", "0"]),
    ("7b-nockpt-ours-compile-cudagraphs", "7b", "lightning_qlora nf4-dq, compiled with CUDA graphs (reduce-overhead)",
     [OURS, *B7, "--ckpt", "0", "--compile", "1", "--compile-mode", "reduce-overhead"]),
    ("7b-nockpt-ours-bf16-compile-cudagraphs", "7b", "lightning_qlora bf16 LoRA, compiled with CUDA graphs",
     [OURS, *B7, "--ckpt", "0", "--quant", "none", "--compile", "1", "--compile-mode", "reduce-overhead"]),
    ("7b-nockpt-ours-inbwd", "7b", "lightning_qlora nf4-dq, fused AdamW stepped in backward",
     [OURS, *B7, "--ckpt", "0", "--optim-in-backward", "1"]),
    ("65b-ours", "65b", "lightning_qlora nf4-dq", [OURS, *B65]),
    ("65b-peft", "65b", "PEFT + bnb", [PEFT, *B65]),
    ("65b-ours-paged", "65b", "lightning_qlora nf4-dq, paged 8-bit AdamW", [OURS, *B65, *PAGED]),
    ("65b-peft-paged", "65b", "PEFT + bnb, paged 8-bit AdamW", [PEFT, *B65, *PAGED]),
    ("65b-ours-inbwd", "65b", "lightning_qlora nf4-dq, fused AdamW stepped in backward",
     [OURS, *B65, "--optim-in-backward", "1"]),
    ("65b-ours-paged-inbwd", "65b", "lightning_qlora nf4-dq, paged 8-bit AdamW stepped in backward",
     [OURS, *B65, *PAGED, "--optim-in-backward", "1"]),
    ("65b-ours-compile", "65b", "lightning_qlora nf4-dq, torch.compile per block",
     [OURS, *B65, "--compile", "1"]),
    ("65b-ours-compile-inbwd", "65b", "lightning_qlora nf4-dq, compiled, fused AdamW stepped in backward",
     [OURS, *B65, "--compile", "1", "--optim-in-backward", "1"]),
    ("65b-ours-paged-inbwd-compile", "65b", "lightning_qlora nf4-dq, compiled, paged 8-bit AdamW stepped in backward",
     [OURS, *B65, *PAGED, "--optim-in-backward", "1", "--compile", "1"]),
    ("65b-ours-adamw8bit-inbwd-cudagraphs", "65b",
     "lightning_qlora nf4-dq, compiled with CUDA graphs, AdamW8bit (device memory) stepped in backward",
     [OURS, *B65, "--optim", "adamw8bit", "--optim-in-backward", "1", "--compile", "1", "--compile-mode",
      "reduce-overhead"]),
    ("65b-ours-paged-inbwd-cudagraphs", "65b",
     "lightning_qlora nf4-dq, compiled with CUDA graphs, paged 8-bit AdamW stepped in backward",
     [OURS, *B65, *PAGED, "--optim-in-backward", "1", "--compile", "1", "--compile-mode", "reduce-overhead"]),
]

# Llama-2-7B: 6.74e9 parameters; an H200 sustains ~790 TFLOP/s of bf16 matmul and ~4.3 TB/s (device README).
MATMUL_FLOPS = 790e12
MEMORY_BANDWIDTH = 4.3e12
PARAMS_7B = 6.74e9


def step_floor_s(tokens: int, checkpointing: bool) -> float:
    """FLOPs over the matrix rate plus dequantization traffic over the bandwidth, for 7B QLoRA."""
    flops = (8 if checkpointing else 6) * PARAMS_7B * tokens  # forward 2NT, backward 4NT, recompute 2NT
    passes = 3 if checkpointing else 2  # dequantize in forward, backward (and recompute)
    dequant_bytes = passes * PARAMS_7B * (0.5 + 2)  # read 4-bit, write bf16
    return flops / MATMUL_FLOPS + dequant_bytes / MEMORY_BANDWIDTH


def run_one(args: list[str], timeout: int) -> dict:
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "wall_s": round(time.time() - started, 1)}
    result: dict = {"wall_s": round(time.time() - started, 1), "returncode": proc.returncode}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            result.update(json.loads(line))
            break
    else:
        result["error"] = (proc.stderr or proc.stdout)[-2000:]
    return result


def median_run(results: list[dict]) -> dict:
    """The run with the median step time (the first failure if every run failed); every step time kept."""
    timed = sorted((r for r in results if r.get("step_s")), key=lambda r: r["step_s"])
    if not timed:
        return results[0]
    chosen = dict(timed[len(timed) // 2])  # of two, the slower
    if len(results) > 1:
        chosen["step_s_all"] = [r.get("step_s") for r in results]
    return chosen


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# The configurations of ours each target is judged on: the default first, then options a user turns on with one
# flag each (compile=True, OptimizerInBackward, paged 8-bit AdamW). A target is met when one configuration meets all
# of its parts (speed and memory) in this run.
CANDIDATES = {
    "P1": ["7b-ckpt-ours", "7b-ckpt-ours-compile", "7b-ckpt-ours-compile-inbwd", "7b-ckpt-ours-compile-cudagraphs",
           "7b-ckpt-ours-compile-cudagraphs-inbwd"],
    "P2": ["7b-nockpt-ours", "7b-nockpt-ours-compile", "7b-nockpt-ours-inbwd", "7b-nockpt-ours-compile-cudagraphs"],
    "P3": ["65b-ours", "65b-ours-inbwd", "65b-ours-paged", "65b-ours-paged-inbwd", "65b-ours-compile",
           "65b-ours-compile-inbwd", "65b-ours-paged-inbwd-compile", "65b-ours-paged-inbwd-cudagraphs",
           "65b-ours-adamw8bit-inbwd-cudagraphs"],
}
# P4 compares like with like: (QLoRA run, our bf16 LoRA run with the same settings). It is judged per settings,
# with and without checkpointing: the defaults (eager), or the compiled + CUDA-graph settings P1 and P2 are met with.
P4_JUDGED = {
    "default": [("7b-ckpt-ours", "7b-ckpt-ours-bf16"), ("7b-nockpt-ours", "7b-nockpt-ours-bf16")],
    "compiled_cudagraphs": [("7b-ckpt-ours-compile-cudagraphs-inbwd", "7b-ckpt-ours-bf16-compile-cudagraphs-inbwd"),
                            ("7b-nockpt-ours-compile-cudagraphs", "7b-nockpt-ours-bf16-compile-cudagraphs")],
}
P4_PAIRS = [*P4_JUDGED["default"], ("7b-ckpt-ours-compile", "7b-ckpt-ours-bf16-compile"),
            *P4_JUDGED["compiled_cudagraphs"]]


def verdicts(r: dict[str, dict]) -> dict[str, dict]:
    def get(run: str, key: str):
        return r.get(run, {}).get(key)

    def judged(target: str, anchor: str, speed: float, memory) -> dict:
        configs = {}
        for run in CANDIDATES[target]:
            if not get(run, "tok_s"):
                continue
            tok_s = ratio(get(run, "tok_s"), get(anchor, "tok_s"))
            peak = get(run, "peak_alloc_gib")
            configs[run] = {f"tok_s_vs_{anchor}": tok_s, "peak_gib": peak,
                            "met": _all(tok_s, lambda x: x >= speed) and _all(peak, memory)}
        return {"configs": configs, "met_by": [run for run, c in configs.items() if c["met"]],
                "met": any(c["met"] for c in configs.values())}

    peft_7b, litgpt_7b = get("7b-ckpt-peft", "peak_alloc_gib"), get("7b-nockpt-litgpt", "peak_alloc_gib")
    out = {
        "P1": {"target": "tok/s >= 2.5x PEFT (7b-ckpt-peft), peak <= 0.9x PEFT's "
                         f"({round(0.9 * peft_7b, 2) if peft_7b else '?'} GiB)",
               **judged("P1", "7b-ckpt-peft", 2.5, lambda x: peft_7b is not None and x <= 0.9 * peft_7b)},
        "P2": {"target": f"tok/s >= 1.3x LitGPT (7b-nockpt-litgpt), peak <= LitGPT's ({litgpt_7b} GiB)",
               **judged("P2", "7b-nockpt-litgpt", 1.3, lambda x: litgpt_7b is not None and x <= litgpt_7b)},
        "P3": {"target": "peak < 38 GiB, tok/s >= 1.5x PEFT with fused AdamW (65b-peft)",
               **judged("P3", "65b-peft", 1.5, lambda x: x < 38)},
    }
    p4 = {f"{ours}_vs_{bf16}": ratio(get(ours, "tok_s"), get(bf16, "tok_s")) for ours, bf16 in P4_PAIRS}
    met_with = {name: all(_all(p4[f"{a}_vs_{b}"], lambda v: v >= 0.85) for a, b in pairs)
                for name, pairs in P4_JUDGED.items()}
    out["P4"] = {"target": ">= 0.85 of our bf16 LoRA's tok/s with the same settings, with and without "
                           "checkpointing (default settings, or the compiled + CUDA-graph settings of P1/P2)",
                 "ratios": p4, "met_with": met_with, "met": any(met_with.values())}
    for key, checkpointing in (("7b-ckpt-ours", True), ("7b-ckpt-ours-compile", True), ("7b-nockpt-ours", False),
                               ("7b-ckpt-ours-compile-cudagraphs-inbwd", True),
                               ("7b-nockpt-ours-compile-cudagraphs", False)):
        if get(key, "step_s"):
            floor = step_floor_s(2048, checkpointing)
            out.setdefault("floors", {})[key] = {"floor_step_s": round(floor, 4), "measured_step_s": get(key, "step_s"),
                                                 "x_of_floor": round(get(key, "step_s") / floor, 2)}
    return out


def _all(value, test) -> bool:
    return value is not None and bool(test(value))


def markdown(results: dict) -> str:
    rows = ["| run | system | shape | seq | rank | ckpt | optimizer | peak alloc GiB | peak reserved GiB | step s | tokens/s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run_id, r in results["runs"].items():
        if "error" in r:
            rows.append(f"| {run_id} | {r['system']} | | | | | | failed: {r['error'][:80]!r} | | | |")
            continue
        rows.append(f"| {run_id} | {r['system']} | {r.get('shape') or r.get('name')} | {r.get('seq')} | {r.get('rank')} | "
                    f"{r.get('ckpt')} | {r.get('optim', 'adamw')} | {r.get('peak_alloc_gib')} | "
                    f"{r.get('peak_reserved_gib')} | {r.get('step_s')} | {r.get('tok_s')} |")
    rows.append("")
    rows.append("| target | measured | met |")
    rows.append("|---|---|---|")
    for name, v in results["verdicts"].items():
        if name == "floors":
            continue
        if "configs" in v:
            measured = "; ".join(
                f"{run}: " + ", ".join(f"{k} {val}" for k, val in c.items() if k != "met") + (" (met)" if c["met"] else "")
                for run, c in v["configs"].items()
            )
        else:
            measured = ", ".join(f"{k} {val}" for k, val in v["ratios"].items())
            measured += "; met with: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in v["met_with"].items())
        rows.append(f"| {name}: {v['target']} | {measured} | {'yes' if v['met'] else 'no'} |")
    for run_id, f in results["verdicts"].get("floors", {}).items():
        rows.append(f"| floor {run_id} | floor {f['floor_step_s']} s/step, measured {f['measured_step_s']} "
                    f"({f['x_of_floor']}x the floor) | |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", default=str(HERE.parent.parent / "shared" / "anchors"))
    ap.add_argument("--out", default=str(HERE / "results" / f"{datetime.date.today()}-h200.json"))
    ap.add_argument("--only", choices=["7b", "65b"], default=None)
    ap.add_argument("--runs", default=None, help="comma-separated run ids (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per process")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each configuration this many times (one process each) and keep the median step")
    a = ap.parse_args()
    out = Path(a.out)
    results: dict = {"date": str(datetime.date.today()), "host": platform.node(), "command": " ".join(sys.argv),
                     "runs": {}, "verdicts": {}}
    try:
        import torch

        results["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        results["torch"] = torch.__version__
    except ImportError:
        pass
    for run_id, group, system, args in RUNS:
        if (a.only and group != a.only) or (a.runs and run_id not in a.runs.split(",")):
            continue
        argv = [arg.replace("{anchors}", a.anchors) for arg in args]
        if a.dry_run:
            print("python", " ".join(argv))
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {run_id}: python {' '.join(argv)}", flush=True)
        result = median_run([run_one(argv, a.timeout) for _ in range(max(a.repeat, 1))])
        result = {"system": system, "command": "python " + " ".join(argv), **result}
        print(json.dumps(result), flush=True)
        results["runs"][run_id] = result
        results["verdicts"] = verdicts(results["runs"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    if a.dry_run:
        return
    table = markdown(results)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
