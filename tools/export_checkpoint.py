"""Export any checkpoint of a run to the HuggingFace format (what every stage writes to RUN/hf/ at its end).

    python tools/export_checkpoint.py runs/tiny                          # RUN/checkpoints/latest -> RUN/hf
    python tools/export_checkpoint.py runs/tiny --tag global_step100 --output exports/step100
    python tools/export_checkpoint.py /elsewhere/runs/tiny --tokenizer /data/prepared   # moved run or data

Exports pipeline.pretrain runs. A finetune or compress run writes its export to RUN/hf at its end (and a
compress run its integer weights to RUN/compressed); this tool refuses them.

Reads RUN/args.json for the model and data the run used, consolidates the fp32 master weights of a
ZeRO 1/2/3 (or bf16) checkpoint with DeepSpeed's own zero_to_fp32 logic, or takes the module
weights of a plain fp32 checkpoint, and writes safetensors + config + the HF tokenizer.
A pipeline-parallel checkpoint (layer_XX-model_states.pt files, one per pipeline layer) gives the
module weights of its layers (in the run's training precision, as the run's own RUN/hf export),
mapped to HF names by pipeline/models/pipe.py. A universal checkpoint (tools/convert_checkpoint.py
--to universal) gives the fp32 weights in its zero/PARAMETER/fp32.pt files.

args.json holds the paths as the stage was given them, often relative to the folder it was launched
from. A relative path is tried as given (from the current folder), then from that launch folder (the
run folder's path minus args.json's relative `output`), then from each folder above the run folder;
when none exists, the error names the path and the flag that overrides it (--tokenizer, --model).

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
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.cli import run_main  # noqa: E402
from pipeline.data.tokenizer import Tokenizer  # noqa: E402
from pipeline.export import save_hf  # noqa: E402
from pipeline.files import check_output_folder  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.models.presets import PRESETS  # noqa: E402
from pipeline.training import is_universal_checkpoint, latest_tag, load_weights_only  # noqa: E402

PIPE_PARAM = re.compile(r"(\d+)\.(hf\..+)")  # a pipeline module's parameter: LAYER_INDEX.hf.NAME


def checkpoint_state_dict(checkpoint_dir: str, tag: str, config=None) -> dict[str, torch.Tensor]:
    """Full weights (HF names) from one checkpoint tag, whatever ZeRO stage wrote it: fp32 masters
    of a ZeRO or universal checkpoint, or the layer files of a pipeline checkpoint (config: the model's HF config)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.models import pipe

    folder = os.path.join(checkpoint_dir, tag)
    if is_universal_checkpoint(folder):
        return universal_state_dict(folder, config)
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


def universal_state_dict(folder: str, config=None) -> dict[str, torch.Tensor]:
    """fp32 weights of a universal checkpoint: one zero/PARAMETER/fp32.pt per parameter, named as in the module
    DeepSpeed trained: HF names, or a pipeline's LAYER.hf.NAME (the tied embedding: tied_modules.embed.hf.NAME),
    mapped to HF names with pipe.pipe_to_hf. ZeRO-1/2 and pipeline files hold {"param": tensor, "cat_dim": 0};
    ZeRO-3 files hold the tensor flattened (main gives it the model's shape)."""
    from pipeline.models import pipe

    zero = os.path.join(folder, "zero")
    params = {}
    for name in sorted(os.listdir(zero)):
        path = os.path.join(zero, name, "fp32.pt")
        if os.path.isfile(path):  # zero/optimizer_state.pt is no parameter
            value = load_weights_only(path)
            params[name] = value["param"] if isinstance(value, dict) else value
    if not params:
        raise ValueError(f"{zero}: no PARAMETER/fp32.pt files; not a complete universal checkpoint")
    tied = f"tied_modules.{pipe.TIE_KEY}."
    if not any(PIPE_PARAM.fullmatch(name) or name.startswith(tied) for name in params):
        return params
    if config is None:
        raise ValueError(f"{folder} is a pipeline checkpoint: its layers map to HF names with the model config")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in params.items():
        match = PIPE_PARAM.fullmatch(name)
        if name.startswith(tied):  # the tied embedding is pipeline layer 0 (pipe.pipe_layout)
            layers.setdefault(0, {})[name[len(tied):]] = value
        elif match:
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
        else:
            raise ValueError(f"{zero}/{name}: not a pipeline parameter (LAYER.hf.NAME) though others are")
    return pipe.pipe_to_hf(layers, config)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (with args.json and checkpoints/)")
    p.add_argument("--tag", help="checkpoint tag, e.g. global_step100 (default: the one `latest` names)")
    p.add_argument("--output", help="output folder (default: RUN/hf)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--tokenizer", help="the prepared data folder (or its tokenizer.model) the run trained on "
                   "(default: args.json's data, found as the module doc says)")
    p.add_argument("--model", help="the run's --model when it was a config JSON or HF folder that moved "
                   "(default: args.json's model)")
    args = p.parse_args(argv)

    run_args = read_run_args(args.run)
    checkpoint_dir = os.path.join(args.run, "checkpoints")
    tag = args.tag or latest_tag(checkpoint_dir)
    if tag is None or not os.path.isdir(os.path.join(checkpoint_dir, tag)):
        raise FileNotFoundError(f"{checkpoint_dir}: no checkpoint {tag or '(no latest)'}; give one of its "
                                "global_stepN folders with --tag")
    if args.output:
        check_output_folder(args.output)

    data = args.tokenizer or run_path(args.run, run_args, run_args["data"][0], "data", "--tokenizer")
    spec = args.model or run_args["model"]
    if not args.model and spec not in PRESETS:  # a config JSON or HF folder, as the run was given it
        spec = run_path(args.run, run_args, spec, "model", "--model")
    tokenizer = Tokenizer.load(data)
    special = {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    model = build_model(spec, run_args["objective"], tokenizer.vocab_size, special)
    state = checkpoint_state_dict(checkpoint_dir, tag, model.config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    # A universal checkpoint of a ZeRO-3 run holds each parameter flattened: give it the model's shape.
    state = {k: v.view(shapes[k]) if k in shapes and v.shape != shapes[k] and v.numel() == shapes[k].numel() else v
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
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
    if isinstance(run_args, dict) and "init" in run_args:  # finetune and compress start from --init HF_DIR
        raise ValueError(f"{run} is a finetune or compress run (its args.json has init): this tool exports "
                         f"pipeline.pretrain runs; a finetune or compress run already wrote its export to {run}/hf "
                         "when it finished")
    missing = [k for k in ("data", "model", "objective") if not isinstance(run_args, dict) or k not in run_args]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}; this tool exports pipeline.pretrain runs (a finetune or "
                         "compress run's export is its hf/ folder)")
    return run_args


def launch_folder(run: str, output: str | None) -> str | None:
    """The folder the stage was launched from: the run folder's absolute path minus args.json's relative
    `output` (run /home/me/ds/build/demo/pretrain, output build/demo/pretrain -> /home/me/ds). None when
    `output` is absolute or does not end the run folder's path (the run was moved or renamed)."""
    if not output or os.path.isabs(output):
        return None
    run_abs, output = os.path.abspath(run), os.path.normpath(output)
    if output.startswith(os.pardir) or not run_abs.endswith(os.sep + output):
        return None
    return run_abs[:-len(output) - 1] or os.sep


def run_path(run: str, run_args: dict, path: str, key: str, flag: str) -> str:
    """A path from RUN/args.json (key: its name there) that exists from here: as given, from the launch
    folder, or from a folder above the run folder, in that order; else an error naming `flag`."""
    candidates = [path]
    if not os.path.isabs(path):
        base = launch_folder(run, run_args.get("output"))
        candidates += [os.path.join(base, path)] if base else []
        folder = os.path.dirname(os.path.abspath(run))
        while True:
            candidates.append(os.path.join(folder, path))
            if os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    where = "" if os.path.isabs(path) else " (tried from the current folder, the folder the run was launched " \
        "from, and every folder above the run folder)"
    raise FileNotFoundError(f"{os.path.join(run, 'args.json')}: the run's {key} {path!r} is not there{where}; "
                            f"give it with {flag} PATH")


if __name__ == "__main__":
    run_main(main, "export_checkpoint")
