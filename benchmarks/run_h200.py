"""The H200 benchmark of issue 7 in one run: lightning_qlora and the anchors, side by side, one process each.

    python benchmarks/run_h200.py --anchors ../shared/anchors --out benchmarks/results/$(date +%F)-h200.json

Runs every configuration below as its own process (ours: benchmarks/bench_qlora.py; the anchors unchanged), in
pairs so that each ratio compares runs minutes apart on the same machine. After each process the results file is
rewritten, so a run cut short keeps what finished. At the end it prints (and writes next to the JSON, as .md) the
table for benchmarks/README.md with every ratio and the targets P1-P4 (judged on our default settings; the
``-plain`` and ``-compile`` rows measure one change each). ``--only 7b`` or ``--only 65b`` runs a part.
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


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def verdicts(r: dict[str, dict]) -> dict[str, dict]:
    def get(run: str, key: str):
        return r.get(run, {}).get(key)

    out = {
        "P1": {"tok_s_vs_peft": ratio(get("7b-ckpt-ours", "tok_s"), get("7b-ckpt-peft", "tok_s")),
               "peak_vs_peft": ratio(get("7b-ckpt-ours", "peak_alloc_gib"), get("7b-ckpt-peft", "peak_alloc_gib")),
               "target": "tok/s >= 2.5x PEFT, peak <= 0.9x"},
        "P2": {"tok_s_vs_litgpt": ratio(get("7b-nockpt-ours", "tok_s"), get("7b-nockpt-litgpt", "tok_s")),
               "peak_vs_litgpt": ratio(get("7b-nockpt-ours", "peak_alloc_gib"), get("7b-nockpt-litgpt", "peak_alloc_gib")),
               "target": "tok/s >= 1.3x LitGPT, peak <= 1.0x"},
        "P3": {"peak_gib": get("65b-ours-paged-inbwd", "peak_alloc_gib") or get("65b-ours-paged", "peak_alloc_gib"),
               "peak_gib_paged": get("65b-ours-paged", "peak_alloc_gib"),
               "peak_gib_fused_adamw": get("65b-ours", "peak_alloc_gib"),
               "peak_gib_fused_adamw_in_backward": get("65b-ours-inbwd", "peak_alloc_gib"),
               "tok_s_vs_peft_fused": ratio(get("65b-ours", "tok_s"), get("65b-peft", "tok_s")),
               "tok_s_in_backward_vs_peft_fused": ratio(get("65b-ours-inbwd", "tok_s"), get("65b-peft", "tok_s")),
               "peak_vs_peft_paged": ratio(get("65b-ours-paged", "peak_alloc_gib"), get("65b-peft-paged", "peak_alloc_gib")),
               "target": "peak < 38 GiB (our lowest-memory option: paged 8-bit AdamW stepped in backward), "
                         "tok/s >= 1.5x PEFT (fused AdamW)"},
        "P4": {"ckpt_vs_own_bf16": ratio(get("7b-ckpt-ours", "tok_s"), get("7b-ckpt-ours-bf16", "tok_s")),
               "nockpt_vs_own_bf16": ratio(get("7b-nockpt-ours", "tok_s"), get("7b-nockpt-ours-bf16", "tok_s")),
               "target": ">= 0.85"},
    }
    p1, p2, p3, p4 = out["P1"], out["P2"], out["P3"], out["P4"]
    p1["met"] = _all(p1["tok_s_vs_peft"], lambda x: x >= 2.5) and _all(p1["peak_vs_peft"], lambda x: x <= 0.9)
    p2["met"] = _all(p2["tok_s_vs_litgpt"], lambda x: x >= 1.3) and _all(p2["peak_vs_litgpt"], lambda x: x <= 1.0)
    p3["met"] = _all(p3["peak_gib"], lambda x: x < 38) and _all(p3["tok_s_vs_peft_fused"], lambda x: x >= 1.5)
    p4["met"] = _all(p4["ckpt_vs_own_bf16"], lambda x: x >= 0.85) and _all(p4["nockpt_vs_own_bf16"], lambda x: x >= 0.85)
    for key, checkpointing in (("7b-ckpt-ours", True), ("7b-nockpt-ours", False)):
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
        measured = ", ".join(f"{k} {val}" for k, val in v.items() if k not in ("target", "met"))
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
        result = {"system": system, "command": "python " + " ".join(argv), **run_one(argv, a.timeout)}
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
