"""Token shards: the .bin/.idx format, the uint16/uint32 switch, and clear errors on damaged files."""
import hashlib
import os
import struct
import tracemalloc

import numpy as np
import pytest

from pipeline.data import ShardWriter, TokenShards, token_dtype
from pipeline.data.shards import HEADER


def write(directory, docs, dtype=np.uint16, split="train"):
    writer = ShardWriter(str(directory), split, dtype)
    for ids in docs:
        writer.add(ids)
    writer.close()
    return TokenShards(str(directory), split)


def test_round_trip_documents_and_offsets(tmp_path):
    docs = [[5, 6, 7], [], [65535], list(range(1000))]
    shards = write(tmp_path, docs)
    assert len(shards) == 4
    for i, ids in enumerate(docs):
        assert shards[i].tolist() == ids
        assert shards[i].dtype == np.uint16
    assert shards[-1].tolist() == docs[-1]
    assert shards.offsets.tolist() == [0, 3, 3, 4, 1004]
    assert shards.num_tokens == 1004
    assert isinstance(shards.tokens, np.memmap)  # memory-mapped, not read into memory
    with pytest.raises(IndexError):
        shards[4]


def test_add_batch_equals_add(tmp_path):
    docs = [[1, 2], [3], [4, 5, 6]]
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    one = write(tmp_path / "a", docs)
    writer = ShardWriter(str(tmp_path / "b"), "train", np.uint16)
    writer.add_batch(np.array([1, 2, 3], np.int32), np.array([2, 1]))
    writer.add_batch(np.array([4, 5, 6], np.int32), np.array([3]))
    writer.close()
    for name in ("train.bin", "train.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(one) == 3


def test_idx_layout_and_recorded_hashes(tmp_path):
    writer = ShardWriter(str(tmp_path), "valid", np.uint32)
    writer.add_batch(np.array([7, 8, 9, 10], np.int64), np.array([1, 0, 3]))
    writer.add([70000])
    writer.close()
    idx = (tmp_path / "valid.idx").read_bytes()
    assert idx == struct.pack("<8sIIQ", b"PLTOKIDX", 1, 4, 4) + struct.pack("<5Q", 0, 1, 1, 4, 5)
    assert (writer.documents, writer.tokens) == (4, 5)
    assert writer.files["valid.idx"]["sha256"] == hashlib.sha256(idx).hexdigest()
    bin_bytes = (tmp_path / "valid.bin").read_bytes()
    assert writer.files["valid.bin"]["sha256"] == hashlib.sha256(bin_bytes).hexdigest()
    assert writer.files["valid.bin"]["bytes"] == 20


def test_writer_memory_does_not_grow_with_the_documents(tmp_path):
    # 200k documents: 1.6 MB of offsets if they were held in memory. They go to the .idx as they come.
    writer = ShardWriter(str(tmp_path), "train", np.uint16)
    lengths = np.full(1000, 3, dtype=np.int64)
    tokens = np.arange(3000, dtype=np.int32)
    tracemalloc.start()
    try:
        for _ in range(200):
            writer.add_batch(tokens, lengths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    writer.close()
    assert peak < 200_000, peak  # a batch's temporaries only
    shards = TokenShards(str(tmp_path), "train")
    assert len(shards) == 200_000 and shards[199_999].tolist() == [2997, 2998, 2999]


def test_add_batch_rejects_inconsistent_lengths(tmp_path):
    writer = ShardWriter(str(tmp_path), "train", np.uint16)
    with pytest.raises(ValueError, match="add up to 3"):
        writer.add_batch(np.array([1, 2], np.int32), np.array([3]))
    writer.close()


def test_dtype_switch_at_65536():
    assert token_dtype(2000) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_uint32_shards_keep_large_ids(tmp_path):
    shards = write(tmp_path, [[0, 65535, 65536, 4_000_000_000]], dtype=token_dtype(70_000))
    assert shards.dtype == np.uint32
    assert shards[0].tolist() == [0, 65535, 65536, 4_000_000_000]
    assert os.path.getsize(tmp_path / "train.bin") == 16


def test_uint16_writer_refuses_ids_that_do_not_fit(tmp_path):
    writer = ShardWriter(str(tmp_path), "train", np.uint16)
    with pytest.raises(ValueError, match="does not fit uint16"):
        writer.add_batch(np.array([1, 70_000], np.int64), np.array([2]))
    writer.close()


def test_empty_split(tmp_path):
    shards = write(tmp_path, [], split="test")
    assert len(shards) == 0 and shards.num_tokens == 0


def test_truncated_bin_is_an_error(tmp_path):
    write(tmp_path, [[1, 2, 3], [4, 5]])
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(6)
    with pytest.raises(ValueError, match="train.bin: 6 bytes.*truncated"):
        TokenShards(str(tmp_path), "train")


def test_truncated_idx_is_an_error(tmp_path):
    write(tmp_path, [[1, 2, 3], [4, 5]])
    size = os.path.getsize(tmp_path / "train.idx")
    with open(tmp_path / "train.idx", "r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(ValueError, match="train.idx.*truncated or corrupt"):
        TokenShards(str(tmp_path), "train")
    with open(tmp_path / "train.idx", "r+b") as f:
        f.truncate(HEADER.size - 1)
    with pytest.raises(ValueError, match="truncated"):
        TokenShards(str(tmp_path), "train")


def test_wrong_magic_and_missing_files(tmp_path):
    write(tmp_path, [[1]])
    data = (tmp_path / "train.idx").read_bytes()
    (tmp_path / "train.idx").write_bytes(b"NOTANIDX" + data[8:])
    with pytest.raises(ValueError, match="not a token index"):
        TokenShards(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="valid.idx: missing"):
        TokenShards(str(tmp_path), "valid")
