#!/usr/bin/env bash
# The golf bench on one GPU: build the book-corpus shards once, then run train_gpt.py for each
# configuration given, one after another, and print a table of the finished runs.
#
# Usage: scripts/golf_bench.sh CORPUS LOGS NAME "VAR=VALUE ..." [NAME "VAR=VALUE ..." ...]
#   CORPUS  folder with gutenberg/{train,val}.jsonl.zst and tokenizers/fineweb_<V>_bpe.model
#   LOGS    folder that receives each run's log as NAME.txt
#   VOCAB (environment, default 8192 like train_gpt.py) picks the tokenizer; BENCH_SECONDS (default 300) the cap;
#   RUN_TIMEOUT (seconds, default none) stops a run that would eat the time of the next ones.
set -euo pipefail
if [ $# -lt 4 ] || [ $(( ($# - 2) % 2 )) -ne 0 ]; then
  echo "usage: $0 CORPUS LOGS NAME \"VAR=VALUE ...\" [NAME \"VAR=VALUE ...\" ...]" >&2; exit 2
fi
corpus=$1 logs=$2; shift 2
vocab=${VOCAB:-8192}
data=data/datasets/gutenberg_sp${vocab}
tokenizer=$corpus/tokenizers/fineweb_${vocab}_bpe.model
mkdir -p "$logs"
if [ ! -f "$data/summary.json" ]; then
  start=$(date +%s)
  python3 data/build_shards.py --input "$corpus/gutenberg/train.jsonl.zst" --val "$corpus/gutenberg/val.jsonl.zst" \
    --tokenizer "$tokenizer" --out "$data" 2>&1 | tail -n 3
  echo "shards sp${vocab} built in $(( $(date +%s) - start )) s"
fi
while [ $# -gt 0 ]; do
  name=$1 vars=$2; shift 2
  echo "=== $name: $vars"
  # shellcheck disable=SC2086
  env DATA_PATH="$data" TOKENIZER_PATH="$tokenizer" VOCAB_SIZE="$vocab" RUN_ID="$name" \
    MAX_WALLCLOCK_SECONDS="${BENCH_SECONDS:-300}" $vars \
    timeout "${RUN_TIMEOUT:-0}" torchrun --standalone --nproc_per_node=1 train_gpt.py > "$logs/$name.txt" 2>&1 \
    || echo "$name FAILED (see $logs/$name.txt)"
  grep -E "^(model_params|warmup_time|stopping_early|peak memory|compile_stats|phase|progressive_depth|Total submission|final_[a-z0-9]+_[a-z]+_[a-z]+(_lora)?(_mix)? )" \
    "$logs/$name.txt" || tail -n 5 "$logs/$name.txt"
done
python3 scripts/runs_table.py runs/*/
