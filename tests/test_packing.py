"""Packing, blending and masking: the sample stream pretraining reads."""
import numpy as np
import pytest

from pipeline.data import ShardWriter, TokenShards
from pipeline.data.packing import BlendedSampler, PackedWindows, mask_for_mlm

EOS = 3


def mkdir(path):
    path.mkdir()
    return path


def make_split(tmp_path, docs, name="train"):
    w = ShardWriter(str(tmp_path), name, np.uint16)
    for d in docs:
        w.add(d)
    w.close()
    return TokenShards(str(tmp_path), name)


def test_windows_are_the_documents_with_eos_separators(tmp_path):
    docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34], [40, 41]]
    shards = make_split(tmp_path, docs)
    stream = [t for d in docs for t in [*d, EOS]]  # 15 tokens
    packed = PackedWindows(shards, seq_length=4, eos_id=EOS)
    assert len(packed) == len(stream) // 4
    for k in range(len(packed)):
        assert packed[k].tolist() == stream[4 * k:4 * k + 4]
        assert packed[k].dtype == np.int64


def test_window_longer_than_documents(tmp_path):
    shards = make_split(tmp_path, [[1], [2], [3], [4], [5], [6]])
    packed = PackedWindows(shards, seq_length=5, eos_id=EOS)
    assert packed[0].tolist() == [1, EOS, 2, EOS, 3]
    assert packed[1].tolist() == [EOS, 4, EOS, 5, EOS]


def test_blend_follows_weights_and_resumes_exactly(tmp_path):
    a = PackedWindows(make_split(mkdir(tmp_path / "a"), [list(range(100))]), 4, EOS)
    b = PackedWindows(make_split(mkdir(tmp_path / "b"), [list(range(200, 260))]), 4, EOS)
    full = BlendedSampler([a, b], [3.0, 1.0], seed=7).next_samples(60)
    counts = np.bincount([i for _, i, _ in full], minlength=2)
    assert counts.tolist() == [45, 15]
    first = BlendedSampler([a, b], [3.0, 1.0], seed=7)
    head = first.next_samples(25)
    second = BlendedSampler([a, b], [3.0, 1.0], seed=7)
    second.load_state(first.state())
    assert head + second.next_samples(35) == full


def test_epochs_visit_every_window_once_in_a_seeded_order(tmp_path):
    packed = PackedWindows(make_split(tmp_path, [list(range(40))]), 4, EOS)  # 41 tokens -> 10 windows
    s = BlendedSampler([packed], [1.0], seed=1).next_samples(20)
    epoch0, epoch1 = [w for _, _, w in s[:10]], [w for _, _, w in s[10:]]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != list(range(10)) and epoch0 != epoch1
    assert [w for _, _, w in BlendedSampler([packed], [1.0], seed=2).next_samples(10)] != epoch0


def test_too_little_data_for_one_window_is_a_clear_error(tmp_path):
    packed = PackedWindows(make_split(tmp_path, [[1, 2]]), 64, EOS)
    with pytest.raises(ValueError, match="fewer than one window"):
        BlendedSampler([packed], [1.0], seed=0)


def test_mlm_masking_rule():
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, size=200_000)
    ids[::50] = EOS
    inputs, labels = mask_for_mlm(ids, np.random.default_rng(1), mask_id=4, vocab_size=1000, special_ids=[0, 1, 2, EOS, 4])
    chosen = labels != -100
    assert abs(chosen.mean() - 0.15) < 0.005
    assert not chosen[ids == EOS].any()  # specials are never chosen
    assert (labels[chosen] == ids[chosen]).all()
    as_mask = (inputs[chosen] == 4).mean()
    unchanged = (inputs[chosen] == ids[chosen]).mean()
    assert abs(as_mask - 0.8) < 0.01 and 0.09 < unchanged < 0.12  # 10% kept (+ random hits of the same id)
    assert (inputs[~chosen] == ids[~chosen]).all()


def test_check_windows_before_training(tmp_path):
    from pipeline.data.packing import check_windows

    a, b = mkdir(tmp_path / "a"), mkdir(tmp_path / "b")
    for folder, valid in ((a, [[1, 2]]), (b, [[1, 2, 3, 4, 5, 6, 7]])):  # valid: 3 and 8 tokens with the EOS
        make_split(folder, [list(range(20))], "train")  # 21 tokens
        make_split(folder, valid, "valid")
        make_split(folder, [], "test")
    assert check_windows([str(a), str(b)], 8, EOS) == [
        "the test split has fewer tokens (documents and their EOS) than one window of --seq-length 8 "
        f"({a}/test.bin: 0, {b}/test.bin: 0): no test loss, summary.json test_loss is null; lower --seq-length, "
        "or prepare with a larger --test-fraction"]  # b's valid split holds a window: the valid loss is measured
    warnings = check_windows([str(a)], 8, EOS)
    assert len(warnings) == 2 and "no valid loss, summary.json eval_loss is null" in warnings[0]
    assert [w.split(" split")[0] for w in check_windows([str(a), str(b)], 3, EOS)] == ["the test"]
    with pytest.raises(ValueError, match=f"{a}/train.bin: 21 tokens .*, fewer than one window of --seq-length 32"):
        check_windows([str(a), str(b)], 32, EOS)
