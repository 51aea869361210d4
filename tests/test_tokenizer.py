"""The tokenizer: lossless round trips, special pieces, the chunk-cache fast path, errors, and the HF export."""
import json
import os
import random
import subprocess
import sys
from pydoc_data.topics import topics

import numpy as np
import pytest

from pipeline.data.tokenizer import (
    LINE_OVERHEAD,
    HFTokenizer,
    LineSample,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = [topics[name] for name in sorted(topics)]
TRICKY = [
    "Hello   world\n\n\tTabs\tand  double  spaces",
    "  leading and trailing spaces  ",
    "\n\nnewlines first and last\n",
    "unicode: café, naïve, Ærø, Ελληνικά, русский, 漢字, العربية",
    "emoji 😀🎉👍🏽 and a zero-width joiner 👩‍💻",
    "a literal <mask> token, <s> and </s> as text",
    "code:\n    def f(x):\n        return x ** 2  # comment\n",
    "\x00\x07 control characters \x1b[0m",
]
LITERAL_SPACES = ["word▁▁\n▁", "literal ▁ piece", "▁", "a▁b", "▁ literal ▁▁ space symbols▁", "▁\n\n▁ <mask>▁"]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    alphabet = list("abcdefgh  \n\t.,:<>éü😀漢") + ["<mask>", "   ", "\n\n", "the ", " of "]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(CORPUS, vocab_size=1000)


@pytest.fixture(scope="module")
def unigram():
    return Tokenizer.train(CORPUS, vocab_size=1000, model_type="unigram")


def test_special_pieces(bpe):
    assert bpe.vocab_size == 1000
    assert bpe.special_ids() == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    assert bpe.encode("\n") == [5]
    assert bpe.encode("<mask>") == [4]
    assert bpe.kind == "sentencepiece" and bpe.model_type == "bpe"


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_decode_gives_the_text_back(name, request):
    tok = request.getfixturevalue(name)
    for text in CORPUS[:20] + TRICKY + random_texts(300) + LITERAL_SPACES:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_a_literal_space_symbol_is_its_three_bytes(name, request):
    tok = request.getfixturevalue(name)
    sp = tok.sp
    space = [sp.piece_to_id(p) for p in ("<0xE2>", "<0x96>", "<0x81>")]
    assert tok.encode("▁") == space
    assert tok.encode("one▁two three") == sp.encode("one") + space + sp.encode("two three")
    assert tok.encode("a ▁") == sp.encode("a ") + space  # the space before it stays a space
    assert tok.encode("no symbol here") == sp.encode("no symbol here")


def test_chunk_cache_gives_sentencepiece_ids(bpe):
    assert bpe._chunks is not None  # the models trained here qualify for the fast path
    texts = CORPUS + TRICKY + random_texts(2000)
    assert bpe.encode_batch(texts) == bpe.sp.encode(texts)  # without a literal "▁", the ids are SentencePiece's
    texts += ["", *LITERAL_SPACES]
    expected = bpe.encode_batch(texts)
    tokens, lengths = bpe.encode_flat(texts)
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert tokens.tolist() == [i for ids in expected for i in ids]
    # A tiny cache that is cleared between batches gives the same ids.
    small = SentencePieceTokenizer(bpe.model_proto)
    small._chunks.max_entries = 50
    again = [small.encode_flat(texts[i:i + 100]) for i in range(0, len(texts), 100)]
    assert np.concatenate([t for t, _ in again]).tolist() == tokens.tolist()


def test_unigram_uses_sentencepiece_directly(unigram):
    assert unigram._chunks is None and unigram.model_type == "unigram"
    tokens, lengths = unigram.encode_flat(TRICKY)
    assert tokens.tolist() == [i for ids in unigram.sp.encode(TRICKY) for i in ids]


def test_batched_encode_does_not_depend_on_threads(bpe):
    texts = CORPUS * 2
    one = SentencePieceTokenizer(bpe.model_proto, num_threads=1).encode_batch(texts)
    four = SentencePieceTokenizer(bpe.model_proto, num_threads=4).encode_batch(texts)
    assert one == four


def test_training_is_deterministic(bpe):
    assert Tokenizer.train(CORPUS, vocab_size=1000).fingerprint == bpe.fingerprint


def test_line_sample_is_bounded_deterministic_and_order_free():
    lines = [f"line {i} of the corpus, {'x' * (i % 50)}" for i in range(20_000)]
    cap = 100_000
    sample = LineSample(cap)
    for line in lines:
        sample.add(line)
    kept = [data.decode() for data in sample.lines]
    assert 0.7 * cap < sum(len(k) + LINE_OVERHEAD for k in kept) <= cap
    assert kept == [line for line in lines if line in set(kept)]  # a subset, in the input order
    again = LineSample(cap)
    for line in reversed(lines):
        again.add(line)
    assert sorted(data.decode() for data in again.lines) == sorted(kept)  # the same lines whatever the order
    texts = LineSample(10**6)
    texts.add_text("one\ntwo▁three\n\n" + "y" * 5000)
    assert texts.lines == [b"one", b"two", b"three", b"y" * 4096, b"y" * 904]  # lines, "▁" ends one too, cut long


TRAIN_SCRIPT = """
import sys
from pydoc_data.topics import topics
from pipeline.data.tokenizer import Tokenizer
texts = [topics[name] for name in sorted(topics)]
sys.stdout.write(Tokenizer.train(texts, vocab_size=600, sample_bytes=100_000).fingerprint)
"""


def test_training_on_a_sample_is_the_same_in_every_process():
    # The help topics have ~10k lines, 465 KB: far more than the 100 KB sample. Two processes, one model.
    runs = [subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], cwd=ROOT, capture_output=True, text=True)
            for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert len(runs[0].stdout) == 64
    assert runs[0].stdout != Tokenizer.train(CORPUS, vocab_size=600).fingerprint  # the sample is not everything


def test_vocab_too_large_and_too_small():
    with pytest.raises(TokenizerError, match="vocabulary size 5000 is too large for this corpus: it only supports"):
        Tokenizer.train(["a tiny corpus", "of two lines"], vocab_size=5000)
    with pytest.raises(TokenizerError, match="too small: byte fallback takes 256 pieces"):
        Tokenizer.train(CORPUS, vocab_size=200)


def test_save_and_load(bpe, tmp_path):
    path = bpe.save(str(tmp_path))
    assert path == str(tmp_path / "tokenizer.model")
    for source in (str(tmp_path), path):
        loaded = Tokenizer.load(source)
        assert loaded.fingerprint == bpe.fingerprint
        assert loaded.encode(TRICKY[0]) == bpe.encode(TRICKY[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer here"):
        Tokenizer.load(str(tmp_path / "empty"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        Tokenizer.load(str(tmp_path / "junk.model"))
    with pytest.raises(TokenizerError, match="no such tokenizer"):
        Tokenizer.load(str(tmp_path / "missing.model"))


# --- the HuggingFace export (imports transformers: a few seconds, once for the module) --------------------

@pytest.fixture(scope="module")
def auto_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer


@pytest.mark.parametrize("name", ["bpe", "unigram"])
def test_save_hf_encodes_like_sentencepiece(name, request, auto_tokenizer, tmp_path):
    tok = request.getfixturevalue(name)
    tok.save_hf(str(tmp_path))
    # A model folder from pretraining also holds a config.json: the tokenizer must still load as written.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hf = auto_tokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    texts = CORPUS + TRICKY + random_texts(300)
    for text in texts:
        ids = tok.encode(text)
        hf_ids = hf(text, add_special_tokens=False)["input_ids"]
        if name == "unigram" and hf_ids != ids:
            # Unigram ties (equal-scoring splits, e.g. of "**********") may break the other way: same pieces.
            assert sorted(hf_ids) == sorted(ids), text[:60]
        else:
            assert hf_ids == ids, text[:60]
        assert hf.decode(ids) == text
        assert hf.decode(hf_ids) == text
    for text in LITERAL_SPACES:
        assert hf.decode(tok.encode(text)) == text  # the same ids give the same text, "▁" included
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(hf) == tok.vocab_size


def test_hf_folder_loads_through_the_wrapper(bpe, auto_tokenizer, tmp_path):
    bpe.save_hf(str(tmp_path / "hf"))
    hf = Tokenizer.load(str(tmp_path / "hf"))
    assert isinstance(hf, HFTokenizer)
    assert hf.encode_batch(TRICKY[:3]) == bpe.encode_batch(TRICKY[:3])
    assert hf.decode(hf.encode(TRICKY[0])) == TRICKY[0]
    assert hf.special_ids() == bpe.special_ids() and hf.vocab_size == bpe.vocab_size
    assert len(hf.fingerprint) == 64 and hf.fingerprint == Tokenizer.load(str(tmp_path / "hf")).fingerprint
    saved = hf.save(str(tmp_path / "data"))
    assert Tokenizer.load(str(tmp_path / "data")).encode(TRICKY[1]) == bpe.encode(TRICKY[1])
    assert saved.endswith("tokenizer")
