"""Data integrity at load: damaged shards, a manifest that does not match its shards, and a tokenizer that does
not match the data are errors when the data is opened (or when a stage starts), naming the file and what to do."""
import json
import os
import shutil
import struct
import sys

import numpy as np
import pytest

from pipeline import prepare, pretrain
from pipeline.data import ShardWriter
from pipeline.data.prepared import DataError, check_model_tokenizer, open_prepared, verify_contents
from pipeline.data.shards import HEADER, SAMPLE_BLOCKS, SAMPLE_BYTES
from pipeline.data.tokenizer import Tokenizer, TokenizerError
from tests.conftest import REPO, help_topics_jsonl

REPAIR = "re-run `python -m pipeline.prepare` with --overwrite"
ZERO0 = os.path.join(REPO, "ds_configs", "zero0.json")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A prepared folder (Python's help topics, 400 pieces), never modified: each test damages a copy."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = help_topics_jsonl(root / "corpus.jsonl")
    out = root / "data"
    assert prepare.main(["--input", str(corpus), "--output", str(out), "--vocab-size", "400", "--workers", "1",
                         "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A different SentencePiece tokenizer of the same size (trained on other text)."""
    texts = [f"line {i}: " + " ".join(f"word{j * i % 97}" for j in range(40)) for i in range(300)]
    tok = Tokenizer.train(texts, vocab_size=400)
    folder = tmp_path_factory.mktemp("other_tokenizer")
    tok.save(str(folder))
    return folder / "tokenizer.model"


@pytest.fixture
def data(pristine, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(pristine, copy)
    return copy


def manifest_of(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def rewrite_split(folder, split: str, ids: np.ndarray, lengths: list[int]) -> None:
    """Replace a split with these documents and record it in manifest.json as prepare would: the folder stays
    consistent, so only the content check under test can object."""
    writer = ShardWriter(str(folder), split, np.uint16)
    writer.add_batch(ids, np.array(lengths))
    writer.close()
    manifest = manifest_of(folder)
    manifest["splits"][split] = {"documents": writer.documents, "tokens": int(writer.tokens)}
    manifest["files"].update(writer.files)
    write_manifest(folder, manifest)


def test_an_intact_folder_opens_and_verifies(data):
    opened = open_prepared(str(data))
    manifest = manifest_of(data)
    assert set(manifest["files"]) == {f"{s}.{e}" for s in ("train", "valid", "test") for e in ("bin", "idx")}
    assert manifest["files"]["train.bin"]["bytes"] == os.path.getsize(data / "train.bin")
    assert len(opened.splits["train"]) == manifest["splits"]["train"]["documents"]
    assert opened.tokenizer.vocab_size == 400
    verify_contents(opened)


# --- damaged shard files ---------------------------------------------------------------------------------

def truncate(path, drop):
    os.truncate(path, os.path.getsize(path) - drop)


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def swap_offsets(path):
    """Swap the offsets of documents 1 and 2: the index then goes down."""
    with open(path, "r+b") as f:
        f.seek(HEADER.size + 8)
        a, b = struct.unpack("<QQ", f.read(16))
        f.seek(HEADER.size + 8)
        f.write(struct.pack("<QQ", b, a))


def replace_middle(path):
    """The same size, other bytes (valid ids): a shard overwritten or replaced by another of the same length."""
    size = os.path.getsize(path)
    patch(path, size // 2 - (size // 2) % 2, b"\x07\x00" * 8)


DAMAGE = {
    "bin truncated": (lambda d: truncate(d / "train.bin", 2), r"train\.bin: \d+ bytes, but .*truncated"),
    "idx truncated": (lambda d: truncate(d / "valid.idx", 8), r"valid\.idx: \d+ bytes, expected .*truncated or corrupt"),
    "idx shorter than its header": (lambda d: truncate(d / "test.idx", os.path.getsize(d / "test.idx") - 10),
                                    r"test\.idx: truncated \(10 bytes"),
    "header magic damaged": (lambda d: patch(d / "train.idx", 0, b"XXXXXXXX"), r"train\.idx: not a token index"),
    "header version damaged": (lambda d: patch(d / "train.idx", 8, struct.pack("<I", 7)), r"train\.idx: format version 7"),
    "header token width damaged": (lambda d: patch(d / "train.idx", 12, struct.pack("<I", 3)),
                                   r"train\.idx: token width 3 bytes"),
    "header document count damaged": (lambda d: patch(d / "valid.idx", 16, struct.pack("<Q", 10**6)),
                                      r"valid\.idx: \d+ bytes, expected \d+ for 1000000 documents"),
    "offsets out of order": (lambda d: swap_offsets(d / "train.idx"), r"train\.idx: document 1 ends at token .* corrupt"),
    "bin replaced, same size": (lambda d: replace_middle(d / "train.bin"),
                                r"train\.bin: not the file pipeline\.prepare wrote .*damaged or replaced"),
    "idx of another split": (lambda d: [shutil.copy(d / f"test.{e}", d / f"valid.{e}") for e in ("bin", "idx")],
                             r"valid\.idx: \d+ documents and \d+ tokens, but .*manifest\.json records"),
    "bin missing": (lambda d: os.remove(d / "test.bin"), r"test\.bin: missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_shards_are_errors_at_open(data, damage):
    apply, message = DAMAGE[damage]
    apply(data)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        open_prepared(str(data))
    assert str(data) in str(error.value)
    if damage != "bin missing":
        assert REPAIR in str(error.value)


# --- a manifest that does not match its shards -----------------------------------------------------------

def edit_manifest(change):
    def apply(folder):
        manifest = manifest_of(folder)
        change(manifest)
        write_manifest(folder, manifest)
    return apply


MANIFEST = {
    "document count": (edit_manifest(lambda m: m["splits"]["train"].update(documents=1)),
                       r"train\.idx: \d+ documents and \d+ tokens, but .*records 1 and"),
    "token count": (edit_manifest(lambda m: m["splits"]["test"].update(tokens=5)), r"test\.idx: .*records \d+ and 5"),
    "dtype width": (edit_manifest(lambda m: m.update(dtype="uint32")),
                    r"manifest\.json: dtype uint32, but ids of a 400-piece tokenizer are stored as uint16"),
    "vocab size": (edit_manifest(lambda m: m["tokenizer"].update(vocab_size=500)),
                   r"tokenizer\.model: not the tokenizer .* records 500 pieces"),
    "file size": (edit_manifest(lambda m: m["files"]["valid.bin"].update(bytes=12)),
                  r"valid\.bin: not the file pipeline\.prepare wrote"),
    "format version": (edit_manifest(lambda m: m.update(format_version=2)), r"manifest\.json: format_version 2"),
    "missing key": (edit_manifest(lambda m: m["splits"]["test"].pop("tokens")), r"manifest\.json: no splits\.test\.tokens"),
    "not JSON": (lambda d: (d / "manifest.json").write_text('{"format_version": 1,'), r"manifest\.json:1:\d+: not valid JSON"),
    "not an object": (lambda d: (d / "manifest.json").write_text("[]"), r"manifest\.json: a JSON list, expected an object"),
}


@pytest.mark.parametrize("case", MANIFEST)
def test_manifest_that_does_not_match_is_an_error(data, case):
    apply, message = MANIFEST[case]
    apply(data)
    with pytest.raises(ValueError, match=message):
        open_prepared(str(data))


def test_missing_manifest_says_prepare_first(data):
    os.remove(data / "manifest.json")
    with pytest.raises(FileNotFoundError, match="no manifest.json; prepare it first"):
        open_prepared(str(data))


# --- token ids and the tokenizer -------------------------------------------------------------------------

def test_ids_beyond_the_vocabulary_are_an_error_at_open(data):
    rewrite_split(data, "test", np.array([5, 6, 405, 7], np.uint16), [2, 2])
    with pytest.raises(DataError, match=r"test\.bin: token id 405 at position 2 is not below .* size 400"):
        open_prepared(str(data))


def test_ids_beyond_the_vocabulary_in_the_middle_need_the_full_scan(data):
    # Open checks the ids at each end of a split; one in the middle of a large shard is found by --verify.
    ids = np.full(400_000, 9, np.uint16)
    ids[200_000] = 65000
    rewrite_split(data, "train", ids, [100_000] * 4)
    opened = open_prepared(str(data))
    with pytest.raises(DataError, match=r"train\.bin: token id 65000 at position 200000"):
        verify_contents(opened)


def test_damage_between_sampled_blocks_needs_the_full_checksum(data):
    # The sampled fingerprint reads 16 blocks of 64 KiB; damage between two of them is caught by the full sha256.
    rewrite_split(data, "train", np.full(2_000_000, 9, np.uint16), [500_000] * 4)
    size = os.path.getsize(data / "train.bin")
    stride = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
    patch(data / "train.bin", SAMPLE_BYTES + (stride - SAMPLE_BYTES) // 2, b"\x0a\x00")  # between blocks 0 and 1
    opened = open_prepared(str(data))
    with pytest.raises(DataError, match=r"train\.bin: its sha256 differs .*damaged or was replaced"):
        verify_contents(opened)


def test_inspect_data_verify_is_the_full_scan(data, capsys):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import inspect_data

    assert inspect_data.main([str(data), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    ids = np.full(300_000, 3, np.uint16)
    ids[150_000] = 4096
    rewrite_split(data, "valid", ids, [150_000, 150_000])
    assert inspect_data.main([str(data)]) == 0  # the cheap checks at open pass
    capsys.readouterr()
    assert inspect_data.main([str(data), "--verify"]) == 2
    assert f"inspect_data: error: {data / 'valid.bin'}: token id 4096 at position 150000" in capsys.readouterr().err


def test_replaced_tokenizer_is_an_error_wherever_it_is_loaded(data, other_tokenizer, tmp_path, capsys):
    shutil.copy(other_tokenizer, data / "tokenizer.model")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not the tokenizer .* was prepared with .*--overwrite"):
        open_prepared(str(data))
    with pytest.raises(TokenizerError, match="not the tokenizer"):
        Tokenizer.load(str(data))
    # A later prepare that reuses the folder's tokenizer (--tokenizer DIR) refuses it too, and writes nothing.
    corpus = tmp_path / "more.jsonl"
    corpus.write_text('{"text": "more text"}\n')
    out = tmp_path / "more"
    assert prepare.main(["--input", str(corpus), "--output", str(out), "--tokenizer", str(data), "--quiet"]) == 2
    assert "not the tokenizer" in capsys.readouterr().err and not out.exists()


def test_damaged_tokenizer_file_names_it(data):
    (data / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a SentencePiece model"):
        open_prepared(str(data))


def test_model_folder_with_another_tokenizer_is_an_error(data, other_tokenizer, tmp_path):
    model_dir = tmp_path / "hf"
    Tokenizer.load(str(other_tokenizer)).save_hf(str(model_dir))
    tokenizer = open_prepared(str(data)).tokenizer
    with pytest.raises(DataError, match=r"--model .*hf: its tokenizer is not the data's \(400 vs 400 pieces"):
        check_model_tokenizer(str(model_dir), tokenizer, "--model", "the data's", "use another model")
    same = tmp_path / "same"
    tokenizer.save_hf(str(same))
    check_model_tokenizer(str(same), tokenizer, "--model", "the data's", "use another model")  # no error
    check_model_tokenizer(str(tmp_path), tokenizer, "--model", "the data's", "use another model")  # no tokenizer


# --- at stage start, before any process group ------------------------------------------------------------

def llama_config(folder, vocab_size: int, architecture: str = "LlamaForCausalLM") -> None:
    """A model folder's config.json (no weights: the checks under test come before any are loaded)."""
    os.makedirs(folder, exist_ok=True)
    config = {"model_type": "llama", "architectures": [architecture], "vocab_size": vocab_size, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "id2label": {"0": "negative", "1": "positive"},
              "label2id": {"negative": 0, "positive": 1}, "pad_token_id": 0}
    (folder / "config.json").write_text(json.dumps(config))


def run_stage(module, argv, monkeypatch, capsys, stage):
    """The stage's `__main__` in this process: `run_main(main, STAGE)` with these arguments."""
    from pipeline.cli import run_main

    monkeypatch.setattr(sys, "argv", [stage, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, stage)
    return exit_info.value.code, capsys.readouterr().err


def test_pretrain_refuses_damaged_data_before_starting(data, tmp_path, monkeypatch, capsys):
    truncate(data / "valid.bin", 4)
    run = tmp_path / "run"
    code, err = run_stage(pretrain, ["--data", data, "--deepspeed_config", ZERO0, "--output", run, "--train-steps", 1],
                          monkeypatch, capsys, "pretrain")
    assert code == 2 and f"pretrain: error: {data / 'valid.bin'}" in err and REPAIR in err
    assert not run.exists()


def test_pretrain_refuses_a_model_whose_tokenizer_is_not_the_datas(data, other_tokenizer, tmp_path, monkeypatch,
                                                                   capsys):
    model_dir = tmp_path / "hf"
    llama_config(model_dir, 400)
    Tokenizer.load(str(other_tokenizer)).save_hf(str(model_dir))
    run = tmp_path / "run"
    argv = ["--data", data, "--model", model_dir, "--deepspeed_config", ZERO0, "--output", run, "--train-steps", 1]
    code, err = run_stage(pretrain, argv, monkeypatch, capsys, "pretrain")
    assert code == 2 and f"--model {model_dir}: its tokenizer is not the tokenizer of --data {data}" in err
    assert not run.exists()


def test_pretrain_refuses_a_model_with_fewer_embeddings_than_ids(data, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "small_vocab"
    llama_config(model_dir, 300)
    argv = ["--data", data, "--model", model_dir, "--deepspeed_config", ZERO0, "--output", tmp_path / "run",
            "--train-steps", 1]
    code, err = run_stage(pretrain, argv, monkeypatch, capsys, "pretrain")
    assert code == 2 and "its vocabulary has 300 entries but the data's tokenizer has 400" in err


def test_finetune_refuses_a_tokenizer_that_is_not_the_models(data, other_tokenizer, tmp_path, monkeypatch, capsys):
    from pipeline import finetune

    init = tmp_path / "init"
    llama_config(init, 400, "LlamaForSequenceClassification")
    Tokenizer.load(str(data)).save_hf(str(init))
    other = tmp_path / "other"
    os.makedirs(other)
    shutil.copy(other_tokenizer, other / "tokenizer.model")
    sentiment = os.path.join(REPO, "data", "sentiment")
    argv = ["--train", os.path.join(sentiment, "train.jsonl"), "--valid", os.path.join(sentiment, "valid.jsonl"),
            "--init", init, "--deepspeed_config", ZERO0, "--output", tmp_path / "run"]
    code, err = run_stage(finetune, [*argv, "--tokenizer", other], monkeypatch, capsys, "finetune")
    assert code == 2 and f"--init {init}: its tokenizer is not --tokenizer {other}" in err
    assert "leave out --tokenizer" in err and not (tmp_path / "run").exists()


def test_compress_refuses_data_of_another_tokenizer(data, other_tokenizer, tmp_path, monkeypatch, capsys):
    from pipeline import compress

    init = tmp_path / "init"
    llama_config(init, 400)
    Tokenizer.load(str(other_tokenizer)).save_hf(str(init))
    argv = ["--init", init, "--data", data, "--deepspeed_config",
            os.path.join(REPO, "ds_configs", "compression", "int8_ptq.json"), "--output", tmp_path / "run"]
    code, err = run_stage(compress, argv, monkeypatch, capsys, "compress")
    assert code == 2 and f"--init {init}: its tokenizer is not the tokenizer of --data {data}" in err
