"""Plots and a Markdown report from the TensorBoard events of one or more runs.

    python tools/report.py runs/tiny runs/tiny-zero3 --output reports/tiny

writes OUTPUT/loss.png, perplexity.png, lr.png, tokens_per_sec.png (every run overlaid, against
steps) and OUTPUT/report.md with the final metrics of each run (from its summary.json) and the
plots. Needs matplotlib (`pip install matplotlib`, part of the `test` extra).
"""
from __future__ import annotations

import argparse
import json
import math
import os

# (file name, title, TensorBoard tags drawn in it)
PLOTS = [
    ("loss.png", "loss", ["Train/loss", "Eval/loss"]),
    ("perplexity.png", "perplexity", ["Eval/ppl"]),
    ("lr.png", "learning rate", ["Train/lr"]),
    ("tokens_per_sec.png", "tokens/s", ["Train/tokens_per_sec"]),
]
SUMMARY_KEYS = ["steps", "train_loss", "eval_loss", "eval_ppl", "test_loss", "tokens_per_sec", "precision",
                "zero_stage", "pipeline_stages", "world_size"]


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

    names = {}
    for run in args.runs:  # label runs by folder name, disambiguated by the parent when two share one
        base = os.path.basename(os.path.normpath(run))
        names[run] = base if base not in names.values() else os.path.join(os.path.basename(os.path.dirname(run)), base)
    scalars = {names[r]: read_scalars(r) for r in args.runs}
    os.makedirs(args.output, exist_ok=True)
    lines = ["# Training report", "", "## Final metrics", "",
             "| run | " + " | ".join(SUMMARY_KEYS) + " |", "|---" * (len(SUMMARY_KEYS) + 1) + "|"]
    for run in args.runs:
        path = os.path.join(run, "summary.json")
        summary = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
        lines.append(f"| {names[run]} | " + " | ".join(fmt(summary.get(k)) for k in SUMMARY_KEYS) + " |")
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
    main()
