"""Look inside a folder written by `pipeline.prepare`: counts per split, and chosen documents decoded.

    python tools/inspect_data.py build/demo/data                          # counts, tokenizer, cleaning
    python tools/inspect_data.py build/demo/data --split valid --show 0 5 # decode documents 0 and 5 of valid
    python tools/inspect_data.py build/demo/data --show -1 --ids          # the last train document, with its ids
    python tools/inspect_data.py build/demo/data --verify                 # read everything: checksums, id range

The folder is opened as the stages open it (pipeline/data/prepared.py: manifest, tokenizer and shards checked
against each other, cheaply); --verify also reads every byte: each shard file's sha256 against manifest.json
and every token id against the vocabulary size. Documents are decoded with the folder's own tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.prepared import SPLITS, open_prepared, verify_contents  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a folder written by pipeline.prepare")
    p.add_argument("--split", default="train", choices=SPLITS, help="the split --show reads (default: train)")
    p.add_argument("--show", type=int, nargs="*", default=[], metavar="I",
                   help="decode these documents of --split (negative counts from the end)")
    p.add_argument("--ids", action="store_true", help="also print the token ids of shown documents")
    p.add_argument("--max-chars", type=int, default=2000, help="cut shown documents after this many characters "
                                                                 "(default: 2000; 0 = no limit)")
    p.add_argument("--verify", action="store_true", help="read every byte: each shard file's sha256 against "
                                                         "manifest.json, and every token id against the vocabulary")
    args = p.parse_args(argv)

    try:
        data = open_prepared(args.data, flag="data folder")
        if args.verify:
            verify_contents(data)
        summary_path = os.path.join(args.data, "summary.json")
        summary = json.load(open(summary_path, encoding="utf-8")) if os.path.exists(summary_path) else {}
    except (OSError, ValueError) as e:
        print(f"inspect_data: error: {e}", file=sys.stderr)
        return 2
    manifest, shards = data.manifest, data.splits

    tok = manifest["tokenizer"]
    print(f"{args.data}: format {manifest['format_version']}, dtype {manifest['dtype']}")
    print(f"tokenizer: {tok['kind']} {tok['model_type']}, {tok['vocab_size']} pieces, sha256 {tok['sha256'][:16]}..., "
          f"special ids {tok['special_ids']}")
    print(f"{'split':6s} {'documents':>10s} {'tokens':>12s} {'tokens/doc':>10s}")
    for split, s in shards.items():
        print(f"{split:6s} {len(s):10,d} {s.num_tokens:12,d} {s.num_tokens / max(len(s), 1):10.1f}")
    if args.verify:
        print("verified: every shard file's sha256 matches manifest.json and every id is below the vocabulary size")
    if summary:
        dropped = {k: summary[k] for k in ("dropped_empty", "dropped_short", "dropped_duplicate", "bad_lines")
                   if k in summary}
        print(f"read {summary.get('read_documents', '?')} documents; dropped {dropped}; "
              f"{summary.get('tokens_per_sec', '?'):,} tokens/s over {summary.get('seconds', '?')} s")
    print("inputs: " + ", ".join(f"{i['path']} ({i['bytes']:,} bytes)" for i in manifest["inputs"]))

    if args.show:
        tokenizer = data.tokenizer
        split = shards[args.split]
        for i in args.show:
            try:
                ids = split[i]
            except IndexError as e:
                print(f"inspect_data: error: {e}", file=sys.stderr)
                return 2
            text = tokenizer.decode(ids)
            print(f"\n--- {args.split}[{i}]: {len(ids)} tokens, {len(text)} characters ---")
            if args.max_chars and len(text) > args.max_chars:
                text = text[:args.max_chars] + " [...]"
            print(text)
            if args.ids:
                print(f"ids: {ids.tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
