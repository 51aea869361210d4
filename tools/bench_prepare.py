"""Tokens per second of `pipeline.prepare` against the `datasets.map` baseline, whole processes, side by side.

    python tools/bench_prepare.py                                  # 20 MB generated corpus, 2 rounds
    python tools/bench_prepare.py --corpus my.jsonl --tokenizer data/tokenizer.model --rounds 3 --mb 0

Both programs tokenize the same jsonl corpus with the same SentencePiece model. Each run is a fresh process
timed from start to exit (imports, reading, tokenizing, writing: what a user waits for). Runs are interleaved
(ours, baseline, then baseline, ours, ...) so that a slow spell of a shared machine hits both alike, and the
medians are compared. The baseline appends an EOS id to each document and ours does not (the shards keep
documents apart by their offsets), so the ratio is taken on wall time for the same corpus:
ratio = baseline seconds / our seconds, which is ours / baseline in tokens per second for the same work.
Unless --no-check, the ids are also compared: ours (one split, in input order) must equal the baseline's
minus its EOS ids.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASELINE = os.path.normpath(os.path.join(REPO, "..", "shared", "peers", "prepare_baseline.py"))


def make_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """Unique documents of 3-8 consecutive paragraphs of Python's help topics (real English), numbered."""
    from pydoc_data.topics import topics

    paragraphs = [p for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]
    rng = random.Random(seed)
    size = count = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            k = rng.randint(3, 8)
            i = rng.randrange(len(paragraphs) - k)
            # Stripped, as prepare strips: then both programs tokenize the very same text.
            text = (f"Part {count}.\n\n" + "\n\n".join(paragraphs[i:i + k])).strip()
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size += len(line.encode())
            count += 1
    return count


def train_tokenizer(corpus: str, vocab_size: int, path: str) -> None:
    sys.path.insert(0, REPO)
    from pipeline.data.tokenizer import Tokenizer

    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(5000), f)]
    Tokenizer.train(texts, vocab_size).save(os.path.dirname(path))


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", help="jsonl corpus with a 'text' key (default: generate one of --mb megabytes)")
    p.add_argument("--mb", type=float, default=20, help="size of the generated corpus (default: 20)")
    p.add_argument("--tokenizer", help="SentencePiece .model (default: train one of --vocab-size on the corpus)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"baseline script (default: {DEFAULT_BASELINE})")
    p.add_argument("--rounds", type=int, default=2, help="runs of each program (default: 2)")
    p.add_argument("--workers", type=int, default=2, help="our --workers (default: 2)")
    p.add_argument("--num-proc", type=int, default=2, help="the baseline's --num-proc (default: 2)")
    p.add_argument("--workdir", help="where corpus, tokenizer and outputs go (default: a temporary folder)")
    p.add_argument("--no-check", action="store_true", help="skip comparing our ids with the baseline's")
    args = p.parse_args(argv)
    if not os.path.isfile(args.baseline):
        raise SystemExit(f"bench: baseline {args.baseline} not found; pass --baseline PATH")

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-prepare-")
    os.makedirs(workdir, exist_ok=True)
    corpus = args.corpus or os.path.join(workdir, "corpus.jsonl")
    if not args.corpus:
        print(f"bench: writing a {args.mb:g} MB corpus to {corpus}", file=sys.stderr)
        make_corpus(corpus, args.mb)
    tokenizer = args.tokenizer or os.path.join(workdir, "tokenizer.model")
    if not args.tokenizer:
        train_tokenizer(corpus, args.vocab_size, tokenizer)

    ours_out, base_out = os.path.join(workdir, "ours"), os.path.join(workdir, "baseline")
    ours_cmd = [sys.executable, "-m", "pipeline.prepare", "--input", corpus, "--output", ours_out,
                "--tokenizer", tokenizer, "--workers", str(args.workers), "--valid-fraction", "0",
                "--test-fraction", "0", "--overwrite", "--quiet"]
    base_cmd = [sys.executable, args.baseline, "--input", corpus, "--tokenizer", tokenizer, "--output", base_out,
                "--num-proc", str(args.num_proc)]
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    results: dict[str, dict] = {}
    for r in range(args.rounds):
        order = ["ours", "baseline"] if r % 2 == 0 else ["baseline", "ours"]
        for name in order:
            shutil.rmtree(base_out if name == "baseline" else ours_out, ignore_errors=True)
            seconds, stdout = run(ours_cmd if name == "ours" else base_cmd)
            times[name].append(seconds)
            results[name] = json.loads(stdout[stdout.index("{"):])
            print(f"bench: round {r + 1} {name:8s} {seconds:7.2f} s", file=sys.stderr)

    ours_s, base_s = statistics.median(times["ours"]), statistics.median(times["baseline"])
    ours_tokens, base_tokens = results["ours"]["tokens"], results["baseline"]["tokens"]
    report = {
        "corpus": corpus, "corpus_bytes": os.path.getsize(corpus), "documents": results["ours"]["documents"],
        "ours": {"seconds": times["ours"], "median_s": round(ours_s, 3), "tokens": ours_tokens,
                 "tokens_per_sec": round(ours_tokens / ours_s), "workers": args.workers},
        "baseline": {"seconds": times["baseline"], "median_s": round(base_s, 3), "tokens": base_tokens,
                     "tokens_per_sec": round(base_tokens / base_s), "num_proc": args.num_proc,
                     "note": "its tokens include one EOS per document"},
        "speedup": round(base_s / ours_s, 2),
    }
    if not args.no_check:
        report["same_ids"] = same_ids(ours_out, base_out)
    print(json.dumps(report, indent=2))
    print(f"ours {report['ours']['tokens_per_sec']:,} tok/s ({ours_s:.2f} s), baseline "
          f"{report['baseline']['tokens_per_sec']:,} tok/s ({base_s:.2f} s): {report['speedup']}x "
          f"(same work, whole process)", file=sys.stderr)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def same_ids(ours_dir: str, base_dir: str) -> bool | str:
    """Our train split against the baseline's tokens with the EOS after each document removed. (A corpus whose
    documents have whitespace at their ends differs: prepare strips it, the baseline does not.)"""
    import numpy as np

    sys.path.insert(0, REPO)
    from pipeline.data import TokenShards

    shards = TokenShards(ours_dir, "train")
    tokens = np.load(os.path.join(base_dir, "tokens.npy"))
    lengths = np.load(os.path.join(base_dir, "doc_lengths.npy"))
    if len(lengths) != len(shards):
        return f"not comparable: {len(shards)} documents against {len(lengths)} (duplicates or empty documents)"
    keep = np.ones(tokens.size, dtype=bool)
    keep[np.cumsum(lengths) - 1] = False  # the EOS that ends each baseline document
    return bool(np.array_equal(tokens[keep], np.asarray(shards.tokens)))


if __name__ == "__main__":
    raise SystemExit(main())
