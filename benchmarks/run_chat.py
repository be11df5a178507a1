"""Issue 19's benchmark in one command: the anchor and our variants, each in its own process, one after the other.

    python benchmarks/run_chat.py --anchors .anchors --out DIR [--runs anchor,defaults,eager,handset]

``anchor``: ``peft_qlora.py --shape llama3-8b --lengths lognormal:350:4096 --bs 4 --ckpt 1`` (unchanged).
``defaults``: ``bench_chat.py`` with the plugin's defaults (``compile='auto'``). ``eager``: ``--compile false``.
``handset``: ``--compile reduce-overhead --in-backward`` (the best configuration found by hand in earlier sessions).
Each JSON line goes to ``DIR/results.jsonl``; the summary (ratios against the anchor and against the best of ours)
to ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    "anchor": ["{anchors}/peft_qlora.py", "--shape", "llama3-8b", "--lengths", "lognormal:350:4096", "--bs", "4",
               "--ckpt", "1"],
    "defaults": [f"{HERE}/bench_chat.py", "--shape", "llama3-8b"],
    "eager": [f"{HERE}/bench_chat.py", "--shape", "llama3-8b", "--compile", "false"],
    "handset": [f"{HERE}/bench_chat.py", "--shape", "llama3-8b", "--compile", "reduce-overhead", "--in-backward"],
    "nocudagraphs": [f"{HERE}/bench_chat.py", "--shape", "llama3-8b", "--compile", "default"],
    "plainloss": [f"{HERE}/bench_chat.py", "--shape", "llama3-8b", "--plain-loss"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--anchors", required=True)
    parser.add_argument("--runs", default="anchor,defaults,eager,handset")
    parser.add_argument("--timeout", type=int, default=420)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.runs.split(","):
        command = [sys.executable, *(part.format(anchors=args.anchors) for part in RUNS[name])]
        if name != "anchor":
            command += ["--out", str(out)]
        started = time.time()
        result = None
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if result.returncode == 0 and lines else {
                "error": (result.stderr or result.stdout)[-2500:], "returncode": result.returncode}
        except subprocess.TimeoutExpired as err:
            row = {"error": f"timed out after {args.timeout} s", "tail": str(err.stdout or "")[-1500:]}
        row.update(run=name, wall_s=round(time.time() - started, 1), command=" ".join(command))
        (out / f"log_{name}.txt").write_text((result.stderr if result is not None else "")[-20000:])
        rows[name] = row
        print(json.dumps(row), flush=True)
        with (out / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    anchor = rows.get("anchor", {})
    ours = {k: v for k, v in rows.items() if k != "anchor" and "real_tok_s" in v}
    summary = {}
    if ours:
        best = max(v["real_tok_s"] for v in ours.values())
        for name, row in ours.items():
            summary[name] = {
                "real_tok_s": row["real_tok_s"], "peak_alloc_gib": row.get("peak_alloc_gib"), "mfu": row.get("mfu"),
                "vs_anchor_tok_s": round(row["real_tok_s"] / anchor["real_tok_s"], 2) if "real_tok_s" in anchor else None,
                "vs_anchor_memory": round(row["peak_alloc_gib"] / anchor["peak_alloc_gib"], 3)
                if "peak_alloc_gib" in anchor and row.get("peak_alloc_gib") else None,
                "vs_best_of_ours": round(row["real_tok_s"] / best, 3),
            }
    (out / "summary.json").write_text(json.dumps({"anchor": anchor, "ours": summary}, indent=1))
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
