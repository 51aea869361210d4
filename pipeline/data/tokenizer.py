"""The tokenizer: train a SentencePiece model, or load one, or load a HuggingFace tokenizer folder.

    tok = Tokenizer.train(texts, vocab_size=8000)          # SentencePiece, BPE (model_type="unigram" on request)
    tok = Tokenizer.load("data/")                           # a prepared folder, a .model file or an HF folder
    ids = tok.encode_batch(["Hello  world\\n"]); tok.decode(ids[0]) == "Hello  world\\n"
    tok.save("data/")                                       # data/tokenizer.model (or data/tokenizer/ for HF)
    tok.save_hf("run/hf")                                   # AutoTokenizer.from_pretrained("run/hf") gives the same ids

A trained model is lossless on the text it is given: no normalisation (the "identity" rule), no dummy
prefix, no whitespace collapsing, whitespace-only pieces allowed, "\\n" a piece of its own, and byte
fallback for any character outside the vocabulary (emoji, rare scripts), so `decode(encode(t)) == t`.
That includes U+2581 "▁", which SentencePiece uses for a space inside the model: a literal "▁" in the
text is encoded as its three byte pieces <0xE2><0x96><0x81> (the text between two of them is encoded
as usual), which decode back to "▁", here and in the HF export. The cleaning that `pipeline.prepare`
applies before tokenizing (strip the ends of each document, NFKC on request) is the only normalisation.

Training reads all of `texts` but keeps only a deterministic sample of their lines, at most
`sample_bytes` (see `LineSample`), so its memory does not grow with the corpus and the model is the
same in every process: SentencePiece's own sampling is seeded differently in each process.

Pieces of a trained model: 0 <pad>, 1 <unk>, 2 <s> (bos), 3 </s> (eos), 4 <mask> (for masked-LM), 5 "\\n",
then the 256 byte pieces <0x00>..<0xFF>, then the learned pieces. <mask> and "\\n" are user-defined
pieces: the text "<mask>" encodes to the mask id, in SentencePiece and in the HF export alike.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain, compress

import numpy as np
import sentencepiece as spm

PAD, UNK, BOS, EOS, MASK, NEWLINE = "<pad>", "<unk>", "<s>", "</s>", "<mask>", "\n"
MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB = 256 + 6 + 1              # byte pieces + the six special pieces + at least one learned piece
SAMPLE_BYTES = 16 << 20              # train on a sample of at most this much text (see LineSample)
LINE_OVERHEAD = 64                   # bytes a sampled line costs besides its text (Python and SentencePiece objects)
SAMPLE_KEY = b"tokenizer-sample"     # the key of the hash that picks the sampled lines
MAX_LINE_CHARS = 4096                # longer lines are cut for training (SentencePiece skips over-long sentences)
TRAIN_THREADS = 4                    # fixed, not --workers: unigram training results depend on the thread count
SP_MODEL_FILE = "tokenizer.model"
HF_FOLDER = "tokenizer"


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained or loaded, with what to do about it."""


class Tokenizer:
    """What the stages need from a tokenizer; `SentencePieceTokenizer` and `HFTokenizer` implement it."""

    kind: str           # "sentencepiece" or "hf"
    model_type: str     # "bpe", "unigram", or the HF model class
    vocab_size: int
    pad_id: int | None
    unk_id: int | None
    bos_id: int | None
    eos_id: int | None
    mask_id: int | None

    @staticmethod
    def train(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              sample_bytes: int = SAMPLE_BYTES, num_threads: int = 1) -> SentencePieceTokenizer:
        return SentencePieceTokenizer.train(texts, vocab_size, model_type, sample_bytes, num_threads)

    @staticmethod
    def load(path: str, num_threads: int = 1) -> Tokenizer:
        """Load a prepared data folder (DIR/tokenizer.model or DIR/tokenizer/), a SentencePiece .model file, or a
        HuggingFace tokenizer folder (local files only, no remote code). The tokenizer of a prepared folder must be
        the one its manifest.json records (the shards hold that tokenizer's ids): a replaced or damaged one is an
        error here, whichever stage loads it."""
        if os.path.isdir(path):
            names = set(os.listdir(path))
            if names & {"tokenizer.json", "tokenizer_config.json"}:
                return HFTokenizer(path)
            if SP_MODEL_FILE in names:
                file = os.path.join(path, SP_MODEL_FILE)
                return _check_recorded(SentencePieceTokenizer.from_file(file, num_threads), file, path)
            if os.path.isdir(os.path.join(path, HF_FOLDER)):
                folder = os.path.join(path, HF_FOLDER)
                return _check_recorded(HFTokenizer(folder), folder, path)
            raise TokenizerError(f"{path}: no tokenizer here (expected {SP_MODEL_FILE}, a {HF_FOLDER}/ folder, or "
                                 "an HF tokenizer folder with tokenizer.json or tokenizer_config.json)")
        if os.path.isfile(path):
            return SentencePieceTokenizer.from_file(path, num_threads)
        raise TokenizerError(f"{path}: no such tokenizer file or folder")

    # The interface; see the implementations for details.
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, lengths): the ids of all `texts` back to back (int32) and the number of ids of each (int64)."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return tokens, lengths

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def vocabulary(self) -> dict[str, int]:
        """piece -> id: two tokenizers with the same vocabulary give the same ids to the same pieces."""
        raise NotImplementedError

    def special_ids(self) -> dict[str, int | None]:
        return {"pad": self.pad_id, "unk": self.unk_id, "bos": self.bos_id, "eos": self.eos_id, "mask": self.mask_id}

    def save(self, directory: str) -> str:
        raise NotImplementedError

    def save_hf(self, directory: str) -> None:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, num_threads: int = 1):
        self.model_proto = model_proto
        self.num_threads = num_threads
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise TokenizerError(f"not a SentencePiece model ({e})") from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (None if i < 0 else i for i in
                                                              (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()))
        mask = sp.piece_to_id(MASK)
        self.mask_id = None if mask == sp.unk_id() else mask
        proto = _parse_proto(model_proto)
        self.model_type = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "?") \
            if proto is not None else "?"
        # The byte pieces of a literal "▁", for models where that keeps it (see `_keeps_literal_space`).
        self._space_ids = ([sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode()]
                           if proto is not None and _keeps_literal_space(proto) else None)
        self._chunks = (_ChunkCache(self.encode_batch) if self._space_ids is not None and _chunk_cache_is_exact(proto)
                        else None)

    @classmethod
    def from_file(cls, path: str, num_threads: int = 1) -> SentencePieceTokenizer:
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls(data, num_threads)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
              sample_bytes: int = SAMPLE_BYTES, num_threads: int = 1) -> SentencePieceTokenizer:
        """Train on `texts`: each is cut into lines ("\\n" is a fixed piece, and a literal "▁" is never seen by the
        model, see the module doc), of which a deterministic sample of at most `sample_bytes` is kept
        (`LineSample`). Memory is about that sample, a few times over while SentencePiece trains, whatever the
        size of `texts`; the same texts give the same model, byte for byte, in any process."""
        if model_type not in MODEL_TYPES:
            raise TokenizerError(f"model type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        if vocab_size < MIN_VOCAB:
            raise TokenizerError(f"vocabulary size {vocab_size} is too small: byte fallback takes 256 pieces and the "
                                 f"special pieces 6, so it must be at least {MIN_VOCAB}")
        sample = LineSample(sample_bytes)
        for text in texts:
            sample.add_text(text)
        if not sample.lines:
            raise TokenizerError("no text to train the tokenizer on (every line is empty)")
        lines = sample.lines
        del sample  # `_handed_over` then holds the only reference to the lines
        model = io.BytesIO()
        try:
            # input_sentence_size=0: SentencePiece takes every line given; it would sample with a seed of its own.
            spm.SentencePieceTrainer.train(
                sentence_iterator=_handed_over(lines), model_writer=model,
                vocab_size=vocab_size, model_type=model_type,
                pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
                user_defined_symbols=[MASK, NEWLINE], byte_fallback=True,
                normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=False, character_coverage=0.9995,
                input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=4 * MAX_LINE_CHARS,  # bytes; a character is at most 4 UTF-8 bytes
                num_threads=TRAIN_THREADS, minloglevel=2)
        except RuntimeError as e:
            raise TokenizerError(_explain_training_error(str(e), vocab_size)) from None
        return cls(model.getvalue(), num_threads)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # SentencePiece encodes a list in C++ on `num_threads` threads; the result does not depend on the count.
        texts = list(texts)
        ids = self.sp.encode(texts, num_threads=self.num_threads)
        if self._space_ids is not None:
            for i, text in enumerate(texts):
                if SPACE in text:  # rare: encode again, keeping each literal "▁" as its bytes
                    ids[i] = self._encode_literal_spaces(text)
        return ids

    def _encode_literal_spaces(self, text: str) -> list[int]:
        """The parts of `text` between its literal "▁" encoded as usual, joined by the byte pieces of "▁"."""
        parts = self.sp.encode(text.split(SPACE))
        ids = parts[0]
        for part in parts[1:]:
            ids += self._space_ids
            ids += part
        return ids

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._chunks is not None:
            return self._chunks.encode_flat(texts)
        return super().encode_flat(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def vocabulary(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_proto).hexdigest()

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, SP_MODEL_FILE)
        with open(path, "wb") as f:
            f.write(self.model_proto)
        return path

    def save_hf(self, directory: str) -> None:
        """Write tokenizer.json and tokenizer_config.json: a `tokenizers` model built from the SentencePiece pieces
        (BPE with merges ranked by piece score, or Unigram with the piece scores; byte fallback; " " as "▁";
        user-defined pieces kept whole) that encodes text to the same ids as SentencePiece. Three known corner cases:
        unigram ties (two splits with the same score, as in "**********") may break the other way, with the same
        pieces; for BPE, a text between two newlines (or <mask>) that is exactly a special or byte piece's
        name, such as a line "<s>", maps to that piece; and a literal "▁" encodes as a space there (`tokenizers`
        cannot send one character to chosen byte pieces) where this tokenizer gives its three byte pieces.
        Decoding is the same in both: the ids of this tokenizer decode to the same text, "▁" included.

        `split_special_tokens=True`: a "<s>" typed in the text is text, as it was for the shards; insert special
        tokens by id (`tok.bos_token_id`). "<mask>" is a user-defined piece and maps to its id either way."""
        from transformers import PreTrainedTokenizerFast  # lazy: transformers takes seconds to import

        proto = _parse_proto(self.model_proto)
        if proto is None:
            raise TokenizerError("save_hf needs the protobuf package to read the SentencePiece model")
        fast = PreTrainedTokenizerFast(
            tokenizer_object=_hf_backend(proto), clean_up_tokenization_spaces=False, split_special_tokens=True,
            **{name: proto.pieces[i].piece for name, i in
               (("pad_token", self.pad_id), ("unk_token", self.unk_id), ("bos_token", self.bos_id),
                ("eos_token", self.eos_id), ("mask_token", self.mask_id)) if i is not None})
        fast.save_pretrained(directory)


class HFTokenizer(Tokenizer):
    """A HuggingFace tokenizer folder, through `AutoTokenizer` (local files only, no remote code). Ids are what that
    tokenizer gives without special tokens; whether decode gives the text back exactly depends on the tokenizer."""

    kind = "hf"

    def __init__(self, path: str):
        from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises OSError, ValueError, ... for an unusable folder
            raise TokenizerError(f"{path}: cannot load as a HuggingFace tokenizer ({e})") from None
        tok = self.tok
        self.path = path
        self.model_type = type(tok).__name__
        self.vocab_size = len(tok)
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.mask_id = (
            tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id)
        self._fingerprint: str | None = None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def vocabulary(self) -> dict[str, int]:
        return self.tok.get_vocab()

    @property
    def fingerprint(self) -> str:
        # The hash of what save_pretrained writes: it names the tokenizer, not the other files of a model folder.
        if self._fingerprint is None:
            with tempfile.TemporaryDirectory() as tmp:
                self.tok.save_pretrained(tmp)
                self._fingerprint = folder_sha256(tmp)
        return self._fingerprint

    def save(self, directory: str) -> str:
        path = os.path.join(directory, HF_FOLDER)
        self.tok.save_pretrained(path)
        return path

    def save_hf(self, directory: str) -> None:
        self.tok.save_pretrained(directory)


def _check_recorded(tok: Tokenizer, where: str, folder: str) -> Tokenizer:
    """`tok`, loaded from `where` in the prepared folder `folder`, if it is the tokenizer that folder's manifest.json
    records; a folder without manifest.json (a tokenizer saved by hand) is taken as it is."""
    import json  # here, not at the top: only prepared folders need it

    manifest = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest):
        return tok
    try:
        with open(manifest, encoding="utf-8") as f:
            recorded = json.load(f)["tokenizer"]
        sha256, vocab_size = recorded["sha256"], recorded["vocab_size"]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, bad UTF-8, a missing key or a non-object
        raise TokenizerError(f"{manifest}: unreadable, or it has no tokenizer sha256 and vocab_size ({e!r}); "
                             "re-run `python -m pipeline.prepare` with --overwrite to rewrite the folder") from None
    if tok.fingerprint != sha256 or tok.vocab_size != vocab_size:
        raise TokenizerError(
            f"{where}: not the tokenizer {folder} was prepared with ({tok.vocab_size} pieces, sha256 "
            f"{tok.fingerprint[:16]}...; {manifest} records {vocab_size} pieces, sha256 {str(sha256)[:16]}...): it was "
            "replaced or damaged after the shards were written, and their ids belong to the recorded one. Put the "
            "original back, or re-run `python -m pipeline.prepare` with --overwrite to tokenize the data with this one")
    return tok


def folder_sha256(path: str) -> str:
    """sha256 over the relative names and bytes of the files under `path`, in sorted order."""
    digest = hashlib.sha256()
    for name in sorted(os.path.relpath(os.path.join(root, n), path) for root, _, names in os.walk(path) for n in names):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


class LineSample:
    """A deterministic sample of training lines, at most `max_bytes` of them, taken in one streaming pass.

    The training sentences are the lines of each text, not whole texts: "\\n" is a fixed piece anyway, and
    SentencePiece drops sentences longer than max_sentence_length, so long lines are cut into MAX_LINE_CHARS
    pieces rather than lost. A literal "▁" also ends a sentence: encoding never shows one to the model.

    A line is kept when a keyed 64-bit blake2b of it is below a threshold. The threshold starts above every hash
    and drops by a quarter (the lines above it are let go) whenever the kept lines pass `max_bytes`, so the sample
    ends up between about 3/4 and all of `max_bytes`. Which lines are kept depends only on the lines themselves,
    never on the order, the process or a random seed; they are kept in their input order. Each line counts its
    UTF-8 bytes plus LINE_OVERHEAD (what holding it costs in Python, then in SentencePiece), so a corpus of very
    short lines is bounded too.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.below = 2**64             # keep the lines whose hash is below this
        self.lines: list[bytes] = []   # UTF-8: smaller than str, and SentencePiece takes bytes as they are
        self.hashes = array("Q")
        self.bytes = 0

    def add_text(self, text: str) -> None:
        for line in re.split("[\n▁]", text):
            for start in range(0, len(line), MAX_LINE_CHARS):
                self.add(line[start:start + MAX_LINE_CHARS])

    def add(self, line: str) -> None:
        if not line:
            return  # an empty sentence teaches SentencePiece nothing
        data = line.encode("utf-8", "surrogatepass")
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=SAMPLE_KEY).digest(), "little")
        if h >= self.below:
            return
        self.lines.append(data)
        self.hashes.append(h)
        self.bytes += len(data) + LINE_OVERHEAD
        while self.bytes > self.max_bytes:
            self.below = self.below * 3 // 4  # reaches 0 (nothing kept) in the end, so the loop always stops
            keep = [kept < self.below for kept in self.hashes]
            self.lines = list(compress(self.lines, keep))
            self.hashes = array("Q", compress(self.hashes, keep))
            self.bytes = sum(map(len, self.lines)) + LINE_OVERHEAD * len(self.lines)


def _handed_over(lines: list) -> Iterator:
    """Yield the items of `lines`, dropping each from the list once yielded: SentencePiece copies every line as it
    reads it, and this way the Python copy shrinks as its copy grows instead of both being held in full."""
    for i in range(len(lines)):
        item, lines[i] = lines[i], None
        yield item


def _explain_training_error(message: str, vocab_size: int) -> str:
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (f"vocabulary size {vocab_size} is too large for this corpus: it only supports {too_high.group(2)} "
                "pieces; lower --vocab-size or give more text")
    too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (f"vocabulary size {vocab_size} is too small for this corpus: its characters and the special and "
                f"byte pieces need at least {too_small.group(2)}")
    if "empty" in message.lower() or "no sentence" in message.lower():
        return f"no text to train the tokenizer on ({message})"
    return f"SentencePiece training failed: {message}"


def _parse_proto(model_proto: bytes):
    """The ModelProto message, or None when protobuf is not installed (only the fast path and save_hf need it)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    return proto


# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE, UNUSED = 1, 2, 3, 4, 5, 6
SPACE = "▁"


def _hf_backend(proto):
    """A `tokenizers.Tokenizer` equivalent to a lossless SentencePiece model of this module."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE, Unigram

    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if norm.add_dummy_prefix or norm.remove_extra_whitespaces or norm.precompiled_charsmap:
        raise TokenizerError("save_hf supports SentencePiece models without normalisation, dummy prefix or "
                             "whitespace removal (the models this module trains)")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if spec.model_type == 2:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        # SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scored piece (leftmost on
        # ties); `tokenizers` BPE applies the lowest-ranked merge: rank every way to split a learned piece into two
        # learned pieces by the score of the whole piece.
        normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
        ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        model = BPE(vocab=vocab, merges=[(left, right) for _, _, left, right in ranked], unk_token=spec.unk_piece,
                    fuse_unk=True, byte_fallback=spec.byte_fallback, ignore_merges=True)
    elif spec.model_type == 1:
        # SentencePiece never matches control, unknown or byte pieces in text; `tokenizers` Unigram would match a
        # literal "<s>" or "<0x41>" (score 0, the best there is). A score no path can afford rules them out.
        scores = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else -1e9) for p in proto.pieces]
        model = Unigram(scores, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback)
    else:
        raise TokenizerError("save_hf supports SentencePiece BPE and unigram models")
    backend = Backend(model)
    backend.normalizer = normalizers.Replace(" ", SPACE)
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if user_defined:
        # SentencePiece matches user-defined pieces first and never merges them.
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    return backend


def _keeps_literal_space(proto) -> bool:
    """Whether a literal "▁" can be kept as its byte pieces: the model has byte pieces, and it sees the text as
    given (no normalisation rule, no dummy prefix, no whitespace removal), so encoding the parts between the
    "▁" one by one changes nothing else. Other models (an external one with a dummy prefix, say) keep
    SentencePiece's own behaviour: a literal "▁" decodes as a space."""
    norm = proto.normalizer_spec
    return (proto.trainer_spec.byte_fallback and norm.escape_whitespaces and not norm.add_dummy_prefix
            and not norm.remove_extra_whitespaces and not norm.precompiled_charsmap)


def _chunk_cache_is_exact(proto) -> bool:
    """Whether encoding chunk by chunk (see `_ChunkCache`) gives exactly SentencePiece's ids for this model.

    SentencePiece BPE only merges neighbours whose concatenation is a piece, so the text can be cut wherever no
    piece can straddle the cut, and each part encoded alone. The chunks cut before a run of spaces and around
    "\\n"; that is exact when no piece holds a "▁" after another character or a "\\n" inside it, the text reaches
    the model unchanged (identity rule, no dummy prefix) and unknown characters fall back to bytes (no run of
    unknowns fused across a cut). Unigram is left to SentencePiece: its Viterbi sums could tie differently.
    """
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if (spec.model_type != 2 or not spec.byte_fallback or not spec.split_by_whitespace
            or spec.treat_whitespace_as_suffix or norm.add_dummy_prefix or norm.remove_extra_whitespaces
            or norm.precompiled_charsmap or not norm.escape_whitespaces):
        return False
    for p in proto.pieces:
        if p.type == USER_DEFINED and p.piece != NEWLINE and (SPACE in p.piece or NEWLINE in p.piece):
            return False
        if p.type == NORMAL and (NEWLINE in p.piece or SPACE in p.piece.lstrip(SPACE)):
            return False
    return any(p.type == USER_DEFINED and p.piece == NEWLINE for p in proto.pieces)


# A chunk is a run of spaces, the word after it (no spaces, no newline) and the newlines after that, or a literal
# "▁" alone; every character matches one branch, so the chunks of a text join back to exactly the text. A cut
# before a run of spaces or next to a newline is one no piece straddles (checked in `_chunk_cache_is_exact`); a
# cut next to a literal "▁" is one that encoding makes anyway (`SentencePieceTokenizer._encode_literal_spaces`).
_CHUNK = re.compile(r" *[^ ▁\n]+\n*| +\n*|\n+|▁")


class _ChunkCache:
    """Encodes text as the concatenation of its cached chunk encodings (see `_chunk_cache_is_exact`).

    Natural text repeats its words, so nearly every chunk is a dictionary hit and only the new ones go through
    `encode` (the tokenizer's own batch encoding); the ids of a batch are then gathered with numpy. This is 2-3x
    faster than SentencePiece on whole documents and gives the same ids. The cache is cleared when it reaches
    `max_entries` chunks (about 100 bytes each) or `max_tokens` ids, so memory stays bounded whatever the corpus.
    """

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], max_entries: int = 100_000,
                 max_tokens: int = 1_000_000):
        self.encode, self.max_entries, self.max_tokens = encode, max_entries, max_tokens
        self.clear()

    def clear(self) -> None:
        self.index: dict[str, int] = {}         # chunk -> entry
        self.flat = np.zeros(1 << 16, np.int32)  # ids of all entries back to back, grown by doubling
        self.starts = np.zeros(1 << 12, np.int64)
        self.lengths = np.zeros(1 << 12, np.int64)
        self.used = 0                            # ids stored in `flat`

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if len(self.index) > self.max_entries or self.used > self.max_tokens:
            self.clear()  # the bound holds to within one batch: a batch only adds its own new chunks
        chunk_lists = list(map(_CHUNK.findall, texts))
        counts = np.fromiter(map(len, chunk_lists), dtype=np.int64, count=len(chunk_lists))
        chunks = list(chain.from_iterable(chunk_lists))
        missing = set(chunks).difference(self.index)  # the order of new entries does not matter to the ids
        if missing:
            missing = list(missing)
            self._add(missing, self.encode(missing))
        entries = np.array(list(map(self.index.__getitem__, chunks)), dtype=np.int64)
        # Gather: chunk j of the batch contributes flat[starts[e_j] : starts[e_j] + lengths[e_j]].
        lengths = self.lengths[entries]
        ends = np.cumsum(lengths)
        positions = np.repeat(self.starts[entries] - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
        tokens = self.flat[positions]
        # Ids per text: sum the chunk lengths of each text (texts with no chunks, i.e. "", get 0).
        cum = np.concatenate(([0], ends))
        doc_ends = np.cumsum(counts)
        return tokens, cum[doc_ends] - cum[doc_ends - counts]

    def _add(self, chunks: list[str], ids: list[list[int]]) -> None:
        n, first = len(self.index), self.used
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        total = int(lengths.sum())
        self.flat = _grown(self.flat, self.used + total)
        self.flat[self.used:self.used + total] = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
        self.used += total
        self.starts = _grown(self.starts, n + len(chunks))
        self.lengths = _grown(self.lengths, n + len(chunks))
        self.lengths[n:n + len(chunks)] = lengths
        self.starts[n:n + len(chunks)] = first + np.cumsum(lengths) - lengths
        self.index.update(zip(chunks, range(n, n + len(chunks))))


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    if size <= len(array):
        return array
    bigger = np.zeros(max(size, 2 * len(array)), array.dtype)
    bigger[:len(array)] = array
    return bigger


def describe(tok: Tokenizer) -> dict:
    """The tokenizer's entry in manifest.json."""
    return {"kind": tok.kind, "model_type": tok.model_type, "vocab_size": tok.vocab_size,
            "sha256": tok.fingerprint, "special_ids": tok.special_ids(),
            "file": SP_MODEL_FILE if tok.kind == "sentencepiece" else HF_FOLDER + "/"}


__all__ = ["HFTokenizer", "LineSample", "SentencePieceTokenizer", "Tokenizer", "TokenizerError", "describe", "folder_sha256"]
