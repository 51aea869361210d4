"""Predictions from an exported model (`RUN/hf/`): one process, plain transformers, CPU or GPU, no DeepSpeed.

    python -m pipeline.predict --model runs/sentiment/hf --input reviews.jsonl > predictions.jsonl
    echo "The soup was cold and the waiter rude." | python -m pipeline.predict --model runs/sentiment/hf
    python -m pipeline.predict --model runs/tiny/hf --input prompts.txt --max-new-tokens 40 --output out.jsonl

Input: a jsonl/csv/parquet file or HF dataset folder (the text is `--text-key`), a .txt file (one text
per line), or `-` for stdin (one text per line; a line that is a JSON object is read as a record).
Output: one JSON object per input, in order, to stdout or `--output` (written under a temporary name and
renamed once every input is predicted: a failure leaves no partial file):
- a classifier (`*ForSequenceClassification`): {"text", "label", "score", "probs": {label: p}}; texts are
  tokenized and truncated exactly as `pipeline.finetune` did (the tokenizer's model_max_length);
- a causal LM (`*ForCausalLM`): {"prompt", "generated"}; greedy by default, sampling with
  `--temperature` > 0 (and `--top-p`); the prompt is formatted as `pipeline.finetune --task sft` did
  (the tokenizer's chat template when it has one, else the plain prompt; `--template` overrides).
A text that is empty after stripping (or that the tokenizer turns into no ids) is not sent to the model: its
row has label/score/probs (or generated) null and "skipped": "empty text". Texts longer than the model takes
are truncated (a classifier keeps the start, a prompt its end). Both are counted on stderr.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import arg, parse, run_main


@dataclass
class Args:
    model: str = arg(help="an exported model folder (RUN/hf, or a compress run's RUN/compressed): a sequence "
                          "classifier or a causal LM, with its tokenizer", required=True, metavar="HF_DIR")
    input: str = arg("-", help="texts to predict: jsonl/csv/parquet/HF dataset (field --text-key), .txt (a text per "
                               "line), or - for stdin", metavar="FILE")
    output: str = arg(help="write the predictions (jsonl) here instead of stdout", metavar="FILE")
    text_key: str = arg("text", help="the field holding the text (or the prompt) in record inputs")
    batch_size: int = arg(16, help="texts per forward pass")
    max_new_tokens: int = arg(64, help="causal LM: tokens to generate per prompt")
    temperature: float = arg(0.0, help="causal LM: 0 is greedy decoding; above 0 samples at this temperature")
    top_p: float = arg(1.0, help="causal LM: nucleus sampling share (with --temperature > 0)")
    template: str = arg("auto", help="causal LM: prompt format, as in finetuning (auto: chat when the tokenizer has "
                                     "a chat template)", choices=["auto", "plain", "chat"])
    device: str = arg("auto", help="cpu, cuda, or auto (cuda when available)")
    seed: int = arg(1234, help="seed for sampling")


def read_inputs(path: str, text_key: str) -> Iterator[str]:
    """The texts of --input, in order."""
    from pipeline.data.readers import InputError, detect_format, read_documents

    if path != "-":
        fmt = detect_format(path)
        for doc in read_documents([path], text_key=text_key, fmt=fmt, txt_mode="line"):
            # A .txt line comes with its line break ("\n" or Windows' "\r\n"): not part of the text, and a
            # token of its own to the model (a decoder classifier would pool it instead of the text's last token).
            yield doc.text.rstrip("\r\n") if fmt == "txt" else doc.text
        return
    for lineno, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                if not isinstance(record.get(text_key), str):
                    raise InputError("<stdin>", lineno, f"no string under key {text_key!r}; choose it with --text-key")
                yield record[text_key]
                continue
        yield line.rstrip("\r\n")


def batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load(path: str, device: str):
    """(model, tokenizer, kind) with kind "classify" or "generate", from the architecture in config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {path}: no config.json; expected an exported model folder such as RUN/hf")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    arch = (config.architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        cls, kind = AutoModelForSequenceClassification, "classify"
    elif arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        cls, kind = AutoModelForCausalLM, "generate"
    else:
        raise ValueError(f"--model {path}: architecture {arch or '(none)'} is neither a sequence classifier nor a "
                         "causal LM")
    from pipeline.compression.storage import META, load_compressed

    if os.path.isfile(os.path.join(path, META)):  # a compress run's compressed/: integer weights, no model.safetensors
        # The int8 kernel is a CPU one; on a GPU the weights are dequantized (as compress evaluates there).
        model = load_compressed(path, runtime="auto" if device == "cpu" else "float").to(device).eval()
    else:
        dtype = torch.float32 if device == "cpu" else "auto"
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kind


def max_length_of(model, tokenizer) -> int:
    from pipeline.models import max_positions

    limit = max_positions(model.config) or 1 << 30
    return min(limit, tokenizer.model_max_length) if tokenizer.model_max_length else limit


SKIPPED = "empty text"  # the "skipped" value of a row whose text was not sent to the model


def kept(texts: list[str], ids: list[list[int]]) -> list[int]:
    """Indices of the texts to predict: not empty after stripping, and with token ids (an empty text would
    crash the model's forward, or get a prediction that means nothing)."""
    return [i for i, (text, seq) in enumerate(zip(texts, ids)) if text.strip() and seq]


def classify(model, tokenizer, texts: list[str]) -> tuple[list[dict], int]:
    """(one row per text, how many texts were truncated to the model's maximum)."""
    import torch

    from pipeline.data.tasks import encode_texts, pad_batch

    ids, truncated = encode_texts(tokenizer, texts, max_length_of(model, tokenizer))
    out = [{"text": t, "label": None, "score": None, "probs": None, "skipped": SKIPPED} for t in texts]
    keep = kept(texts, ids)
    if not keep:
        return out, 0
    batch = {k: torch.from_numpy(v).to(model.device)
             for k, v in pad_batch([ids[i] for i in keep], tokenizer.pad_token_id).items()}
    with torch.no_grad():
        probs = model(**batch).logits.float().softmax(-1).cpu()
    names = [model.config.id2label[i] for i in range(probs.shape[-1])]
    for i, p in zip(keep, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        out[i] = {"text": texts[i], "label": names[best], "score": p[best], "probs": dict(zip(names, p))}
    return out, truncated


def prompt_room(model, tokenizer, args: Args) -> int:
    """Prompt tokens that fit with --max-new-tokens in the model's maximum."""
    return max(1, max_length_of(model, tokenizer) - args.max_new_tokens)


def generate(model, tokenizer, prompts: list[str], args: Args) -> tuple[list[dict], int]:
    """(one row per prompt, how many prompts were cut to prompt_room tokens)."""
    import torch

    from pipeline.data.tasks import pad_batch, prompt_ids, resolve_template

    template = resolve_template(tokenizer, args.template)
    room = prompt_room(model, tokenizer, args)
    ids = [prompt_ids(tokenizer, p, template) for p in prompts]
    out = [{"prompt": p, "generated": None, "skipped": SKIPPED} for p in prompts]
    keep = kept(prompts, ids)
    if not keep:
        return out, 0
    truncated = sum(len(ids[i]) > room for i in keep)
    batch = {k: torch.from_numpy(v).to(model.device)  # keep the end of an over-long prompt; left: new tokens follow
             for k, v in pad_batch([ids[i][-room:] for i in keep], tokenizer.pad_token_id, left=True).items()}
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} if args.temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, **sampling)
    new = generated[:, batch["input_ids"].shape[1]:]
    for i, n in zip(keep, new):
        out[i] = {"prompt": prompts[i], "generated": tokenizer.decode(n, skip_special_tokens=True)}
    return out, truncated


def check_output_file(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--output {path}: is a folder; give a file name for the predictions (jsonl)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output {path}: the folder {parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = parse(Args, argv, __doc__)
    if args.batch_size <= 0 or args.max_new_tokens <= 0:
        raise ValueError("--batch-size and --max-new-tokens must be positive")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
    from pipeline.data.readers import dataset_split

    if args.input != "-" and not os.path.exists(dataset_split(args.input)[0]):  # DIR:SPLIT of a DatasetDict folder
        raise FileNotFoundError(f"--input {args.input}: no such file")
    if args.output:
        check_output_file(args.output)
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(args.seed)
    model, tokenizer, kind = load(args.model, device)
    # --output is written under a temporary name and renamed at the end: a failure half-way (a bad line
    # further on) leaves no file that looks like the complete predictions.
    tmp = f"{args.output}.tmp" if args.output else None
    out = open(tmp, "w", encoding="utf-8") if tmp else sys.stdout
    count = skipped = truncated = 0
    try:
        for texts in batches(read_inputs(args.input, args.text_key), args.batch_size):
            results, cut = (classify(model, tokenizer, texts) if kind == "classify"
                            else generate(model, tokenizer, texts, args))
            for r in results:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
            out.flush()
            count += len(results)
            skipped += sum("skipped" in r for r in results)
            truncated += cut
        if tmp:
            out.close()
            os.replace(tmp, args.output)
    finally:
        if tmp and os.path.exists(tmp):
            out.close()
            os.remove(tmp)
    print(f"predict: {count - skipped} predictions ({kind})" + (f" -> {args.output}" if args.output else ""),
          file=sys.stderr)
    if skipped:
        print(f"predict: {skipped} empty texts skipped (rows with \"skipped\": \"{SKIPPED}\")", file=sys.stderr)
    if truncated:
        limit = max_length_of(model, tokenizer) if kind == "classify" else prompt_room(model, tokenizer, args)
        print(f"predict: {truncated} texts truncated to {limit} tokens", file=sys.stderr)
    return count


if __name__ == "__main__":
    run_main(main, "predict")
