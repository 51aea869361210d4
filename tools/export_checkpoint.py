"""Export any checkpoint of a run to the HuggingFace format (what every stage writes to RUN/hf/ at its end).

    python tools/export_checkpoint.py runs/tiny                          # RUN/checkpoints/latest -> RUN/hf
    python tools/export_checkpoint.py runs/tiny --tag global_step100 --output exports/step100

Reads RUN/args.json for the model and data the run used, consolidates the fp32 master weights of a
ZeRO 1/2/3 (or bf16) checkpoint with DeepSpeed's own zero_to_fp32 logic, or takes the module
weights of a plain fp32 checkpoint, and writes safetensors + config + the HF tokenizer.
A pipeline-parallel checkpoint (layer_XX-model_states.pt files, one per pipeline layer) gives the
module weights of its layers (in the run's training precision, as the run's own RUN/hf export),
mapped to HF names by pipeline/models/pipe.py.

Checkpoint files are pickles, and unpickling can run code: every file this tool reads is loaded with
`torch.load(weights_only=True)`, which builds only tensors, containers and the few DeepSpeed classes in
`pipeline.training.deepspeed_safe_globals` (a ZeRO optimizer's loss scaler, its stage enum, fragment addresses). DeepSpeed's
own ZeRO consolidation (deepspeed.utils.zero_to_fp32) loads with weights_only=False and offers no way to
change that, so each file of the tag is first loaded weights-only here (memory-mapped: the tensors are not
read), and a file holding anything else is refused before DeepSpeed unpickles it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.cli import run_main  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402
from pipeline.export import save_hf  # noqa: E402
from pipeline.files import check_output_folder  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.training import latest_tag, load_weights_only  # noqa: E402


def checkpoint_state_dict(checkpoint_dir: str, tag: str, config=None) -> dict[str, torch.Tensor]:
    """Full weights (HF names) from one checkpoint tag, whatever ZeRO stage wrote it: fp32 masters
    of a ZeRO checkpoint, or the layer files of a pipeline checkpoint (config: the model's HF config)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models import pipe

    folder = os.path.join(checkpoint_dir, tag)
    if pipe.is_pipeline_checkpoint(folder):
        if config is None:
            raise ValueError(f"{folder} is a pipeline checkpoint: its layers map to HF names with the model config")
        return pipe.pipe_to_hf(pipe.read_layer_files(folder), config)
    if any(name.endswith("optim_states.pt") for name in os.listdir(folder)):
        for path in sorted(glob.glob(os.path.join(folder, "*.pt"))):
            load_weights_only(path, mmap=True)  # refuses anything but weights before DeepSpeed's unsafe load
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)
    # ZeRO-0 in fp32: the module's weights are in the model-states file.
    path = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; {folder} is not a complete DeepSpeed checkpoint")
    state = load_weights_only(path)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"{path}: no 'module' weights; not a DeepSpeed model-states file")
    return {k: v.float() for k, v in state["module"].items()}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (with args.json and checkpoints/)")
    p.add_argument("--tag", help="checkpoint tag, e.g. global_step100 (default: the one `latest` names)")
    p.add_argument("--output", help="output folder (default: RUN/hf)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    args = p.parse_args(argv)

    run_args = read_run_args(args.run)
    checkpoint_dir = os.path.join(args.run, "checkpoints")
    tag = args.tag or latest_tag(checkpoint_dir)
    if tag is None or not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint {tag or '(no latest)'}; give one of its "
                                "global_stepN folders with --tag")
    if args.output:
        check_output_folder(args.output)

    tokenizer = Tokenizer.load(run_args["data"][0])
    special = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    model = build_model(run_args["model"], run_args["objective"], tokenizer.vocab_size, special)
    missing, unexpected = model.load_state_dict(checkpoint_state_dict(checkpoint_dir, tag, model.config), strict=False)
    tied = {k for k in missing if model.config.tie_word_embeddings and "lm_head" in k or "decoder" in k}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{checkpoint_dir}/{tag}: does not match the model {run_args['model']}: "
                         f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    output = args.output or os.path.join(args.run, "hf")
    save_hf(model, tokenizer, output)
    print(f"exported {checkpoint_dir}/{tag} -> {output}")
    return output


def read_run_args(run: str) -> dict:
    """RUN/args.json of a pretraining run: the model, objective and data the checkpoint belongs to."""
    path = os.path.join(run, "args.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; is {run} a run folder written by a pipeline stage?")
    try:
        with open(path, encoding="utf-8") as f:
            run_args = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("data", "model", "objective") if not isinstance(run_args, dict) or k not in run_args]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}; this tool exports pipeline.pretrain runs (a finetune or "
                         "compress run's export is its hf/ folder)")
    return run_args


if __name__ == "__main__":
    run_main(main, "export_checkpoint")
