#!/usr/bin/env bash
# The GPU throughput check: one prepared run of a few minutes on one GPU. Pretraining tokens/s, TFLOP/s and
# MFU (against the GPU's dense bf16/fp16 peak, pipeline/monitor.py) of the llama-350m and llama-1b presets,
# bf16 and fp16 (ds_configs/zero0.json and zero0_fp16.json: one GPU, no ZeRO partitioning to do), and bf16
# with --compile; each run is `python -m pipeline.pretrain` exactly as a user starts it.
#
# Usage: bash tools/gpu_check.sh [OUT_DIR]     (default: $OUT when set, else build/gpu_check)
# Writes OUT_DIR/gpu_check.md (a table for docs/BENCHMARKS.md) and OUT_DIR/gpu_check.json; the run folders
# (checkpoints of up to ~18 GB) are deleted after each run, their summary.json and log kept.
# Environment: STEPS (default 30), SEQ (2048), MICRO (8: micro batch per GPU), MODELS ("llama-350m llama-1b"),
# COMPILE_BACKEND (inductor). A smoke test of the script itself on a CPU, in a minute or two:
#   DS_ACCELERATOR=cpu MODELS=tiny SEQ=64 MICRO=2 STEPS=4 COMPILE_BACKEND=eager bash tools/gpu_check.sh /tmp/gc
# A machine without the pipeline's packages and no network (such as the lent H200, whose image has torch,
# transformers, sentencepiece and tensorboard but not deepspeed) takes them as wheels, fetched where pip works:
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl hjson pydantic pydantic-core annotated-types typing-inspection \
#       "typing-extensions>=4.16"
# and there, before this script:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-build/gpu_check}}
STEPS=${STEPS:-30}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-8}
MODELS=${MODELS:-"llama-350m llama-1b"}
PY=${PYTHON:-python3}
COMPILE_BACKEND=${COMPILE_BACKEND:-inductor}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda} PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

$PY - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "deepspeed", "transformers", "sentencepiece", "tensorboard", "safetensors", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
import os, torch
if os.environ["DS_ACCELERATOR"] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible to torch")
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
print(f"gpu_check: {device}, torch {torch.__version__}", flush=True)
PY

echo "== data: the demo corpus -> tokenizer + shards"
$PY tools/make_demo_corpus.py "$WORK/corpus.jsonl"
$PY -m pipeline.prepare --input "$WORK/corpus.jsonl" --output "$WORK/data" --vocab-size 2000 --overwrite >/dev/null

config() {  # config SHIPPED.json -> a copy with this check's micro batch
    local out="$WORK/$(basename "$1")"
    $PY - "$1" "$out" "$MICRO" <<'PY'
import json, sys
shipped, out, micro = sys.argv[1:]
c = json.load(open(shipped))
c["train_micro_batch_size_per_gpu"] = int(micro)
c["scheduler"]["params"].update(total_num_steps="auto", warmup_num_steps="auto")
json.dump(c, open(out, "w"), indent=2)
PY
    echo "$out"
}

run() {  # run NAME MODEL CONFIG [EXTRA FLAGS...]
    local name=$1 model=$2 cfg=$3
    shift 3
    echo "== $name: $model, $(basename "$cfg"), seq $SEQ, micro $MICRO, $STEPS steps $*"
    local status=0
    $PY -m pipeline.pretrain --data "$WORK/data" --model "$model" --deepspeed_config "$cfg" \
        --output "$WORK/$name" --train-steps "$STEPS" --seq-length "$SEQ" --log-interval 10 \
        --eval-interval 0 --eval-batches 1 --save-interval 0 "$@" >"$OUT_DIR/$name.log" 2>&1 || status=$?
    tail -n 3 "$OUT_DIR/$name.log"
    if [ -f "$WORK/$name/summary.json" ]; then cp "$WORK/$name/summary.json" "$OUT_DIR/$name.summary.json"; fi
    rm -rf "${WORK:?}/$name"
    echo "$name exit $status"
}

BF16=$(config ds_configs/zero0.json)
FP16=$(config ds_configs/zero0_fp16.json)
for model in $MODELS; do
    run "${model}_bf16" "$model" "$BF16"
    run "${model}_fp16" "$model" "$FP16"
done
for model in $MODELS; do
    run "${model}_bf16_compile" "$model" "$BF16" --compile --compile-backend "$COMPILE_BACKEND"
done

$PY - "$OUT_DIR" "$SEQ" "$MICRO" "$STEPS" <<'PY'
import glob, json, os, sys
import torch
from pipeline.models import load_model_config
from pipeline.monitor import peak_flops, training_flops_per_token
out, seq, micro, steps = sys.argv[1:]
peak = peak_flops(os.environ["DS_ACCELERATOR"])
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
rows = []
for path in sorted(glob.glob(os.path.join(out, "*.summary.json"))):
    s = json.load(open(path))
    name = os.path.basename(path).removesuffix(".summary.json")
    config, _ = load_model_config(s["model"], 2000, {})  # the preset at the demo tokenizer's vocabulary
    flops = training_flops_per_token(config, int(seq)) * s["tokens_per_sec"]
    rows.append({"run": name, "model": s["model"], "precision": s["precision"], "compile": name.endswith("_compile"),
                 "parameters": s["parameters"], "tokens_per_sec": s["tokens_per_sec"], "tflops": flops / 1e12,
                 "mfu": flops / peak if peak else None, "train_loss": s["train_loss"]})
json.dump({"device": device, "torch": torch.__version__, "seq_length": int(seq),
           "micro_batch": int(micro), "steps": int(steps), "peak_flops": peak, "runs": rows},
          open(os.path.join(out, "gpu_check.json"), "w"), indent=2)
peak_text = f"dense half-precision peak {peak / 1e12:.0f} TFLOP/s" if peak else "no known peak"
lines = [f"Device: {device} ({peak_text}), torch "
         f"{torch.__version__}; `python -m pipeline.pretrain`, one GPU, ZeRO-0, sequence {seq}, micro batch {micro}, "
         f"{steps} steps (tokens/s leave out the first 2).", "",
         "| run | parameters | precision | tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
for r in rows:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    lines.append(f"| {r['run']} | {r['parameters'] / 1e6:.0f} M | {r['precision']} | {r['tokens_per_sec']:,.0f} | "
                 f"{r['tflops']:.0f} | {mfu} |")
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
