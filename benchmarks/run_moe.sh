#!/usr/bin/env bash
# Issue 20's benchmark on one GPU, each run's JSON line appended to $OUT/moe.jsonl and its log under $OUT/logs:
#   OUT=DIR bash benchmarks/run_moe.sh ours:adamw8bit-inbwd ours:adamw peft:prepare peft:bf16
# ours:OPTIM    bench_moe.py --side ours --optim OPTIM (adamw, adamw8bit, adamw8bit-inbwd)
# peft:prepare  bench_moe.py --side peft (the anchor's recipe: prepare_model_for_kbit_training casts experts to fp32)
# peft:bf16     the same without prepare_model_for_kbit_training (experts stay bf16)
# SHAPE (default qwen3-30b-a3b), SEQ (2048) and RUN_TIMEOUT (s per run, default 300) from the environment.
set -u
OUT=${OUT:-out}; SHAPE=${SHAPE:-qwen3-30b-a3b}; SEQ=${SEQ:-2048}; RUN_TIMEOUT=${RUN_TIMEOUT:-300}
mkdir -p "$OUT/logs"
bench="python benchmarks/bench_moe.py --shape $SHAPE --seq $SEQ --rank 16"
for run in "$@"; do
  IFS=: read -r side variant <<< "$run"
  log="$OUT/logs/${side}_${variant}.log"
  case $side:$variant in
    ours:*) timeout "$RUN_TIMEOUT" $bench --side ours --optim "$variant" > "$log" 2>&1 ;;
    peft:prepare) timeout "$RUN_TIMEOUT" $bench --side peft > "$log" 2>&1 ;;
    peft:bf16) timeout "$RUN_TIMEOUT" $bench --side peft --no-peft-prepare > "$log" 2>&1 ;;
    *) echo "unknown run $run" >&2; continue ;;
  esac
  echo "{\"run\": \"$run\", \"rc\": $?}" >> "$OUT/moe.jsonl"
  grep -h '^{' "$log" | sed "s/^{/{\"run\": \"$run\", /" >> "$OUT/moe.jsonl"
  grep -h "out of memory\|Error" "$log" | tail -2
done
