"""Issue 18's benchmark in one command: checkpoints written to disk, ours and transformers + PEFT side by side.

    python benchmarks/run_from_disk.py --anchors .anchors --shapes 7b,13b --seqs 1024,2048 --out results.jsonl
    python benchmarks/run_from_disk.py --anchors .anchors --shapes 65b-wide --write-layers 12 --layer-points 4,8,12 \
        --seqs 1024 --no-anchor --out wide.jsonl

For each shape: ``peft_from_disk.py write`` (the anchor, unchanged) writes a random-weight bf16 checkpoint to
``--scratch``; then, for each sequence length, the anchor's ``run`` and ours (``benchmarks/from_disk.py``), each in
its own process; the checkpoint is deleted before the next shape (the device's disk holds one at a time). With
``--layer-points`` ours also runs on the first N blocks only, for the per-layer device peak, and the line
``extrapolated`` fits peak = a + b * layers and gives the value at 80 layers. Every JSON line goes to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(command: list[str], timeout: int) -> dict:
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"command": " ".join(command), "error": result.stderr[-1500:], "returncode": result.returncode}
    row = json.loads(lines[-1])
    row["wall_s"] = round(time.time() - started, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--anchors", required=True)
    parser.add_argument("--shapes", default="7b,13b")
    parser.add_argument("--seqs", default="1024,2048")
    parser.add_argument("--scratch", default="/tmp/ckpt")
    parser.add_argument("--write-layers", type=int, default=None, help="layers of the written checkpoint")
    parser.add_argument("--layer-points", default=None, help="also run ours on the first N blocks, e.g. 4,8,12")
    parser.add_argument("--no-anchor", action="store_true")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trace-anon", action="store_true")
    parser.add_argument("--also-no-prefetch", action="store_true", help="ours without prefetch too, at the first seq")
    parser.add_argument("--profile-dir", default=None, help="ours also writes a cProfile up to its first step here, "
                        "one <shape>-<seq>.pstats per run (where the seconds before the first step go)")
    args = parser.parse_args()
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    extra = ["--trace-anon"] if args.trace_anon else []
    out = Path(args.out)
    anchor = str(Path(args.anchors) / "peft_from_disk.py")

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    for shape in args.shapes.split(","):
        directory = Path(args.scratch) / shape
        shutil.rmtree(directory, ignore_errors=True)
        write = [sys.executable, anchor, "write", str(directory), "--shape", shape]
        if args.write_layers:
            write += ["--layers", str(args.write_layers)]
        emit({"shape": shape, "step": "write", **_run(write, args.timeout)})
        for seq in map(int, args.seqs.split(",")):
            if not args.no_anchor:
                emit({"shape": shape, "side": "peft", **_run([sys.executable, anchor, "run", str(directory),
                                                               "--seq", str(seq)], args.timeout)})
            profile = ["--profile", str(Path(args.profile_dir) / f"{shape}-{seq}.pstats")] if args.profile_dir else []
            emit({"shape": shape, "side": "ours", **_run([sys.executable, str(HERE / "from_disk.py"), str(directory),
                                                           "--seq", str(seq), *extra, *profile], args.timeout)})
        if args.also_no_prefetch:
            emit({"shape": shape, "side": "ours", **_run([sys.executable, str(HERE / "from_disk.py"), str(directory),
                                                           "--seq", args.seqs.split(",")[0], "--no-prefetch"],
                                                          args.timeout)})
        if args.layer_points:
            points = []
            for layers in map(int, args.layer_points.split(",")):
                row = _run([sys.executable, str(HERE / "from_disk.py"), str(directory), "--seq",
                            args.seqs.split(",")[0], "--layers", str(layers)], args.timeout)
                emit({"shape": shape, "side": "ours", "point": layers, **row})
                if "device_peak_alloc_gib" in row:
                    points.append((layers, row["device_peak_alloc_gib"]))
            if len(points) >= 2:
                n = len(points)
                mean_x = sum(x for x, _ in points) / n
                mean_y = sum(y for _, y in points) / n
                slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
                intercept = mean_y - slope * mean_x
                emit({"shape": shape, "extrapolated": True, "points": points, "gib_per_layer": round(slope, 3),
                      "gib_at_0_layers": round(intercept, 3), "gib_at_80_layers": round(intercept + 80 * slope, 2)})
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
