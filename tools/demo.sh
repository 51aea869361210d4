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

# bf16 as shipped, unless this is a CPU without native bf16 (no AVX512-BF16/AMX): there bf16 matrix
# products are emulated ~30x slower than fp32, so the demo trains the same config in fp32.
CONFIG=ds_configs/zero2.json
if [ "$DS_ACCELERATOR" = cpu ] && ! python -c "import sys, torch; sys.exit(not torch.ops.mkldnn._is_mkldnn_bf16_supported())"; then
    echo "(this CPU has no native bf16: the demo runs ds_configs/zero2.json in fp32)"
    python -c "import json, sys; c = json.load(open('ds_configs/zero2.json')); c['bf16'] = {'enabled': False}; json.dump(c, open(sys.argv[1], 'w'), indent=2)" "$OUT/zero2_fp32.json"
    CONFIG=$OUT/zero2_fp32.json
fi

echo "== 2/2 pretrain: a tiny Llama on 2 ranks, ZeRO-2 ($CONFIG)"
rm -rf "$OUT/pretrain"  # a fresh run each time (rerunning a stage on its run folder would resume it)
deepspeed --num_gpus 2 pipeline/pretrain.py --data "$OUT/data" --model tiny \
    --deepspeed_config "$CONFIG" --output "$OUT/pretrain" \
    --train-steps 200 --seq-length 128 --log-interval 20 --eval-interval 100 --save-interval 100

echo "== done: $OUT/pretrain/summary.json"
cat "$OUT/pretrain/summary.json"
echo "TensorBoard: tensorboard --logdir $OUT/pretrain/tensorboard"
