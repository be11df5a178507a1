#!/usr/bin/env bash
# Issue 21's runs on one GPU, one after another, each line of JSON appended to $OUT/long_context.jsonl:
#   bash benchmarks/run_long_context.sh ours:32768 everything:32768 ours:131072 everything:262144 \
#        peft-max:8192:65536 ours-max:131072:524288
# ours:SEQ         bench_long_context.py with the memory plan for an 80 GiB cap (2 steps, the second timed)
# everything:SEQ   the same with checkpointing, MLP tiles and every block offloaded (no plan)
# once:SEQ         everything, one step (long sequences)
# peft-max:LO:HI   max_context.py over the anchor (peft_qlora.py --shape llama3-8b --rank 32 --ckpt 1, 80 GiB cap)
# ours-max:LO:HI   max_context.py over bench_long_context.py --everything (same cap)
# SHAPE (default llama3-8b), ANCHORS (default .anchors), CAP (GiB; default 80, or the card's whole GiB when it has
# less: the anchor refuses a fraction above 1) and RUN_TIMEOUT (s per single run, default 420) from the environment;
# each try's log under $OUT/logs.
set -u
OUT=${OUT:-out}; SHAPE=${SHAPE:-llama3-8b}; ANCHORS=${ANCHORS:-.anchors}; RUN_TIMEOUT=${RUN_TIMEOUT:-420}
CAP=${CAP:-$(python -c "import torch; print(min(80, int(torch.cuda.get_device_properties(0).total_memory / 2**30)))")}
mkdir -p "$OUT/logs"
ours="python benchmarks/bench_long_context.py --shape $SHAPE --rank 32 --mem-cap-gib $CAP"
for run in "$@"; do
  IFS=: read -r kind a b <<< "$run"
  log="$OUT/logs/${kind}_${a}.log"
  case $kind in
    ours) timeout "$RUN_TIMEOUT" $ours --seq "$a" --steps 2 > "$log" 2>&1 ;;
    everything) timeout "$RUN_TIMEOUT" $ours --everything --seq "$a" --steps 2 > "$log" 2>&1 ;;
    once) timeout "$RUN_TIMEOUT" $ours --everything --seq "$a" --steps 1 > "$log" 2>&1 ;;
    peft-max) timeout 900 python "$ANCHORS/max_context.py" --lo "$a" --hi "$b" --step 8192 --timeout 240 -- \
        python "$ANCHORS/peft_qlora.py" --shape "$SHAPE" --rank 32 --ckpt 1 --steps 1 --mem-cap-gib "$CAP" > "$log" 2>&1 ;;
    ours-max) timeout 1800 python "$ANCHORS/max_context.py" --lo "$a" --hi "$b" --step 8192 --timeout "$RUN_TIMEOUT" -- \
        $ours --everything --steps 1 > "$log" 2>&1 ;;
    *) echo "unknown run $run" >&2; continue ;;
  esac
  echo "{\"run\": \"$run\", \"rc\": $?}" >> "$OUT/long_context.jsonl"
  grep -h '^{' "$log" | sed "s/^{/{\"run\": \"$run\", /" >> "$OUT/long_context.jsonl"
  grep -h "Memory plan\|out of memory\|Error" "$log" | tail -2
done
