"""Prepare: raw text -> a tokenizer and memory-mapped token shards that the training stages read.

    python -m pipeline.prepare --input corpus.jsonl --output data --vocab-size 8000
    python -m pipeline.prepare --input 'raw/**/*.txt' more.parquet --output data --tokenizer old_data --workers 4
    python -m pipeline.prepare --input corpus.csv --text-key body --output data --vocab-size 8000 --dry-run

This stage is one process on one machine (no launcher, no torch, no DeepSpeed); `--workers` processes
tokenize in parallel. Run it once and point the training stages at DIR, on one node or many.

What it does, streaming (memory does not grow with the corpus, apart from 16-32 bytes a document for the
duplicate filter; the tokenizer trains on a sample of bounded size):
  1. reads documents from jsonl, txt, csv/tsv, parquet or HF `save_to_disk` folders (pipeline/data/readers.py);
  2. cleans: strips the ends of each document (and applies NFKC with --nfkc), drops empty documents,
     documents shorter than --min-chars and exact duplicates (by a 64-bit keyed blake2b of the text);
  3. splits: each document goes to valid, test or train by the same hash keyed with --seed, so a document's
     split depends only on its text and the seed (not on the order, the files or the worker count);
  4. trains a SentencePiece tokenizer on a deterministic sample of the train documents' lines (at most
     --tokenizer-sample-mb; a first pass over the corpus), or loads --tokenizer;
  5. tokenizes in batches and writes the shards. decode(ids) of a document is exactly its cleaned text.

DIR gets (all written in a hidden sibling folder that is renamed to DIR at the very end, so an interrupted run
never leaves a folder that looks complete; an existing DIR is replaced only with --overwrite):
  tokenizer.model            the SentencePiece model (tokenizer/ instead for an HF tokenizer)
  {train,valid,test}.bin     token ids of the documents back to back (uint16 when the vocabulary fits, else uint32)
  {train,valid,test}.idx     header and document offsets (format in pipeline/data/shards.py)
  manifest.json              format version, tokenizer (sha256, vocab size, special ids), dtype, counts per split,
                             the size, sha256 and sampled sha256 of each shard file (checked by the stages that open
                             the folder: pipeline/data/prepared.py), input files (size, sha256), the arguments that
                             shape the data (not --output, --workers, --overwrite, --dry-run, --quiet)
  summary.json               documents, tokens, tokens_per_sec (of the pass that reads, cleans, tokenizes and
                             writes), seconds (the whole run), what cleaning dropped, bad_lines, counts per split,
                             workers
The shards, the tokenizer and manifest.json are byte-identical for any --workers; summary.json records the
timings and the worker count. A run killed before the end (kill -9, power loss) leaves its hidden temporary
folder behind; the next run writing the same DIR removes it.

Bad input stops the run with `prepare: error: FILE:LINE: what was wrong; what was expected`, exit status 2,
and no output folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import tempfile
import time
import unicodedata
from array import array
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import __version__, cli
from pipeline.data.prepared import FORMAT_VERSION
from pipeline.data.readers import (
    TXT_MODES,
    BadLines,
    Document,
    InputError,
    detect_format,
    expand_inputs,
    file_fingerprint,
    read_documents,
)
from pipeline.data.shards import VERSION as SHARD_VERSION
from pipeline.data.shards import ShardWriter, token_dtype
from pipeline.data.tokenizer import (
    MIN_VOCAB,
    MODEL_TYPES,
    SAMPLE_BYTES,
    SP_MODEL_FILE,
    Tokenizer,
    TokenizerError,
    describe,
)
from pipeline.files import publish_folder, write_json

SPLITS = ("train", "valid", "test")
RUN_ONLY_ARGS = ("output", "workers", "overwrite", "dry_run", "quiet")  # how a run went, not what DIR holds
OWNER_FILE = ".owner"      # in the temporary folder: the host and pid writing it (see _remove_stale_temporaries)
BATCH_DOCS = 1024          # a batch is this many documents or BATCH_CHARS characters, whichever comes first:
BATCH_CHARS = 1 << 18      # big enough that per-batch costs vanish, small enough to keep memory flat


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class PrepareArgs:
    """Arguments of the prepare stage; each field's help is its documentation (`--help` prints it)."""

    input: list[str] = field(default_factory=list, metadata={
        "required": True, "metavar": "FILE", "help": "Input files, folders (HF datasets from save_to_disk) or globs ('raw/**/*.jsonl', quote them). "
                "Formats by extension: .jsonl/.ndjson/.json, .txt/.text/.md, .csv, .tsv, .parquet (.gz allowed "
                "for the text formats)."})
    output: str = field(default="", metadata={
        "required": True, "metavar": "DIR", "help": "Output folder for the tokenizer, shards and manifests."})
    vocab_size: int | None = field(default=None, metadata={
        "metavar": "N", "help": "Train a SentencePiece tokenizer with this many pieces (at least 263: 256 byte pieces, 6 special "
                "pieces and one learned). Give this or --tokenizer."})
    tokenizer: str | None = field(default=None, metadata={
        "metavar": "PATH", "help": "Use an existing tokenizer instead of training one: a prepared data folder, a SentencePiece "
                ".model file or a HuggingFace tokenizer folder (local, no remote code)."})
    model_type: str = field(default="bpe", metadata={
        "help": "SentencePiece algorithm when training.", "choices": MODEL_TYPES})
    text_key: str = field(default="text", metadata={
        "metavar": "KEY", "help": "The JSON key (jsonl) or column (csv, tsv, parquet, HF dataset) holding the text."})
    format: str = field(default="auto", metadata={
        "help": "Read every input as this format instead of going by extension.",
        "choices": ("auto", "jsonl", "txt", "csv", "tsv", "parquet", "hf")})
    txt_mode: str = field(default="block", metadata={
        "help": "What a document is in .txt input: 'block' = lines separated by blank lines, 'line' = each "
                "non-blank line, 'file' = the whole file.", "choices": TXT_MODES})
    min_chars: int = field(default=1, metadata={
        "metavar": "N", "help": "Drop documents shorter than this many characters after stripping (counted as dropped_short; "
                "empty ones count as dropped_empty)."})
    nfkc: bool = field(default=False, metadata={
        "help": "Apply Unicode NFKC normalisation to each document before cleaning (otherwise the only change to "
                "the text is stripping its ends)."})
    valid_fraction: float = field(default=0.05, metadata={"metavar": "F", "help": "Fraction of documents for the valid split."})
    test_fraction: float = field(default=0.05, metadata={"metavar": "F", "help": "Fraction of documents for the test split."})
    seed: int = field(default=1234, metadata={
        "metavar": "S", "help": "Seed of the split: the same text and seed always go to the same split."})
    workers: int = field(default_factory=_usable_cpus, metadata={
        "metavar": "N", "help": "Processes that tokenize in parallel (default: the usable CPUs). 1 tokenizes in this process. "
                "The output does not depend on it."})
    tokenizer_sample_mb: float = field(default=SAMPLE_BYTES / 2**20, metadata={
        "metavar": "MB", "help": "Train the tokenizer on at most this many megabytes of the train split: a deterministic "
                "sample of its lines (those whose hash falls under a threshold; each line counts its UTF-8 bytes "
                "plus 64), the same in every run. It bounds the memory and time training takes: about 3x this for "
                "BPE, 20x for unigram, whatever the size of the corpus."})
    skip_bad_lines: bool = field(default=False, metadata={
        "help": "Skip and count (as bad_lines in summary.json) jsonl/csv records that are malformed, not UTF-8, "
                "or lack a string under --text-key, instead of stopping at the first."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing output folder (only one written by this stage, or an empty one)."})
    dry_run: bool = field(default=False, metadata={
        "help": "Read and clean everything, print the counts per split and write nothing."})
    quiet: bool = field(default=False, metadata={"help": "No progress bar."})


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(PrepareArgs, __doc__, prog="python -m pipeline.prepare")


def parse_args(argv: list[str] | None = None) -> PrepareArgs:
    parser = build_parser()
    args = cli.to_dataclass(PrepareArgs, parser.parse_args(argv))
    if (args.vocab_size is None) == (args.tokenizer is None):
        parser.error("give exactly one of --vocab-size N (train a tokenizer) and --tokenizer PATH (use one)")
    if args.vocab_size is not None and args.vocab_size < MIN_VOCAB:
        parser.error(f"--vocab-size {args.vocab_size} is too small: byte fallback takes 256 pieces and the special "
                     f"pieces 6, so it must be at least {MIN_VOCAB}")
    if not (0 <= args.valid_fraction < 1 and 0 <= args.test_fraction < 1
            and args.valid_fraction + args.test_fraction < 1):
        parser.error(f"--valid-fraction {args.valid_fraction} and --test-fraction {args.test_fraction} must be in "
                     "[0, 1) and leave room for train (their sum < 1)")
    if args.workers < 1 or args.min_chars < 0 or not args.tokenizer_sample_mb > 0:
        parser.error("--workers must be at least 1, --min-chars at least 0 and --tokenizer-sample-mb above 0")
    return args


class PrepareError(Exception):
    """A run that cannot go on, with what to do about it."""


class HashSet:
    """A set of 64-bit hashes: an open-addressing table (linear probing) in an array of uint64, where 0 marks an
    empty slot, kept between 1/4 and 1/2 full. 16-32 bytes a hash, where a Python set of ints takes about 90.
    The hashes are uniform already, so their low bits are the slot."""

    def __init__(self) -> None:
        self.table = array("Q", bytes(8 * 1024))
        self.size = 0

    def add(self, h: int) -> bool:
        """Add `h`; False when it was there already."""
        h = h or 1  # 0 marks an empty slot: the hash 0 is taken as 1, a collision as unlikely as any other
        if not _place(self.table, h):
            return False
        self.size += 1
        if 2 * self.size > len(self.table):  # half full: double the table, and place every hash again
            old, self.table = self.table, array("Q", bytes(16 * len(self.table)))
            for kept in old:
                if kept:
                    _place(self.table, kept)
        return True


def _place(table: array, h: int) -> bool:
    """Put `h` in the first free slot from its own (linear probing), unless it is found on the way: then False."""
    mask = len(table) - 1
    i = h & mask
    while (slot := table[i]) != h:
        if not slot:
            table[i] = h
            return True
        i = (i + 1) & mask
    return False


class Cleaner:
    """Strips, filters, deduplicates and assigns a split to each document; counts what it drops.

    One keyed 64-bit blake2b of the cleaned text serves both ends: equal texts have equal hashes (duplicates),
    and hash / 2**64 is a uniform number in [0, 1) that picks the split, the same for a text wherever it appears.
    64 bits keep the duplicate set small (`HashSet`); a false duplicate needs a collision (about n**2 / 2**65:
    3e-6 for 10M documents).
    """

    def __init__(self, min_chars: int, nfkc: bool, seed: int, valid_fraction: float, test_fraction: float):
        self.min_chars, self.nfkc = min_chars, nfkc
        self.key = str(seed).encode()
        self.valid_below = int(valid_fraction * 2**64)
        self.test_below = self.valid_below + int(test_fraction * 2**64)
        self.seen = HashSet()
        self.read = self.dropped_empty = self.dropped_short = self.dropped_duplicate = 0

    def __call__(self, doc: Document) -> tuple[str, int] | None:
        """(cleaned text, split index into SPLITS), or None when the document is dropped."""
        self.read += 1
        text = unicodedata.normalize("NFKC", doc.text) if self.nfkc else doc.text
        text = text.strip()
        if not text:
            self.dropped_empty += 1
            return None
        if len(text) < self.min_chars:
            self.dropped_short += 1
            return None
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a "\ud800" escape in JSON
            raise InputError(doc.source, doc.line, f"text with an unpaired surrogate ({text[e.start]!r}); expected "
                                                   "valid Unicode") from None
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.key).digest(), "little")
        if not self.seen.add(h):
            self.dropped_duplicate += 1
            return None
        return text, (1 if h < self.valid_below else 2 if h < self.test_below else 0)

    def counts(self) -> dict:
        return {"read_documents": self.read, "dropped_empty": self.dropped_empty,
                "dropped_short": self.dropped_short, "dropped_duplicate": self.dropped_duplicate}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = prepare(args)
    except (InputError, TokenizerError, PrepareError, OSError) as e:  # OSError: disk full, permissions, ...
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare: interrupted; no output folder was written", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    return 0


def prepare(args: PrepareArgs) -> dict:
    """Run the stage; returns summary.json's content (or the dry run's report)."""
    start = time.perf_counter()
    paths = expand_inputs(args.input)
    formats = [detect_format(p, args.format) for p in paths]  # unknown formats fail now, before any work
    output = os.path.abspath(args.output)
    _check_output(output, args.overwrite)
    if args.dry_run:
        return _dry_run(args, paths)
    tmp = _make_temporary_sibling(output)
    try:
        inputs = [{**file_fingerprint(p), "format": fmt} for p, fmt in zip(paths, formats)]
        tokenizer, train_seconds = _get_tokenizer(args, paths)
        tokenizer.save(tmp)
        tokenize_start = time.perf_counter()
        counts = _tokenize_corpus(args, paths, tokenizer, tmp)
        tokenize_seconds = time.perf_counter() - tokenize_start
        seconds = time.perf_counter() - start
        tokens = sum(s["tokens"] for s in counts["splits"].values())
        summary = {
            "documents": sum(s["documents"] for s in counts["splits"].values()),
            "tokens": tokens,
            "tokens_per_sec": round(tokens / max(tokenize_seconds, 1e-9)),  # of the tokenizing pass
            "seconds": round(seconds, 3),
            "tokenize_seconds": round(tokenize_seconds, 3),
            "tokenizer_train_seconds": round(train_seconds, 3),
            **counts["cleaning"],
            "bad_lines": counts["bad_lines"],
            "splits": counts["splits"],
            "workers": args.workers,
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "shard_format": {"idx_version": SHARD_VERSION, "dtype": counts["dtype"]},
            "dtype": counts["dtype"],
            "tokenizer": describe(tokenizer),
            "splits": counts["splits"],
            "files": counts["files"],
            "cleaning": {"strip": True, "nfkc": args.nfkc, "min_chars": args.min_chars, "dedup": "exact, blake2b-64",
                         **counts["cleaning"], "bad_lines": counts["bad_lines"]},
            "split": {"method": "blake2b-64 of the cleaned text keyed by the seed", "seed": args.seed,
                      "valid_fraction": args.valid_fraction, "test_fraction": args.test_fraction},
            "inputs": inputs,
            # Not the run-only arguments: the manifest is the same for any --workers (summary.json has them).
            "args": {k: v for k, v in dataclasses.asdict(args).items() if k not in RUN_ONLY_ARGS},
            "created_by": {"pipeline": __version__, "python": sys.version.split()[0]},
        }
        write_json(os.path.join(tmp, "manifest.json"), manifest)
        write_json(os.path.join(tmp, "summary.json"), summary)  # last: its presence marks a finished folder
        os.remove(os.path.join(tmp, OWNER_FILE))
        publish_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_output(output: str, overwrite: bool) -> None:
    if os.path.lexists(output):
        if not os.path.isdir(output):
            raise PrepareError(f"{output}: exists and is not a folder; choose another --output")
        if not overwrite:
            raise PrepareError(f"{output}: already exists; pass --overwrite to replace it, or choose another --output")
        contents = os.listdir(output)
        if contents and "manifest.json" not in contents:
            # --overwrite replaces the folder: never delete one this stage did not write (a typo'd --output).
            raise PrepareError(f"{output}: exists and was not written by pipeline.prepare (no manifest.json); "
                               "refusing to replace it, remove it yourself or choose another --output")


def _make_temporary_sibling(output: str) -> str:
    # A sibling, so the final rename stays on one filesystem; hidden and unique, so it never looks like DIR.
    parent, name = os.path.split(output)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_stale_temporaries(output)
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
        write_json(os.path.join(tmp, OWNER_FILE), _owner(output))
        return tmp
    except OSError as e:
        raise PrepareError(f"{output}: cannot write the output folder there ({e.strerror or e})") from None


def _owner(output: str) -> dict:
    return {"output": output, "host": socket.gethostname(), "pid": os.getpid()}


def _remove_stale_temporaries(output: str) -> None:
    """Remove the temporary folders of `output` left by runs that were killed (kill -9, power loss): those whose
    owner file names `output`, this host and a process that is gone. A live run's folder (the pid exists) and a
    folder of another host (a shared filesystem; its pid means nothing here) are left alone."""
    parent, name = os.path.split(output)
    for entry in os.listdir(parent):
        if not (entry.startswith(f".{name}.") and entry.endswith(".tmp")):
            continue
        folder = os.path.join(parent, entry)
        try:
            with open(os.path.join(folder, OWNER_FILE), encoding="utf-8") as f:
                owner = json.load(f)
            if owner["output"] != output or owner["host"] != socket.gethostname() or _process_exists(owner["pid"]):
                continue
        except (OSError, ValueError, KeyError, TypeError):  # no or a damaged owner file: not ours to judge
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True


def _documents(args: PrepareArgs, paths: list[str], bad_lines: BadLines | None) -> Iterator[Document]:
    return read_documents(paths, text_key=args.text_key, fmt=args.format, txt_mode=args.txt_mode,
                          bad_lines=bad_lines)


def _new_cleaner(args: PrepareArgs) -> Cleaner:
    return Cleaner(args.min_chars, args.nfkc, args.seed, args.valid_fraction, args.test_fraction)


def _get_tokenizer(args: PrepareArgs, paths: list[str]) -> tuple[Tokenizer, float]:
    """Load --tokenizer, or train one on a sample of the train documents (a first pass over the corpus)."""
    if args.tokenizer is not None:
        return Tokenizer.load(args.tokenizer, num_threads=1), 0.0
    start = time.perf_counter()
    cleaner = _new_cleaner(args)
    bad_lines = BadLines() if args.skip_bad_lines else None

    def train_texts() -> Iterator[str]:
        for doc in _documents(args, paths, bad_lines):
            kept = cleaner(doc)
            if kept is not None and kept[1] == 0:  # train split only: valid and test stay unseen
                yield kept[0]

    texts = train_texts()
    first = next(texts, None)
    if first is None:
        raise PrepareError(_empty_corpus_message(cleaner, bad_lines, "no train documents to train the tokenizer on"))
    if not args.quiet:
        print(f"prepare: training a {args.model_type} tokenizer with {args.vocab_size} pieces on a sample of at most "
              f"{args.tokenizer_sample_mb:g} MB of the train split", file=sys.stderr)
    progress = _progress(args.quiet, "sampling")
    try:
        tokenizer = Tokenizer.train(_counted(_prepend(first, texts), progress), args.vocab_size, args.model_type,
                                    sample_bytes=int(args.tokenizer_sample_mb * 2**20))
    finally:
        progress.close()
    return tokenizer, time.perf_counter() - start


def _counted(texts: Iterator[str], progress) -> Iterator[str]:
    for text in texts:
        progress.update()
        yield text


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _empty_corpus_message(cleaner: Cleaner, bad_lines: BadLines | None, what: str) -> str:
    message = (f"{what}: read {cleaner.read} documents, dropped {cleaner.dropped_empty} empty, "
               f"{cleaner.dropped_short} shorter than --min-chars, {cleaner.dropped_duplicate} duplicates")
    if bad_lines is not None and bad_lines.count:
        message += f", skipped {bad_lines.count} bad lines (the first: {bad_lines.first})"
    return message


# Worker processes: each loads the tokenizer once and encodes whole batches.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_path, num_threads=1)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_tokenizer.encode_flat(texts)


def _tokenize_corpus(args: PrepareArgs, paths: list[str], tokenizer: Tokenizer, directory: str) -> dict:
    """The second pass: read, clean, split, tokenize in batches and write the shards. Returns the counts."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = [ShardWriter(directory, split, dtype) for split in SPLITS]
    cleaner = _new_cleaner(args)
    bad_lines = BadLines() if args.skip_bad_lines else None
    # HF tokenizers parallelise inside their Rust backend; SentencePiece models use worker processes.
    pool = None
    if args.workers > 1 and tokenizer.kind == "sentencepiece":
        pool = multiprocessing.get_context("spawn").Pool(
            args.workers, initializer=_init_worker, initargs=(os.path.join(directory, SP_MODEL_FILE),))
    progress = _progress(args.quiet, "prepare")
    pending: deque = deque()  # (result, splits) of batches in flight, oldest first: written in input order
    written_tokens = 0
    start = time.perf_counter()

    def write(result, splits: np.ndarray) -> None:
        nonlocal written_tokens
        tokens, lengths = result.get() if pool is not None else result
        _write_batch(writers, tokens, lengths, splits)
        written_tokens += tokens.size
        progress.update(len(splits))
        progress.set_postfix_str(f"{written_tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s",
                                 refresh=False)

    try:
        for texts, splits in _batches(_documents(args, paths, bad_lines), cleaner):
            if pool is None:
                write(tokenizer.encode_flat(texts), splits)
                continue
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), splits))
            if len(pending) >= 2 * args.workers:  # bounded: the reader never runs far ahead of the workers
                write(*pending.popleft())
        while pending:
            write(*pending.popleft())
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for writer in writers:
            writer.close()
    splits = {name: {"documents": w.documents, "tokens": int(w.tokens)} for name, w in zip(SPLITS, writers)}
    if not any(s["documents"] for s in splits.values()):
        raise PrepareError(_empty_corpus_message(cleaner, bad_lines, "no documents left after cleaning"))
    return {"splits": splits, "cleaning": cleaner.counts(), "bad_lines": bad_lines.count if bad_lines else 0,
            "dtype": np.dtype(dtype).name, "files": {name: entry for w in writers for name, entry in w.files.items()}}


def _batches(documents: Iterator[Document], cleaner: Cleaner) -> Iterator[tuple[list[str], np.ndarray]]:
    texts: list[str] = []
    splits: list[int] = []
    chars = 0
    for doc in documents:
        kept = cleaner(doc)
        if kept is None:
            continue
        texts.append(kept[0])
        splits.append(kept[1])
        chars += len(kept[0])
        if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield texts, np.array(splits, dtype=np.int8)
            texts, splits, chars = [], [], 0
    if texts:
        yield texts, np.array(splits, dtype=np.int8)


def _write_batch(writers: list[ShardWriter], tokens: np.ndarray, lengths: np.ndarray, splits: np.ndarray) -> None:
    """Route each document of a batch to its split's writer, keeping the input order within each split."""
    if (splits == splits[0]).all():
        writers[splits[0]].add_batch(tokens, lengths)
        return
    token_split = np.repeat(splits, lengths)
    for index, writer in enumerate(writers):
        docs = splits == index
        if docs.any():
            writer.add_batch(tokens[token_split == index], lengths[docs])


def _progress(quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=" docs", unit_scale=True, file=sys.stderr, disable=quiet, mininterval=0.5,
                dynamic_ncols=True)


def _dry_run(args: PrepareArgs, paths: list[str]) -> dict:
    cleaner = _new_cleaner(args)
    bad_lines = BadLines() if args.skip_bad_lines else None
    per_split = {name: {"documents": 0, "characters": 0} for name in SPLITS}
    for doc in _documents(args, paths, bad_lines):
        kept = cleaner(doc)
        if kept is not None:
            entry = per_split[SPLITS[kept[1]]]
            entry["documents"] += 1
            entry["characters"] += len(kept[0])
    if not any(s["documents"] for s in per_split.values()):
        raise PrepareError(_empty_corpus_message(cleaner, bad_lines, "no documents left after cleaning"))
    return {"dry_run": True, "inputs": paths, "output": os.path.abspath(args.output), **cleaner.counts(),
            "bad_lines": bad_lines.count if bad_lines else 0, "splits": per_split,
            "args": dataclasses.asdict(args)}


if __name__ == "__main__":
    sys.exit(main())
