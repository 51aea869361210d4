"""Build the demo corpus from Python's own help topics (`pydoc_data.topics`, ~465 KB of English in every CPython).

    python tools/make_demo_corpus.py build/demo/corpus.jsonl

Each topic's text is cut at paragraph breaks into documents of about MIN_CHARS..MAX_CHARS characters (a few
paragraphs each; a longer single paragraph stays whole), written as jsonl lines {"text": ..., "source": topic}.
Topics go in sorted order, so the file is the same on every run of a given Python version.
"""
from __future__ import annotations

import argparse
import json
import os

MIN_CHARS = 1000
MAX_CHARS = 3000


def documents(text: str) -> list[str]:
    """Group consecutive paragraphs until a document reaches MIN_CHARS; never pass MAX_CHARS by adding one."""
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        if current and size + len(paragraph) > MAX_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= MIN_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < MIN_CHARS // 4 and len(docs[-1]) + size <= MAX_CHARS:
            docs[-1] += "\n\n" + "\n\n".join(current)  # a short tail joins the previous document
        else:
            docs.append("\n\n".join(current))
    return docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="the jsonl file to write (its folder is created)")
    args = parser.parse_args(argv)
    from pydoc_data.topics import topics

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    count = size = 0
    with open(args.output, "w", encoding="utf-8") as f:
        for topic in sorted(topics):
            for doc in documents(topics[topic]):
                f.write(json.dumps({"text": doc, "source": topic}, ensure_ascii=False) + "\n")
                count += 1
                size += len(doc)
    print(f"{args.output}: {count} documents, {size:,} characters from {len(topics)} help topics")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
