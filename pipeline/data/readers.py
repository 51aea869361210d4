"""Stream documents out of raw text files: jsonl, plain text, csv/tsv, parquet and HF `save_to_disk` folders.

Every reader is a generator that holds at most one record (one jsonl/csv line, one txt block, one
parquet or Arrow batch) in memory, so a corpus of any size streams through in constant memory.
Formats, chosen by extension (a trailing `.gz` is read through gzip) unless `fmt` says otherwise:

    .jsonl .ndjson .json   one JSON object per line; the document is the string under `text_key`
    .txt .text .md         UTF-8 text; `txt_mode` says what a document is:
                             "block"  a run of lines separated by one or more blank lines (default)
                             "line"   every non-blank line
                             "file"   the whole file (read into memory at once)
    .csv .tsv              a header row, then one record per row; the document is column `text_key`
    .parquet               column `text_key`, read one row group batch at a time
    folder                 a HuggingFace dataset written by `save_to_disk` (a Dataset or a DatasetDict,
                           every split in turn); column `text_key`; needs `datasets` (imported lazily)

Text must be UTF-8; a byte order mark at the start of a text file (which Windows editors and Excel write)
is skipped. A parquet or Arrow text column may be any string type: string, large_string, string_view, or
dictionary-encoded strings (a pandas `category` column). Bad input raises `InputError`, whose message names the file, the line (or row)
and what was expected. With `skip_bad_lines`, per-record problems in jsonl and csv/tsv (bytes that
are not UTF-8, malformed JSON, a missing key, a value that is not a string, a short csv row) are
counted in a `BadLines` instead, and the first one is kept for the error shown if nothing is left.

`read_records` reads records with several fields (text + label, prompt + response) from the same
formats except plain text, with the same `FILE:LINE` errors, for the finetuning data.
"""
from __future__ import annotations

import csv
import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, NamedTuple

FORMATS = ("jsonl", "txt", "csv", "tsv", "parquet", "hf")
TXT_MODES = ("block", "line", "file")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt", ".text": "txt",
              ".md": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
BATCH_ROWS = 1024  # parquet / Arrow rows per batch: small enough for constant memory, large enough to be fast
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte order mark


class InputError(ValueError):
    """Bad input, with a message of the form `FILE:LINE: what was wrong; what was expected`."""

    def __init__(self, path: str, where: int | str | None, message: str):
        self.path, self.where, self.message = path, where, message
        if isinstance(where, int):
            location = f"{path}:{where}"  # a line number, the way compilers and editors expect it
        elif where:
            location = f"{path}: {where}"  # e.g. "row 12" of a parquet file
        else:
            location = path
        super().__init__(f"{location}: {message}")


class Document(NamedTuple):
    text: str
    source: str        # the file (or dataset folder) it came from
    line: int | str    # 1-based line number (jsonl, txt, csv) or "row N" (parquet, HF datasets)


class BadLines:
    """Counts the records skipped under `--skip-bad-lines`; keeps the first error for the report."""

    def __init__(self) -> None:
        self.count = 0
        self.first: InputError | None = None

    def add(self, error: InputError) -> None:
        self.count += 1
        if self.first is None:
            self.first = error


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand globs (`**` recurses) into a list of files and dataset folders, in a stable order.

    Each pattern's matches are sorted; patterns keep the order given; a path named twice is read once.
    A pattern that matches nothing is an error rather than a silently smaller corpus.
    """
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(pattern, None, "no file matches this pattern")
        else:
            if not os.path.exists(dataset_split(pattern)[0]):  # DIR:SPLIT: one split of a DatasetDict folder
                raise InputError(pattern, None, "no such file or folder")
            matches = [pattern]
        for path in matches:
            if path not in paths:
                paths.append(path)
    return paths


def detect_format(path: str, fmt: str = "auto") -> str:
    """The reader for `path`: `fmt` when given, else from the extension (or the folder's layout)."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise InputError(path, None, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    if dataset_split(path)[1] is not None:  # DIR:SPLIT
        return "hf"
    if os.path.isdir(path):
        if is_hf_dataset(path):
            return "hf"
        raise InputError(path, None, "is a folder but not a HuggingFace dataset saved with save_to_disk "
                                     "(no dataset_info.json/state.json or dataset_dict.json); pass files or a glob "
                                     "such as 'DIR/*.jsonl'")
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(path, None, f"unknown extension {ext or '(none)'!r}; expected one of "
                                     f"{', '.join(sorted(EXTENSIONS))} (optionally .gz), a dataset folder, "
                                     "or name the format with --format")
    return EXTENSIONS[ext]


def is_hf_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def read_documents(paths: Iterable[str], text_key: str = "text", fmt: str = "auto", txt_mode: str = "block",
                   bad_lines: BadLines | None = None) -> Iterator[Document]:
    """Yield the documents of every path in turn. `bad_lines`: count bad records instead of raising."""
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode {txt_mode!r}; expected one of {', '.join(TXT_MODES)}")
    for path in paths:
        kind = detect_format(path, fmt)
        if kind == "jsonl":
            yield from read_jsonl(path, text_key, bad_lines)
        elif kind == "txt":
            yield from read_txt(path, txt_mode)
        elif kind in ("csv", "tsv"):
            yield from read_csv(path, text_key, "\t" if kind == "tsv" else ",", bad_lines)
        elif kind == "parquet":
            yield from read_parquet(path, text_key)
        else:
            yield from read_hf_dataset(path, text_key)


def _open_binary(path: str) -> IO[bytes]:
    # 1 MiB buffer: fewer read syscalls on big files; gzip is decompressed as a stream.
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)
    except OSError as e:
        raise InputError(path, None, f"cannot open: {e.strerror or e}") from e


def _lines(f: IO[bytes]) -> Iterator[bytes]:
    """The lines of a binary file, without the UTF-8 byte order mark that may start the first one."""
    first = next(f, None)
    if first is None:
        return
    yield first.removeprefix(BOM)
    yield from f


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, lineno, f"bytes that are not UTF-8 ({raw[e.start:e.start + 4]!r} at byte "
                                       f"{e.start + 1} of the line); expected UTF-8 text") from None


def read_jsonl(path: str, text_key: str, bad_lines: BadLines | None = None) -> Iterator[Document]:
    """One JSON object per line; blank lines are allowed and ignored."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(_lines(f), 1):
            if raw.isspace():
                continue
            try:
                text = _parse_json_line(raw, path, lineno, text_key)
            except InputError as error:
                if bad_lines is None:
                    raise
                bad_lines.add(error)
                continue
            yield Document(text, path, lineno)


def _parse_json_line(raw: bytes, path: str, lineno: int, text_key: str) -> str:
    line = _decode(raw, path, lineno)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(path, lineno, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                                       "expected one JSON object "
                                       "per line (use --skip-bad-lines to skip and count such lines)") from None
    if not isinstance(record, dict):
        raise InputError(path, lineno, f"a JSON {type(record).__name__}; expected a JSON object with key "
                                       f"{text_key!r}")
    if text_key not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        raise InputError(path, lineno, f"no key {text_key!r} (keys: {keys}); choose the text field with --text-key")
    text = record[text_key]
    if not isinstance(text, str):
        raise InputError(path, lineno, f"key {text_key!r} holds a {type(text).__name__ if text is not None else 'null'}"
                                       "; expected a string")
    return text


def read_txt(path: str, mode: str = "block") -> Iterator[Document]:
    """Plain UTF-8 text. Lines keep their own line breaks inside a document; see the module doc for `mode`."""
    with _open_binary(path) as f:
        if mode == "file":
            # One document per file: the file has to be in memory as a whole, by definition.
            data = f.read().removeprefix(BOM)
            try:
                yield Document(data.decode("utf-8"), path, 1)
            except UnicodeDecodeError as e:
                lineno = data.count(b"\n", 0, e.start) + 1
                raise InputError(path, lineno, "bytes that are not UTF-8; expected UTF-8 text") from None
            return
        block: list[str] = []
        start = 0
        for lineno, raw in enumerate(_lines(f), 1):
            line = _decode(raw, path, lineno)
            if mode == "line":
                if not line.isspace():
                    yield Document(line, path, lineno)
            elif line.isspace():
                if block:
                    yield Document("".join(block), path, start)
                    block = []
            else:
                if not block:
                    start = lineno
                block.append(line)
        if block:
            yield Document("".join(block), path, start)


class _DecodedLines:
    """Feeds csv.reader decoded lines. Bytes that are not UTF-8 are decoded with replacement characters so that
    parsing can go on, and the error is kept in `error` for the caller to raise or count with the record."""

    def __init__(self, f: IO[bytes], path: str):
        self.f, self.path, self.error = f, path, None
        self.lineno = 0

    def __iter__(self) -> Iterator[str]:
        for raw in _lines(self.f):
            self.lineno += 1
            try:
                yield _decode(raw, self.path, self.lineno)
            except InputError as e:
                self.error = self.error or e
                yield raw.decode("utf-8", errors="replace")


def read_csv(path: str, text_key: str, delimiter: str = ",", bad_lines: BadLines | None = None) -> Iterator[Document]:
    """A header row naming the columns, then one record per row (quoted fields may span lines)."""
    # The default field limit (128 KiB) would reject long documents; 2**31 - 1 fits a C long everywhere.
    csv.field_size_limit(2**31 - 1)
    kind = "tsv" if delimiter == "\t" else "csv"
    with _open_binary(path) as f:
        lines = _DecodedLines(f, path)
        reader = csv.reader(iter(lines), delimiter=delimiter, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise InputError(path, lines.lineno, f"malformed header ({e}); expected a row of column names") from None
        if lines.error:
            raise lines.error
        if text_key not in header:
            columns = ", ".join(repr(c) for c in header[:20])
            raise InputError(path, 1, f"no column {text_key!r} in the header (columns: {columns}); "
                                      "choose the text column with --text-key")
        column = header.index(text_key)
        while True:
            error = None
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                error = InputError(path, lines.lineno, f"malformed {kind} ({e}); expected {kind} records")
                row = []
            if lines.error:
                error, lines.error = lines.error, None
            elif row and column >= len(row):
                error = InputError(path, lines.lineno, f"{len(row)} fields; expected at least {column + 1} to reach "
                                                       f"column {text_key!r}")
            if error is not None:
                if bad_lines is None:
                    raise error
                bad_lines.add(error)
                continue
            if row:  # an empty line between records is no record
                yield Document(row[column], path, lines.lineno)


def read_parquet(path: str, text_key: str) -> Iterator[Document]:
    """Column `text_key` of a parquet file, one batch of rows at a time (never the whole file)."""
    import pyarrow.parquet as pq  # lazy: pyarrow is only needed for parquet

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise InputError(path, None, f"not a readable parquet file ({e})") from None
    _check_arrow_column(path, pf.schema_arrow, text_key)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[text_key]):
        yield from _arrow_texts(path, _as_strings(batch.column(0)).to_pylist(), row)
        row += batch.num_rows


def read_hf_dataset(path: str, text_key: str) -> Iterator[Document]:
    """A HuggingFace dataset folder from `save_to_disk`, read batch by batch from its memory-mapped Arrow files."""
    import datasets  # lazy: importing datasets takes seconds and is only needed here

    folder, only = dataset_split(path)
    try:
        loaded = datasets.load_from_disk(folder)
    except Exception as e:
        raise InputError(path, None, f"cannot load the dataset folder ({e})") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    if only is not None:  # DIR:SPLIT; without it a DatasetDict is read split after split (prepare makes its own)
        if only not in dict(parts):
            have = ", ".join(str(name) for name, _ in parts) if isinstance(loaded, datasets.DatasetDict) else "none"
            raise InputError(path, None, f"no split {only!r} in this dataset folder (splits: {have})")
        parts = [(only, dict(parts)[only])]
    for split, ds in parts:
        where = f"{path}[{split}]" if split and only is None else path
        _check_arrow_column(where, ds.features.arrow_schema, text_key)
        row = 0
        for batch in ds.select_columns([text_key]).iter(batch_size=BATCH_ROWS):
            texts = batch[text_key]
            yield from _arrow_texts(where, texts, row)
            row += len(texts)


def _check_arrow_column(path: str, schema, text_key: str) -> None:
    if text_key not in schema.names:
        columns = ", ".join(repr(c) for c in schema.names[:20])
        raise InputError(path, None, f"no column {text_key!r} (columns: {columns}); choose it with --text-key")
    kind = schema.field(text_key).type
    if not _is_text_type(kind):
        raise InputError(path, None, f"column {text_key!r} has type {kind}; expected strings (string, large_string, "
                                     "string_view or dictionary-encoded strings)")


def _is_text_type(kind) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):  # a pandas `category` column: indices into a dictionary of strings
        kind = kind.value_type
    is_string_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_string_view(kind)


def _as_strings(column):
    """A text column (see `_is_text_type`) as a plain Arrow string column."""
    import pyarrow as pa

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    return column.cast(pa.large_string())  # decodes a dictionary, copies string_view into one buffer


def _arrow_texts(path: str, texts: list, first_row: int) -> Iterator[Document]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(path, f"row {first_row + i + 1}", f"column value is {'null' if text is None else type(text).__name__}; "
                                                             "expected a string")
        yield Document(text, path, f"row {first_row + i + 1}")


class Record(NamedTuple):
    values: dict       # key -> value as stored (str, int, float, bool, ...; csv values are strings)
    source: str
    line: int | str


def read_records(path: str, keys: Sequence[str], fmt: str = "auto", hint: str = "") -> Iterator[Record]:
    """Records with several fields, for labelled data (text + label, prompt + response): jsonl, csv/tsv, parquet or
    a HF dataset folder. Every record must have every key: a missing one is an `InputError` naming the file, the
    line (or row) and the keys there are; `hint` is appended to that message (e.g. which flag chooses the key)."""
    kind = detect_format(path, fmt)
    suffix = f"; {hint}" if hint else ""
    if kind == "jsonl":
        with _open_binary(path) as f:
            for lineno, raw in enumerate(_lines(f), 1):
                if raw.isspace():
                    continue
                line = _decode(raw, path, lineno)
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(path, lineno, f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno}); "
                                                   "expected one JSON object per line") from None
                if not isinstance(record, dict):
                    raise InputError(path, lineno, f"a JSON {type(record).__name__}; expected a JSON object with keys "
                                                   f"{', '.join(repr(k) for k in keys)}")
                missing = [k for k in keys if k not in record]
                if missing:
                    have = ", ".join(repr(k) for k in list(record)[:10]) or "none"
                    raise InputError(path, lineno, f"no key {missing[0]!r} (keys: {have}){suffix}")
                yield Record({k: record[k] for k in keys}, path, lineno)
    elif kind in ("csv", "tsv"):
        csv.field_size_limit(2**31 - 1)
        with _open_binary(path) as f:
            lines = _DecodedLines(f, path)
            reader = csv.reader(iter(lines), delimiter="\t" if kind == "tsv" else ",", strict=True)
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise InputError(path, lines.lineno, f"malformed header ({e}); expected a row of column names") from None
            missing = [k for k in keys if k not in header]
            if missing:
                columns = ", ".join(repr(c) for c in header[:20])
                raise InputError(path, 1, f"no column {missing[0]!r} in the header (columns: {columns}){suffix}")
            columns = [header.index(k) for k in keys]
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise InputError(path, lines.lineno, f"malformed {kind} ({e}); expected {kind} records") from None
                if lines.error:
                    raise lines.error
                if not row:
                    continue
                if max(columns) >= len(row):
                    raise InputError(path, lines.lineno, f"{len(row)} fields; expected {len(header)} (the header's)")
                yield Record({k: row[c] for k, c in zip(keys, columns)}, path, lines.lineno)
    elif kind in ("parquet", "hf"):
        yield from _read_arrow_records(path, kind, list(keys), suffix)
    else:
        raise InputError(path, None, f"{kind} files hold plain text, not records with fields "
                                     f"{', '.join(repr(k) for k in keys)}; expected jsonl, csv/tsv, parquet or a "
                                     "dataset folder")


def dataset_split(path: str) -> tuple[str, str | None]:
    """(DIR, SPLIT) for `DIR:SPLIT`, which names one split of a DatasetDict folder (`data/reviews:train`);
    (path, None) for any other path, including one that exists as given (a file name may hold a colon)."""
    if ":" not in path or os.path.exists(path):
        return path, None
    folder, split = path.rsplit(":", 1)
    return (folder, split) if split and os.path.isdir(folder) else (path, None)


def _read_arrow_records(path: str, kind: str, keys: list[str], suffix: str) -> Iterator[Record]:
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise InputError(path, None, f"not a readable parquet file ({e})") from None
        parts = [(path, pf.schema_arrow.names, lambda pf=pf: pf.iter_batches(batch_size=BATCH_ROWS, columns=keys))]
    else:
        import datasets

        folder, split = dataset_split(path)
        try:
            loaded = datasets.load_from_disk(folder)
        except Exception as e:
            raise InputError(path, None, f"cannot load the dataset folder ({e})") from None
        # Records are one split of labelled data (train, valid or test): a DatasetDict's splits must not mix.
        if isinstance(loaded, datasets.DatasetDict):
            names = ", ".join(loaded) or "none"
            if split is None:
                raise InputError(path, None, f"a DatasetDict with the splits {names}; name one as DIR:SPLIT "
                                             f"(e.g. {path}:{next(iter(loaded), 'train')})")
            if split not in loaded:
                raise InputError(path, None, f"no split {split!r} in this DatasetDict (splits: {names}); expected "
                                             "DIR:SPLIT with one of them")
            loaded = loaded[split]
        elif split is not None:
            raise InputError(path, None, f"{folder} is a single Dataset, not a DatasetDict; drop ':{split}'")
        parts = [(path, loaded.column_names,
                  lambda: loaded.select_columns(keys).with_format("arrow").iter(batch_size=BATCH_ROWS))]
    for where, names, batches in parts:
        missing = [k for k in keys if k not in names]
        if missing:
            columns = ", ".join(repr(c) for c in names[:20])
            raise InputError(where, None, f"no column {missing[0]!r} (columns: {columns}){suffix}")
        row = 0
        for batch in batches():
            columns = {k: batch.column(k).to_pylist() for k in keys}
            for i in range(batch.num_rows):
                yield Record({k: columns[k][i] for k in keys}, where, f"row {row + i + 1}")
            row += batch.num_rows


def file_fingerprint(path: str) -> dict:
    """Size and sha256 of an input file, or of every file of a dataset folder (names and bytes, in order)."""
    import hashlib

    path = dataset_split(path)[0]  # DIR:SPLIT: the whole folder's files
    digest = hashlib.sha256()
    files = [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    size = 0
    for name in files:
        if name != path:
            digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    return {"path": path, "bytes": size, "sha256": digest.hexdigest()}


__all__ = ["BadLines", "Document", "InputError", "Record", "detect_format", "expand_inputs", "file_fingerprint",
           "read_csv", "read_documents", "read_hf_dataset", "read_jsonl", "read_parquet", "read_records", "read_txt"]
