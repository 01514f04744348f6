#!/usr/bin/env bash
# KTO against DPO from one paired file, on the shipped demo model (CPU, a few minutes):
#   bash examples/kto_vs_dpo/run.sh [OUT] [ITERS]
# 1. a paired set (prompt/chosen/rejected); 2. a KTO adapter on it (each pair becomes a
# thumbs-up and a thumbs-down row); 3. a DPO adapter on the same pairs; 4. `mlx-kto compare`
# of base, KTO and DPO on the held-out prompts, judged by the demo's politeness rule.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="${1:-kto-vs-dpo}"
ITERS="${2:-120}"
PY="${PYTHON:-python}"
MODEL="$ROOT/mlx_kto/demo/assets/model"
COMMON=(--model "$MODEL" --data "$OUT/data" --dtype float32 --max-length 64 --beta 0.5
        --iters "$ITERS" --learning-rate 5e-4 --lora-rank 8 --lora-alpha 16 --num-layers 2
        --steps-per-eval 0 --steps-per-save 0 --overwrite)

"$PY" "$HERE/make_pairs.py" "$OUT/data"
# KTO: --batch-size counts rows (8 rows = 4 pairs' worth); DPO: --batch-size counts pairs.
"$PY" -m mlx_kto.cli train "${COMMON[@]}" --loss-type kto --batch-size 8 --adapter-path "$OUT/kto"
"$PY" -m mlx_kto.cli train "${COMMON[@]}" --loss-type dpo --batch-size 4 --adapter-path "$OUT/dpo"
"$PY" -m mlx_kto.cli compare --model "$MODEL" --dtype float32 \
    --adapter-path "kto=$OUT/kto" --adapter-path "dpo=$OUT/dpo" \
    --data "$ROOT/mlx_kto/demo/assets/heldout_prompts.json" --num-prompts 16 --samples 4 \
    --max-tokens 32 --judge "$ROOT/examples/judge_polite.py:score" -o "$OUT/compare" --overwrite
