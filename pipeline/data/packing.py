"""Training samples from token shards: documents packed into fixed windows, blended, resumable.

Packing lays the documents of a split end to end with an EOS token after each and cuts the stream
into windows of `seq_length` tokens (no padding; a document may span two windows). Blending draws
from several prepared folders by weight. The whole sample order is a pure function of the seed and
a small counter state, so a checkpoint that stores `state()` resumes on exactly the next sample,
at any world size.
"""
from __future__ import annotations

import numpy as np

from pipeline.data.shards import TokenShards


class PackedWindows:
    """One split's documents + EOS separators cut into `len(self)` windows of `seq_length` tokens."""

    def __init__(self, shards: TokenShards, seq_length: int, eos_id: int):
        self.shards, self.seq_length, self.eos_id = shards, seq_length, eos_id
        n_docs = len(shards)
        # Document d starts at offsets[d] + d in the stream (one EOS after each earlier document).
        self.starts = shards.offsets[:-1].astype(np.int64) + np.arange(n_docs, dtype=np.int64)
        self.stream_length = shards.num_tokens + n_docs
        self.num_windows = self.stream_length // seq_length

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, k: int) -> np.ndarray:
        """Window k as int64 ids, shape (seq_length,)."""
        if not 0 <= k < self.num_windows:
            raise IndexError(f"window {k} of {self.num_windows}")
        out = np.empty(self.seq_length, dtype=np.int64)
        pos, filled = k * self.seq_length, 0
        d = int(np.searchsorted(self.starts, pos, side="right")) - 1
        offsets, tokens = self.shards.offsets, self.shards.tokens
        while filled < self.seq_length:
            begin, end = int(offsets[d]), int(offsets[d + 1])
            inner = pos - int(self.starts[d])  # position inside "document d + EOS"
            take = min(end - begin - inner, self.seq_length - filled)
            if take > 0:
                out[filled:filled + take] = tokens[begin + inner:begin + inner + take]
                filled += take
                pos += take
            if filled < self.seq_length:  # reached the EOS after document d
                out[filled] = self.eos_id
                filled += 1
                pos += 1
                d += 1
        return out


def check_windows(folders: list[str], seq_length: int, eos_id: int) -> list[str]:
    """Before any process group starts: every folder's train split must hold one `seq_length` window (else a
    ValueError, the one BlendedSampler would raise later); when the valid or test splits of all folders hold
    none, that split is evaluated on nothing and its loss is null in summary.json: one warning each, saying why."""
    warnings = []
    for split in ("train", "valid", "test"):
        packed = [PackedWindows(TokenShards(folder, split), seq_length, eos_id) for folder in folders]
        short = [p for p in packed if len(p) == 0]
        if split == "train" and short:
            raise ValueError(f"{short[0].shards.bin_path}: {short[0].stream_length} tokens (documents and their EOS), "
                             f"fewer than one window of --seq-length {seq_length}; lower --seq-length or add data")
        if split != "train" and len(short) == len(packed):
            tokens = ", ".join(f"{p.shards.bin_path}: {p.stream_length}" for p in packed)
            warnings.append(f"the {split} split has fewer tokens (documents and their EOS) than one window of "
                            f"--seq-length {seq_length} ({tokens}): no {split} loss, summary.json "
                            f"{'eval' if split == 'valid' else 'test'}_loss is null; lower --seq-length, or prepare "
                            f"with a larger --{split}-fraction")
    return warnings


class BlendedSampler:
    """The global sample order over several packed datasets, by weight, shuffled per epoch.

    Sample n goes to the dataset whose share is furthest behind its weight (w_i * (n + 1) - taken_i
    largest): exact proportions at every prefix, no randomness needed. Within a dataset, epoch e
    visits windows in a permutation seeded by (seed, dataset, e). State: samples taken per dataset.
    """

    def __init__(self, datasets: list[PackedWindows], weights: list[float], seed: int):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} data folders but {len(weights)} weights")
        for ds in datasets:
            if len(ds) == 0:
                raise ValueError(f"{ds.shards.bin_path}: {ds.stream_length} tokens, fewer than one window of "
                                 f"{ds.seq_length}; lower --seq-length or add data")
        total = float(sum(weights))
        if total <= 0 or min(weights) < 0:
            raise ValueError(f"data weights must be non-negative with a positive sum, got {weights}")
        self.datasets, self.seed = datasets, seed
        self.weights = np.asarray(weights, dtype=np.float64) / total
        self.taken = np.zeros(len(datasets), dtype=np.int64)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def state(self) -> dict:
        return {"taken": self.taken.tolist()}

    def load_state(self, state: dict) -> None:
        taken = np.asarray(state["taken"], dtype=np.int64)
        if taken.shape != self.taken.shape:
            raise ValueError(f"checkpoint was written with {taken.size} data folders, this run has {self.taken.size}")
        self.taken = taken

    @property
    def samples(self) -> int:
        return int(self.taken.sum())

    def _permutation(self, i: int, epoch: int) -> np.ndarray:
        key = (i, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != i}  # keep one epoch each
            rng = np.random.default_rng([self.seed, i, epoch])
            self._perm_cache[key] = rng.permutation(len(self.datasets[i]))
        return self._perm_cache[key]

    def next_samples(self, count: int) -> list[tuple[int, int, int]]:
        """The next `count` samples as (sample number, dataset, window); advances the state."""
        out = []
        for _ in range(count):
            n = self.samples
            i = int(np.argmax(self.weights * (n + 1) - self.taken))
            epoch, j = divmod(int(self.taken[i]), len(self.datasets[i]))
            out.append((n, i, int(self._permutation(i, epoch)[j])))
            self.taken[i] += 1
        return out


def mask_for_mlm(ids: np.ndarray, rng: np.random.Generator, mask_id: int, vocab_size: int,
                 special_ids: list[int], probability: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: choose `probability` of the non-special tokens; of those 80% become the mask
    token, 10% a random token, 10% stay. Returns (input_ids, labels) with labels -100 where unchosen."""
    ids = ids.copy()
    labels = np.full_like(ids, -100)
    candidates = ~np.isin(ids, special_ids)
    chosen = (rng.random(ids.shape) < probability) & candidates
    labels[chosen] = ids[chosen]
    roll = rng.random(ids.shape)
    ids[chosen & (roll < 0.8)] = mask_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    ids[randomize] = rng.integers(0, vocab_size, size=int(randomize.sum()))
    return ids, labels
