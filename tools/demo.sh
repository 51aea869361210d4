#!/usr/bin/env bash
# The end-to-end demo on bundled data (Python's own help topics, the demo reviews in data/sentiment/):
# prepare -> pretrain -> finetune a sentiment classifier -> compress it -> evaluate and predict -> report.
# Usage: bash tools/demo.sh [OUT_DIR]    (what `make demo` runs; OUT_DIR defaults to build/demo)
# On CPU (DS_ACCELERATOR=cpu, the default) the training stages run on 2 ranks with the shipped bf16 configs
# (fp32 where the CPU has no native bf16); with DS_ACCELERATOR=cuda on up to 2 GPUs with the _fp16 configs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/demo}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$OUT"

echo "== 1/6 prepare: help topics -> tokenizer + token shards"
python tools/make_demo_corpus.py "$OUT/corpus.jsonl"
python -m pipeline.prepare --input "$OUT/corpus.jsonl" --output "$OUT/data" --vocab-size 2000 --overwrite
python tools/inspect_data.py "$OUT/data" --show 1

# The shipped configs are bf16. A GPU runs their _fp16 twins (the compression config has none: the demo
# writes one with zero2_fp16.json's fp16 block). On a CPU without native bf16 (no AVX512-BF16/AMX) bf16
# matrix products are emulated ~30x slower than fp32, so there the demo runs the same configs in fp32.
PRECISION=bf16
RANKS=2
if [ "$DS_ACCELERATOR" = cuda ]; then
    PRECISION=fp16
    RANKS=$(python -c "import torch; print(min(2, torch.cuda.device_count()))")
elif [ "$DS_ACCELERATOR" = cpu ] && ! python -c "import sys, torch; sys.exit(not torch.ops.mkldnn._is_mkldnn_bf16_supported())"; then
    PRECISION=fp32
    echo "(this CPU has no native bf16: the demo runs its configs in fp32)"
fi
demo_config() {  # demo_config SHIPPED.json -> the path to use
    if [ "$PRECISION" = bf16 ]; then echo "$1"; return; fi
    if [ "$PRECISION" = fp16 ] && [ -f "${1%.json}_fp16.json" ]; then echo "${1%.json}_fp16.json"; return; fi
    local out="$OUT/${PRECISION}_$(basename "$1")"
    python - "$1" "$out" "$PRECISION" <<'PY'
import json, sys
shipped, out, precision = sys.argv[1:]
c = json.load(open(shipped))
c["bf16"] = {"enabled": False}
if precision == "fp16":
    c["fp16"] = json.load(open("ds_configs/zero2_fp16.json"))["fp16"]
json.dump(c, open(out, "w"), indent=2)
PY
    echo "$out"
}
CONFIG=$(demo_config ds_configs/zero2.json)

echo "== 2/6 pretrain: a tiny Llama on $RANKS ranks, ZeRO-2 ($CONFIG)"
rm -rf "$OUT/pretrain"  # a fresh run each time (rerunning a stage on its run folder would resume it)
deepspeed --num_gpus "$RANKS" pipeline/pretrain.py --data "$OUT/data" --model tiny \
    --deepspeed_config "$CONFIG" --output "$OUT/pretrain" \
    --train-steps 200 --seq-length 128 --log-interval 20 --eval-interval 100 --save-interval 100

echo "== 3/6 finetune: the pretrained model -> a sentiment classifier on data/sentiment (demo reviews)"
rm -rf "$OUT/finetune"
deepspeed --num_gpus "$RANKS" pipeline/finetune.py --task classify \
    --train data/sentiment/train.jsonl --valid data/sentiment/valid.jsonl --test data/sentiment/test.jsonl \
    --text-key text --label-key label --init "$OUT/pretrain/hf" \
    --deepspeed_config "$CONFIG" --output "$OUT/finetune" --epochs 5 --patience 2 --log-interval 50

echo "== 4/6 compress: int8 quantization-aware training of the classifier (ds_configs/compression/int8_qat.json)"
rm -rf "$OUT/compress"
python -m pipeline.compress --task classify --init "$OUT/finetune/hf" \
    --train data/sentiment/train.jsonl --valid data/sentiment/valid.jsonl --test data/sentiment/test.jsonl \
    --text-key text --label-key label --deepspeed_config "$(demo_config ds_configs/compression/int8_qat.json)" \
    --output "$OUT/compress" --train-steps 60 --log-interval 20

# compress/hf is the compressed classifier as a plain transformers model (compress/compressed holds its int8
# weights; the before/after metrics in compress/summary.json were measured on those).
echo "== 5/6 evaluate and predict with the compressed classifier ($OUT/compress/hf)"
python -m pipeline.predict --model "$OUT/compress/hf" --input data/sentiment/test.jsonl --output "$OUT/predictions.jsonl"
printf '%s\n' "The staff were friendly and the food was excellent." "Terrible service, I would never go back." \
    | python -m pipeline.predict --model "$OUT/compress/hf"

echo "== 6/6 report: curves and final metrics of the three training runs"
python tools/report.py "$OUT/pretrain" "$OUT/finetune" "$OUT/compress" --output "$OUT/report"

echo "== done: what each stage produced"
python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def summary(stage):
    path = os.path.join(out, stage, "summary.json")
    return json.load(open(path)) if os.path.isfile(path) else {}
def predicted():  # the compressed classifier's predictions on the test file against its labels
    preds = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    gold = [json.loads(line)["label"] for line in open("data/sentiment/test.jsonl")]
    return {"test_accuracy": sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold)}
def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
rows = [
    ("prepare", f"{out}/data", summary("data"), ("documents", "tokens", "tokens_per_sec")),
    ("pretrain", f"{out}/pretrain/hf", summary("pretrain"), ("steps", "train_loss", "eval_loss", "eval_ppl", "tokens_per_sec", "precision")),
    ("finetune", f"{out}/finetune/hf", summary("finetune"), ("valid_accuracy", "valid_macro_f1", "test_accuracy", "test_macro_f1")),
    ("compress", f"{out}/compress/hf, {out}/compress/compressed", summary("compress"), ("bytes_before", "bytes_after", "test_accuracy_before", "test_accuracy_after")),
    ("predict", f"{out}/predictions.jsonl", predicted(), ("test_accuracy",)),
    ("report", f"{out}/report/report.md", {}, ()),
]
print(f"| stage | output | results |\n|---|---|---|")
for stage, path, s, keys in rows:
    print(f"| {stage} | {path} | " + ", ".join(f"{k} {fmt(s[k])}" for k in keys if s.get(k) is not None) + " |")
PY
echo "TensorBoard: tensorboard --logdir $(printf '%q' "$OUT") (every run's tensorboard/ folder)"
