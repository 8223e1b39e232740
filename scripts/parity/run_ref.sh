#!/usr/bin/env bash
# Run the 2026-04-27 record's script on the golf bench at the record's configuration (docs/parity.md).
#
#   REF_SCRIPT=<the record's train_gpt.py> CASEOPS_DIR=<CaseOps shards> \
#     bash scripts/parity/run_ref.sh MODE SECONDS [VAR=VALUE ...]
#
# MODE     parity: train, then stop after its "pre-quantization post-ema" score (PREQUANT_ONLY=1);
#          full: train, export (GPTQ + LQER, brotli) and score the artifact; its TTT stays off unless you set
#          TTT_ENABLED=1 (it does not finish on the bench's books in ten minutes: docs/parity.md).
# SECONDS  its MAX_WALLCLOCK_SECONDS. Its two step-count constants are scaled to the bench's N = SECONDS / 1.05
#          steps: EMA_DECAY = 1 - 1 / (0.058 N) (its averaging window is 5.8% of its 4,931 steps) and
#          MUON_MOMENTUM_WARMUP_STEPS = 0.304 N (1,500 of 4,931).
# VAR=VALUE  override anything below (they come last), e.g. SEED=42, or TTT_EVAL_ONLY=1 ARTIFACT_DIR=<folder>.
#
# REF_SCRIPT's folder must hold the record's tokenizers/ (its CaseOps SentencePiece model). CASEOPS_DIR holds
# fineweb_train_*.bin, fineweb_val_*.bin and fineweb_val_bytes_*.bin, as `data/build_shards.py --transform caseops`
# writes them with that tokenizer. The script is patched into a fresh folder each run (patch_reference.py); the
# bench's knobs (ref_hooks.py) default to the fair pairs' settings here. The log goes to $OUT (default runs/ref)
# as ref_<MODE>_<SECONDS>.log; NPROC (default 1) sets the GPUs. Needs brotli (full mode) and a CUDA GPU.
# Its compile caches go to runs/ref_cache (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR unless set), so a second run
# on the same machine compiles less (its TTT's warmup: 251 s cold, 140 s warm on an H100, docs/parity.md).
# DRY_RUN=1 prints the patch and the settings, and stops before torchrun.
set -euo pipefail
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
die() { echo "run_ref.sh: $*" >&2; exit 2; }
case ${1:-} in -h | --help) usage; exit 0 ;; esac
[ $# -ge 2 ] || { usage >&2; exit 2; }
mode=$1 secs=$2; shift 2
case $mode in parity) prequant=1 ;; full) prequant=0 ;; *) die "MODE '$mode': expected parity or full" ;; esac
[[ $secs =~ ^[0-9]+$ ]] && [ "$secs" -ge 20 ] || die "SECONDS '$secs': expected a whole number of seconds >= 20"
for kv in "$@"; do [[ $kv =~ ^[A-Z_][A-Z0-9_]*=.*$ ]] || die "'$kv': expected VAR=VALUE"; done
[ -f "${REF_SCRIPT:-}" ] || die "REF_SCRIPT='${REF_SCRIPT:-}': not a file (the record's train_gpt.py)"
tokenizer=$(cd "$(dirname "$REF_SCRIPT")" && pwd)/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
[ -f "$tokenizer" ] || die "REF_SCRIPT's folder has no tokenizers/$(basename "$tokenizer")"
[ -d "${CASEOPS_DIR:-}" ] || die "CASEOPS_DIR='${CASEOPS_DIR:-}': not a folder"
caseops=$(cd "$CASEOPS_DIR" && pwd)
ls "$CASEOPS_DIR"/fineweb_val_bytes_*.bin > /dev/null 2>&1 || die "CASEOPS_DIR=$CASEOPS_DIR: no fineweb_val_bytes_*.bin (build it with --transform caseops)"
root=$(cd "$(dirname "$0")/../.." && pwd)
nproc=${NPROC:-1}
out=${OUT:-runs/ref}; mkdir -p "$out"; out=$(cd "$out" && pwd)
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
python3 "$root/scripts/parity/patch_reference.py" "$REF_SCRIPT" "$work" > "$work/patch.txt" || exit 2  # its one line said why

# the scaled constants, and the largest validation batch that scores every whole sequence: the record cuts each
# rank's sequences to a multiple of its batch (VAL_BATCH_TOKENS / 8 tokens a rank and micro-step)
read -r ema warm val_batch < <(python3 - "$secs" "$caseops" "$nproc" "$root" <<'EOF'
import sys
from pathlib import Path
secs, folder, world = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
import train_gpt  # ours: its shard reader (the header checked, the byte sidecars left out)
n = int(secs / 1.05)
try:
    tokens = sum(train_gpt.read_shard_header(p) for p in train_gpt.find_shards(str(folder), "val"))
except train_gpt.UserError as e:
    sys.exit(f"run_ref.sh: CASEOPS_DIR: {e}")
seqs = (tokens - 1) // 2048
shares = [seqs * (r + 1) // world - seqs * r // world for r in range(world)]
most = 524288 // 8 // 2048  # the record's default batch, in sequences per rank and micro-step
batch = max(d for d in range(1, most + 1) if all(s % d == 0 for s in shares))
print(f"{1 - 1 / (0.058 * n):.4f} {round(0.304 * n)} {batch * 8 * 2048}")
EOF
) || true
[ -n "${val_batch:-}" ] || exit 2  # its one line said why

# the record's README command (its configuration), then the bench's settings, then the caller's
record=(VOCAB_SIZE=8192 CASEOPS_ENABLED=1 ITERATIONS=20000 PHASED_TTT_ENABLED=1 PHASED_TTT_NUM_PHASES=3
  EMBED_BITS=7 MATRIX_LR=0.026 MIN_LR=0.1 MLP_CLIP_SIGMAS=11.5 ATTN_CLIP_SIGMAS=13.0 EMBED_CLIP_SIGMAS=14.0
  GRAD_CLIP_NORM=0.3 TTT_CHUNK_SIZE=48 WARMUP_STEPS=20 MUON_BACKEND_STEPS=5 GLOBAL_TTT_MOMENTUM=0.9
  WARMDOWN_FRAC=0.85 BETA2=0.99 TTT_BETA2=0.99 TTT_WEIGHT_DECAY=0.5 TTT_LORA_RANK=80 SPARSE_ATTN_GATE_SCALE=0.5
  GPTQ_CALIBRATION_BATCHES=16 GATED_ATTN_QUANT_GATE=1 SPARSE_ATTN_GATE_ENABLED=1 GATE_WINDOW=12
  SMEAR_GATE_ENABLED=1 LQER_ENABLED=1 LQER_ASYM_ENABLED=1 LQER_RANK=4 LQER_FACTOR_BITS=4 LQER_ASYM_GROUP=64
  LQER_TOP_K=3 FUSED_CE_ENABLED=1)
bench=(DATA_PATH="$caseops" TOKENIZER_PATH="$tokenizer" MAX_WALLCLOCK_SECONDS="$secs" EMA_DECAY="$ema"
  MUON_MOMENTUM_WARMUP_STEPS="$warm" VAL_BATCH_TOKENS="$val_batch" VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=14
  COMPRESSOR=brotli GPTQ_RESERVE_SECONDS=4 PREQUANT_ONLY=$prequant TTT_ENABLED=0
  FA_SHIM_MASK=blocks REF_CU_BUCKETS=64 REF_RESET_MOMENTUM=1 REF_SKIP_LAST_VAL=1 REF_LOADER=shuffled
  REF_OURS_SCRIPT="$root/train_gpt.py" ARTIFACT_DIR="$out/artifact_${mode}_${secs}")
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$root/runs/ref_cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/runs/ref_cache/triton}
log=$out/ref_${mode}_${secs}.log
{ cat "$work/patch.txt"; echo "run_ref.sh: ${record[*]} ${bench[*]} $*"; } > "$log"
if [ "${DRY_RUN:-0}" = 1 ]; then cat "$log"; exit 0; fi
# torchrun stays in this script's process group, so `timeout` (which signals its whole group) stops the run too
# from the caller's folder, so that relative paths among the caller's VAR=VALUE (ARTIFACT_DIR) mean what they say
env PYTHONUNBUFFERED=1 "${record[@]}" "${bench[@]}" "$@" \
  torchrun --standalone --nproc_per_node="$nproc" "$work/train_gpt.py" 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
