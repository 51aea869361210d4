"""Memory-mapped token shards: one `.bin` of token ids and one `.idx` of document offsets per split.

Layout of `SPLIT.idx` (little-endian):

    bytes 0..7    magic b"PLTOKIDX"
    bytes 8..11   uint32 format version (1)
    bytes 12..15  uint32 bytes per token id (2 = uint16, 4 = uint32)
    bytes 16..23  uint64 number of documents N
    bytes 24..    uint64 offsets[N + 1]: document i is tokens[offsets[i]:offsets[i + 1]] of SPLIT.bin

`SPLIT.bin` is the token ids of all documents, back to back, with no separators: document i is
exactly what the tokenizer gives for its text. Separators are added when training packs windows.

Opening a split checks what can be checked cheaply, whatever the size of the shards: the header, that
the .idx size matches its document count, that the offsets start at 0 and never decrease (8 bytes a
document are read), and that the .bin size matches the last offset. `ShardWriter` also records each
file's sha256 and `sample_sha256` for manifest.json; pipeline/data/prepared.py compares them.
"""
from __future__ import annotations

import hashlib
import os
import struct

import numpy as np

MAGIC = b"PLTOKIDX"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")  # magic, version, token bytes, documents
DTYPES = {2: np.uint16, 4: np.uint32}
REPAIR = "re-run `python -m pipeline.prepare` with --overwrite to rewrite the folder"
SAMPLE_BLOCKS = 16       # sample_sha256 reads this many blocks ...
SAMPLE_BYTES = 1 << 16   # ... of this many bytes: at most 1 MiB per file
OFFSETS_CHUNK = 1 << 20  # offsets checked this many at a time (8 MiB), so memory stays flat


def sample_sha256(path: str) -> str:
    """A fingerprint that reads at most 1 MiB of the file whatever its size: sha256 of the size and of
    SAMPLE_BLOCKS blocks spread evenly over the file (the first and the last included; a small file is
    hashed whole). It changes when the file is truncated, extended or replaced, or a sampled block is
    damaged; `file_sha256` (tools/inspect_data.py --verify) catches damage anywhere."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            digest.update(f.read())
        else:
            for k in range(SAMPLE_BLOCKS):
                f.seek(k * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """sha256 of the whole file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: str, sha256: str) -> dict:
    """A shard file's entry in manifest.json's "files"."""
    return {"bytes": os.path.getsize(path), "sha256": sha256, "sample_sha256": sample_sha256(path)}


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class ShardWriter:
    """Streams documents into `DIR/SPLIT.bin` and `DIR/SPLIT.idx`, holding neither ids nor offsets in memory:
    the offsets go to the .idx as they come, after a blank header that `close()` fills in once the number of
    documents is known. After `close()`, `files` holds each file's size, sha256 and sample_sha256 (for
    manifest.json); the .bin is hashed as it is written, the .idx (8 bytes a document) read once at close."""

    def __init__(self, directory: str, split: str, dtype: type):
        self.dtype = np.dtype(dtype)
        self.bin_path = os.path.join(directory, f"{split}.bin")
        self.idx_path = os.path.join(directory, f"{split}.idx")
        self._bin = open(self.bin_path, "wb", buffering=1 << 20)  # large writes: one syscall per MiB
        self._bin_sha256 = hashlib.sha256()
        self._idx = open(self.idx_path, "wb", buffering=1 << 20)
        self._idx.write(bytes(HEADER.size))       # a blank header (no magic) until close()
        self._idx.write(np.zeros(1, "<u8").tobytes())  # offsets[0]
        self.documents = 0
        self.tokens = 0                            # the last offset
        self.files: dict[str, dict] = {}

    def add(self, ids) -> None:
        """Append one document's token ids."""
        arr = np.asarray(ids)
        self.add_batch(arr, np.array([arr.size], dtype=np.int64))

    def add_batch(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents at once: `tokens` are their ids back to back, `lengths` the count of each."""
        tokens, lengths = np.asarray(tokens), np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths add up to {int(lengths.sum())} tokens, but {tokens.size} were given")
        if tokens.size and tokens.dtype != self.dtype:
            # A narrowing cast would wrap ids silently: check the range first.
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high > np.iinfo(self.dtype).max:
                raise ValueError(f"token id {high if high > 0 else low} does not fit {self.dtype.name}; "
                                 "choose the dtype with token_dtype(vocab_size)")
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._bin_sha256.update(data)
        ends = np.cumsum(lengths, dtype=np.uint64) + np.uint64(self.tokens)
        self._idx.write(ends.astype("<u8").tobytes())
        self.documents += len(lengths)
        self.tokens += tokens.size

    def close(self) -> None:
        if self._bin.closed:
            return
        self._bin.close()
        self._idx.seek(0)
        self._idx.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.documents))
        self._idx.close()
        self.files = {
            os.path.basename(self.bin_path): describe_file(self.bin_path, self._bin_sha256.hexdigest()),
            os.path.basename(self.idx_path): describe_file(self.idx_path, file_sha256(self.idx_path)),
        }


class TokenShards:
    """One split of a prepared folder: `len()` documents, `[i]` the token ids of document i
    (a read-only numpy view into the memory map, no copy)."""

    def __init__(self, directory: str, split: str):
        self.directory, self.split = directory, split
        self.idx_path = os.path.join(directory, f"{split}.idx")
        self.bin_path = os.path.join(directory, f"{split}.bin")
        for path in (self.idx_path, self.bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing; is {directory} a folder written by `python -m pipeline.prepare`?")
        size = os.path.getsize(self.idx_path)
        if size < HEADER.size:
            raise ValueError(f"{self.idx_path}: truncated ({size} bytes, the header alone is {HEADER.size}); {REPAIR}")
        with open(self.idx_path, "rb") as f:
            magic, version, itemsize, n_docs = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{self.idx_path}: not a token index (magic {magic!r}, expected {MAGIC!r}); the header is "
                             f"damaged or this is another file; {REPAIR}")
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: format version {version}, this code reads {VERSION}; {REPAIR}")
        if itemsize not in DTYPES:
            raise ValueError(f"{self.idx_path}: token width {itemsize} bytes, expected 2 or 4; the header is damaged; "
                             f"{REPAIR}")
        expected = HEADER.size + 8 * (n_docs + 1)
        if size != expected:
            raise ValueError(f"{self.idx_path}: {size} bytes, expected {expected} for {n_docs} documents "
                             f"(truncated or corrupt); {REPAIR}")
        self.dtype = np.dtype(DTYPES[itemsize])
        self.offsets = np.memmap(self.idx_path, dtype="<u8", mode="r", offset=HEADER.size, shape=(n_docs + 1,))
        self._check_offsets()
        n_tokens = int(self.offsets[-1])
        bin_size = os.path.getsize(self.bin_path)
        if bin_size != n_tokens * itemsize:
            raise ValueError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} indexes {n_tokens} tokens of "
                             f"{itemsize} bytes ({n_tokens * itemsize} bytes); the shard is truncated or does not "
                             f"belong to this index; {REPAIR}")
        # np.memmap refuses zero-length files: an empty split has an empty array instead.
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if n_tokens
                       else np.zeros(0, dtype=self.dtype))

    def _check_offsets(self) -> None:
        """Offsets start at 0 and never decrease: otherwise a document would be a wrong or negative slice."""
        if int(self.offsets[0]) != 0:
            raise ValueError(f"{self.idx_path}: the first document offset is {int(self.offsets[0])}, expected 0 "
                             f"(corrupt index); {REPAIR}")
        for start in range(0, len(self.offsets) - 1, OFFSETS_CHUNK):
            part = np.asarray(self.offsets[start:start + OFFSETS_CHUNK + 1])
            down = np.flatnonzero(part[1:] < part[:-1])
            if down.size:
                i = start + int(down[0])
                raise ValueError(f"{self.idx_path}: document {i} ends at token {int(self.offsets[i + 1])}, before it "
                                 f"starts ({int(self.offsets[i])}): the offsets are corrupt; {REPAIR}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for {n} documents in {self.bin_path}")
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"TokenShards({self.directory!r}, {self.split!r}: {len(self)} documents, {self.num_tokens} tokens)"
