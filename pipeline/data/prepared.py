"""A folder written by `pipeline.prepare`, opened and checked as a whole before a stage trains on it.

    data = open_prepared("build/demo/data")         # manifest.json, the tokenizer and the three splits
    data.tokenizer, data.splits["train"][0], data.manifest["dtype"]
    verify_contents(data)                           # the full scan (tools/inspect_data.py --verify)

`open_prepared` reads a constant amount, whatever the size of the shards, and checks that:
- manifest.json is JSON of this format version with the keys the stages read;
- the tokenizer is the one the shards were written with (`Tokenizer.load` compares its sha256 and vocabulary
  size with the manifest's), and the manifest's token width fits its vocabulary;
- each split's .idx and .bin are consistent (`TokenShards`: header, sizes, offsets);
- each split's documents, tokens and token width are the manifest's;
- each shard file's size and `sample_sha256` (16 blocks of 64 KiB) are what prepare recorded, so a replaced,
  truncated or partly overwritten file is caught (folders prepared before fingerprints were recorded lack them);
- the ids in the first and last SAMPLE_TOKENS tokens of each split are below the vocabulary size.
`verify_contents` reads everything: every file's full sha256 and every id's range.

A model folder that carries its own tokenizer (a run's hf/) must give the same ids: `check_model_tokenizer`.
Every error names the file and says what to do; all are ValueError (FileNotFoundError for a missing folder),
which the stages' `__main__` prints as one line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from pipeline.data.shards import REPAIR, TokenShards, file_sha256, sample_sha256, token_dtype
from pipeline.data.tokenizer import HFTokenizer, Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "valid", "test")
SAMPLE_TOKENS = 1 << 16  # ids checked at open at each end of a split
SCAN_TOKENS = 1 << 24    # verify_contents reads ids this many at a time (32-64 MiB)


class DataError(ValueError):
    """A prepared folder that is damaged, or inconsistent with its manifest, its tokenizer or a model."""


@dataclass
class PreparedData:
    directory: str
    manifest: dict
    tokenizer: Tokenizer
    splits: dict[str, TokenShards]


def read_manifest(directory: str, flag: str = "--data") -> dict:
    """manifest.json of a prepared folder, checked for the keys the stages read."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        what = f"no {MANIFEST}" if os.path.isdir(directory) else "no such folder"
        raise FileNotFoundError(f"{flag} {directory}: {what}; prepare it first with "
                                f"`python -m pipeline.prepare --input ... --output {directory}`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); {REPAIR}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; {REPAIR}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: a JSON {type(manifest).__name__}, expected an object; {REPAIR}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
                        f"{REPAIR}")
    required = [("tokenizer", "sha256"), ("tokenizer", "vocab_size"), ("dtype",)]
    required += [("splits", split, key) for split in SPLITS for key in ("documents", "tokens")]
    for keys in required:
        value = manifest
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            raise DataError(f"{path}: no {'.'.join(keys)}; {REPAIR}")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {manifest['dtype']!r}, expected uint16 or uint32; {REPAIR}")
    return manifest


def open_prepared(directory: str, flag: str = "--data") -> PreparedData:
    """Open a prepared folder and check it (see the module doc); `flag` names it in errors."""
    manifest = read_manifest(directory, flag)
    path = os.path.join(directory, MANIFEST)
    tokenizer = Tokenizer.load(directory)  # a TokenizerError (a ValueError) when it is not the recorded one
    vocab = tokenizer.vocab_size
    expected = np.dtype(token_dtype(vocab)).name
    if manifest["dtype"] != expected:
        raise DataError(f"{path}: dtype {manifest['dtype']}, but ids of a {vocab}-piece tokenizer are stored as "
                        f"{expected}; {REPAIR}")
    files = manifest.get("files") or {}
    splits = {}
    for split in SPLITS:
        shards = TokenShards(directory, split)
        recorded = manifest["splits"][split]
        if shards.dtype.name != manifest["dtype"]:
            raise DataError(f"{shards.idx_path}: {shards.dtype.name} token ids, but {path} says {manifest['dtype']}: "
                            f"the shards and the manifest are from different runs; {REPAIR}")
        if (len(shards), shards.num_tokens) != (recorded["documents"], recorded["tokens"]):
            raise DataError(f"{shards.idx_path}: {len(shards)} documents and {shards.num_tokens} tokens, but {path} "
                            f"records {recorded['documents']} and {recorded['tokens']}: the shards and the manifest "
                            f"are from different runs; {REPAIR}")
        for file in (shards.idx_path, shards.bin_path):
            entry = files.get(os.path.basename(file))
            if entry is not None and (os.path.getsize(file) != entry.get("bytes")
                                      or sample_sha256(file) != entry.get("sample_sha256")):
                raise DataError(f"{file}: not the file pipeline.prepare wrote (its size or sampled sha256 differs from "
                                f"{path}): it was damaged or replaced; {REPAIR}")
        _check_ids(shards, 0, min(SAMPLE_TOKENS, shards.num_tokens), vocab)
        _check_ids(shards, max(0, shards.num_tokens - SAMPLE_TOKENS), shards.num_tokens, vocab)
        splits[split] = shards
    return PreparedData(directory, manifest, tokenizer, splits)


def verify_contents(data: PreparedData) -> None:
    """Read everything: each shard file's full sha256 against manifest.json, and every id against the vocabulary."""
    files = data.manifest.get("files")
    path = os.path.join(data.directory, MANIFEST)
    if not files:
        raise DataError(f"{path}: no file checksums (prepared before they were recorded); {REPAIR} to record them")
    for shards in data.splits.values():
        for file in (shards.idx_path, shards.bin_path):
            entry = files.get(os.path.basename(file)) or {}
            if file_sha256(file) != entry.get("sha256"):
                raise DataError(f"{file}: its sha256 differs from the one {path} records: the file is damaged or was "
                                f"replaced; {REPAIR}")
        for start in range(0, shards.num_tokens, SCAN_TOKENS):
            _check_ids(shards, start, min(start + SCAN_TOKENS, shards.num_tokens), data.tokenizer.vocab_size)


def _check_ids(shards: TokenShards, start: int, end: int, vocab_size: int) -> None:
    if end <= start:
        return
    ids = np.asarray(shards.tokens[start:end])
    high = int(ids.max())
    if high >= vocab_size:
        position = start + int(np.argmax(ids >= vocab_size))
        raise DataError(f"{shards.bin_path}: token id {int(ids[position - start])} at position {position} is not "
                        f"below the tokenizer's vocabulary size {vocab_size}: the shard was written with another "
                        f"tokenizer or is damaged; {REPAIR}")


def check_model_tokenizer(model_dir: str, tokenizer: Tokenizer, flag: str, source: str, remedy: str) -> None:
    """A model folder that carries a tokenizer (a run's hf/) must map pieces to the ids of `tokenizer` (described
    by `source` in the error, e.g. "the tokenizer of --data DIR"): a model fed other ids reads noise, without
    any error. A folder without a tokenizer is not checked (its vocabulary size is, by load_model_config)."""
    names = set(os.listdir(model_dir))
    if not names & {"tokenizer.json", "tokenizer_config.json"}:
        return
    own = HFTokenizer(model_dir).vocabulary()
    theirs = tokenizer.vocabulary()
    if own != theirs:
        moved = sum(1 for piece, i in theirs.items() if own.get(piece) != i)
        raise DataError(f"{flag} {model_dir}: its tokenizer is not {source} ({len(own)} vs {len(theirs)} pieces; "
                        f"{moved} of the latter have another id or none in the model's): the model would read other "
                        f"pieces under the same ids; {remedy}")
