"""Memory-mapped token shards: one `.bin` of token ids and one `.idx` of document offsets per split.

Layout of `SPLIT.idx` (little-endian):

    bytes 0..7    magic b"PLTOKIDX"
    bytes 8..11   uint32 format version (1)
    bytes 12..15  uint32 bytes per token id (2 = uint16, 4 = uint32)
    bytes 16..23  uint64 number of documents N
    bytes 24..    uint64 offsets[N + 1]: document i is tokens[offsets[i]:offsets[i + 1]] of SPLIT.bin

`SPLIT.bin` is the token ids of all documents, back to back, with no separators: document i is
exactly what the tokenizer gives for its text. Separators are added when training packs windows.
"""
from __future__ import annotations

import os
import struct
from array import array

import numpy as np

MAGIC = b"PLTOKIDX"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")  # magic, version, token bytes, documents
DTYPES = {2: np.uint16, 4: np.uint32}


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


class ShardWriter:
    """Streams documents into `DIR/SPLIT.bin` and `DIR/SPLIT.idx`; holds only the offsets in memory
    (8 bytes a document)."""

    def __init__(self, directory: str, split: str, dtype: type):
        self.dtype = np.dtype(dtype)
        self.bin_path = os.path.join(directory, f"{split}.bin")
        self.idx_path = os.path.join(directory, f"{split}.idx")
        self._bin = open(self.bin_path, "wb", buffering=1 << 22)  # large writes: one syscall per 4 MiB
        self._offsets = array("Q", [0])

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
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        ends = np.cumsum(lengths, dtype=np.uint64) + np.uint64(self._offsets[-1])
        self._offsets.frombytes(ends.astype("<u8").tobytes())

    @property
    def documents(self) -> int:
        return len(self._offsets) - 1

    @property
    def tokens(self) -> int:
        return self._offsets[-1]

    def close(self) -> None:
        self._bin.close()
        with open(self.idx_path, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.documents))
            f.write(np.asarray(self._offsets, dtype="<u8").tobytes())


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
            raise ValueError(f"{self.idx_path}: truncated ({size} bytes, the header alone is {HEADER.size}); rerun pipeline.prepare")
        with open(self.idx_path, "rb") as f:
            magic, version, itemsize, n_docs = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{self.idx_path}: not a token index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: format version {version}, this code reads {VERSION}; rerun pipeline.prepare")
        if itemsize not in DTYPES:
            raise ValueError(f"{self.idx_path}: token width {itemsize} bytes, expected 2 or 4")
        expected = HEADER.size + 8 * (n_docs + 1)
        if size != expected:
            raise ValueError(f"{self.idx_path}: {size} bytes, expected {expected} for {n_docs} documents "
                             "(truncated or corrupt); rerun pipeline.prepare")
        self.dtype = np.dtype(DTYPES[itemsize])
        self.offsets = np.memmap(self.idx_path, dtype="<u8", mode="r", offset=HEADER.size, shape=(n_docs + 1,))
        n_tokens = int(self.offsets[-1])
        bin_size = os.path.getsize(self.bin_path)
        if bin_size != n_tokens * itemsize:
            raise ValueError(f"{self.bin_path}: {bin_size} bytes, but {self.idx_path} indexes {n_tokens} tokens of "
                             f"{itemsize} bytes ({n_tokens * itemsize} bytes); the shard is truncated or does not "
                             "belong to this index; rerun pipeline.prepare")
        # np.memmap refuses zero-length files: an empty split has an empty array instead.
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if n_tokens
                       else np.zeros(0, dtype=self.dtype))

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
