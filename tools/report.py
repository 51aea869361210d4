"""Plots and a Markdown report from the TensorBoard events of one or more runs.

    python tools/report.py runs/tiny runs/tiny-zero3 --output reports/tiny

writes OUTPUT/loss.png, perplexity.png, lr.png, tokens_per_sec.png (every run overlaid, against
steps) and OUTPUT/report.md with the final metrics of each run (from its summary.json) and the
plots. The table has the language-model columns, the classifier's valid_/test_ accuracy and macro F1,
and a compress run's *_before/*_after numbers, each column only when some run has it. Runs are labelled
by their path relative to the folder they share (runs x/b/run and y/b/run stay apart).
Needs matplotlib (`pip install matplotlib`, part of the `test` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (file name, title, TensorBoard tags drawn in it)
PLOTS = [
    ("loss.png", "loss", ["Train/loss", "Eval/loss"]),
    ("perplexity.png", "perplexity", ["Eval/ppl"]),
    ("lr.png", "learning rate", ["Train/lr"]),
    ("tokens_per_sec.png", "tokens/s", ["Train/tokens_per_sec"]),
]
SUMMARY_KEYS = ["steps", "train_loss", "eval_loss", "eval_ppl", "test_loss", "tokens_per_sec", "precision",
                "zero_stage", "pipeline_stages", "world_size"]
CLASSIFIER_KEYS = ["valid_accuracy", "valid_macro_f1", "test_accuracy", "test_macro_f1"]
BEFORE_AFTER = re.compile(r"(.+)_(before|after)$")  # pipeline.compress: params, bytes, metrics, latency


def table_keys(summaries: list[dict]) -> list[str]:
    """The final-metrics columns: SUMMARY_KEYS then CLASSIFIER_KEYS, each only when some run has it."""
    return [k for k in SUMMARY_KEYS + CLASSIFIER_KEYS if any(s.get(k) is not None for s in summaries)]


def before_after(summary: dict) -> dict[str, dict[str, object]]:
    """quantity -> {"before": v, "after": v} from a summary's numeric *_before/*_after keys, in their order."""
    out: dict[str, dict[str, object]] = {}
    for key, value in summary.items():
        match = BEFORE_AFTER.fullmatch(key)
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            out.setdefault(match.group(1), {})[match.group(2)] = value
    return out


def run_labels(runs: list[str]) -> dict[str, str]:
    """Each run's path relative to the folder all of them share: build/demo/pretrain and build/demo/finetune
    are `pretrain` and `finetune`, x/b/run and y/b/run stay `x/b/run` and `y/b/run` (distinct folders,
    distinct labels; one run alone is its folder name)."""
    paths = {run: os.path.abspath(run) for run in runs}
    common = os.path.commonpath(list(paths.values()))
    if common in paths.values():  # one run, or one run inside another
        common = os.path.dirname(common)
    return {run: os.path.relpath(path, common) for run, path in paths.items()}


def read_summary(run: str) -> dict:
    path = os.path.join(run, "summary.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a JSON object")
    return summary


def read_scalars(run: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from RUN/tensorboard (all event files, a resumed run's too)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = os.path.join(run, "tensorboard")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: missing; is {run} a run folder?")
    acc = EventAccumulator(folder, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run rewrites steps: keep the last
        out[tag] = sorted(by_step.items())
    return out


def plot(runs: dict[str, dict], tags: list[str], title: str, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name, scalars in runs.items():
        for tag in tags:
            points = scalars.get(tag)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 30 else None,
                        label=f"{name} {tag.split('/')[0].lower()}")
                drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with tensorboard/ and summary.json)")
    p.add_argument("--output", default="report", help="folder for the PNG plots and report.md (default: report)")
    args = p.parse_args(argv)

    names = run_labels(args.runs)
    scalars = {names[r]: read_scalars(r) for r in args.runs}
    summaries = {r: read_summary(r) for r in args.runs}
    keys = table_keys(list(summaries.values()))
    os.makedirs(args.output, exist_ok=True)
    lines = ["# Training report", "", "## Final metrics", "",
             "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for run in args.runs:
        lines.append(f"| {names[run]} | " + " | ".join(fmt(summaries[run].get(k)) for k in keys) + " |")
    compared = {run: before_after(summaries[run]) for run in args.runs if before_after(summaries[run])}
    if compared:
        lines += ["", "## Before and after compression", "", "| run | quantity | before | after |", "|---|---|---|---|"]
        for run, quantities in compared.items():
            lines += [f"| {names[run]} | {q} | {fmt(v.get('before'))} | {fmt(v.get('after'))} |"
                      for q, v in quantities.items()]
    lines += ["", "## Curves", ""]
    for filename, title, tags in PLOTS:
        if plot(scalars, tags, title, os.path.join(args.output, filename)):
            lines += [f"![{title}]({filename})", ""]
    report = os.path.join(args.output, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    from pipeline.cli import run_main

    run_main(main, "report")
