#!/usr/bin/env bash
# The end-to-end demo on bundled data (Python's own help topics): prepare -> pretrain -> report.
# Usage: bash tools/demo.sh [OUT_DIR]    (what `make demo` runs; OUT_DIR defaults to build/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/demo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$OUT"

echo "== 1/2 prepare: help topics -> tokenizer + token shards"
python tools/make_demo_corpus.py "$OUT/corpus.jsonl"
python -m pipeline.prepare --input "$OUT/corpus.jsonl" --output "$OUT/data" --vocab-size 2000 --overwrite
python tools/inspect_data.py "$OUT/data" --show 1

echo "== 2/2 pretrain: a tiny Llama on 2 ranks, ZeRO-2 bf16 (rerunning resumes from the last checkpoint)"
deepspeed --num_gpus 2 pipeline/pretrain.py --data "$OUT/data" --model tiny \
    --deepspeed_config ds_configs/zero2.json --output "$OUT/pretrain" \
    --train-steps 300 --seq-length 128 --log-interval 25 --eval-interval 100 --save-interval 100

echo "== done: $OUT/pretrain/summary.json"
cat "$OUT/pretrain/summary.json"
echo "TensorBoard: tensorboard --logdir $OUT/pretrain/tensorboard"
