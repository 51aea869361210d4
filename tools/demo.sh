#!/usr/bin/env bash
# The end-to-end demo on bundled data (Python's own help topics, the demo reviews in data/sentiment/):
# prepare -> pretrain -> finetune a sentiment classifier -> predict.
# Usage: bash tools/demo.sh [OUT_DIR]    (what `make demo` runs; OUT_DIR defaults to build/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/demo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$OUT"

echo "== 1/3 prepare: help topics -> tokenizer + token shards"
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

echo "== 2/3 pretrain: a tiny Llama on 2 ranks, ZeRO-2 ($CONFIG)"
rm -rf "$OUT/pretrain"  # a fresh run each time (rerunning a stage on its run folder would resume it)
deepspeed --num_gpus 2 pipeline/pretrain.py --data "$OUT/data" --model tiny \
    --deepspeed_config "$CONFIG" --output "$OUT/pretrain" \
    --train-steps 200 --seq-length 128 --log-interval 20 --eval-interval 100 --save-interval 100

echo "== 3/3 finetune: the pretrained model -> a sentiment classifier on data/sentiment (demo reviews)"
rm -rf "$OUT/finetune"
deepspeed --num_gpus 2 pipeline/finetune.py --task classify \
    --train data/sentiment/train.jsonl --valid data/sentiment/valid.jsonl --test data/sentiment/test.jsonl \
    --text-key text --label-key label --init "$OUT/pretrain/hf" \
    --deepspeed_config "$CONFIG" --output "$OUT/finetune" --epochs 5 --patience 2 --log-interval 50
printf '%s\n' "The staff were friendly and the food was excellent." "Terrible service, I would never go back." \
    | python -m pipeline.predict --model "$OUT/finetune/hf"

echo "== done: $OUT/pretrain/summary.json, $OUT/finetune/summary.json"
cat "$OUT/pretrain/summary.json"
python -c "import json, sys; s = json.load(open(sys.argv[1])); print({k: s[k] for k in ('valid_accuracy', 'valid_macro_f1', 'test_accuracy', 'test_macro_f1', 'best_step')})" "$OUT/finetune/summary.json"
echo "TensorBoard: tensorboard --logdir $OUT/pretrain/tensorboard (and $OUT/finetune/tensorboard)"
