"""The prepare stage end to end on tiny corpora: round trip, splits, dedup, workers, formats, bad input, memory."""
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pydoc_data.topics import topics

import numpy as np
import pytest

from pipeline.data import TokenShards
from pipeline.data.tokenizer import Tokenizer
from pipeline.prepare import HashSet, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train", "valid", "test")
PARAGRAPHS = [p for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]
TRICKY = [
    "Tabs\tand  double  spaces,\n\nblank lines\n   and indentation",
    "unicode: café, naïve, Ελληνικά, 漢字 and emoji 😀🎉👩‍💻",
    "a literal <mask> and <s> in text",
]


def run(*argv) -> int:
    return main([str(a) for a in argv] + ["--quiet"])


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({key: text}) + "\n")
    return path


def pydoc_documents(n, seed=0, numbered=False):
    """n documents of 3-6 consecutive help-topic paragraphs (real English). `numbered` makes each unique with a
    title of words that spell its number (so that unique documents do not bring unique words)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(3, 6)
        start = rng.randrange(len(PARAGRAPHS) - k)
        docs.append((title(i) if numbered else "") + "\n\n".join(PARAGRAPHS[start:start + k]).strip())
    return docs


def title(i):
    digits = "zero one two three four five six seven eight nine".split()
    return "Document " + " ".join(digits[int(c)] for c in str(i)) + ".\n\n"


def covering_documents(n):
    """n documents of 4 help-topic paragraphs with a numbered title, taking the paragraphs in turn: the first 652
    documents hold every paragraph once, the next ones repeat them. So 800 and 8000 of them hold the same words
    (and the tokenizer's chunk cache, bounded at 100k chunks by design, fills the same) and differ only in the
    number of documents and bytes: what the memory tests measure."""
    starts = range(0, len(PARAGRAPHS), 4)
    return [title(i) + "\n\n".join(PARAGRAPHS[starts[i % len(starts)]:][:4]).strip() for i in range(n)]


def decoded_splits(directory):
    tok = Tokenizer.load(str(directory))
    return {split: [tok.decode(ids) for ids in _documents(TokenShards(str(directory), split))] for split in SPLITS}


def _documents(shards):
    return [shards[i] for i in range(len(shards))]


def leftovers(parent):
    return sorted(name for name in os.listdir(parent) if name.startswith("."))


# The raw corpus: real paragraphs, tricky texts, duplicates (some only after stripping), empty and short documents.
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = pydoc_documents(150, numbered=True) + TRICKY
    raw = base + [base[0], "  " + base[1] + "\n", base[2], "", "   \n\t ", "tiny", "abc"]
    path = write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", raw)
    expected = list(dict.fromkeys(t.strip() for t in raw if len(t.strip()) >= 5))
    return {"path": path, "raw": raw, "expected": expected}


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data_dir") / "data"
    assert run("--input", corpus["path"], "--output", out, "--vocab-size", 500, "--min-chars", 5,
               "--valid-fraction", 0.1, "--test-fraction", 0.1, "--workers", 1) == 0
    return out


def test_outputs_and_round_trip(data_dir, corpus):
    names = sorted(os.listdir(data_dir))
    assert names == ["manifest.json", "summary.json", "test.bin", "test.idx", "tokenizer.model", "train.bin",
                     "train.idx", "valid.bin", "valid.idx"]
    texts = decoded_splits(data_dir)
    everything = [t for split in SPLITS for t in texts[split]]
    # Every kept document decodes to exactly its cleaned text, and appears in exactly one split.
    assert sorted(everything) == sorted(corpus["expected"])
    assert all(texts[split] for split in SPLITS)
    tok = Tokenizer.load(str(data_dir))
    shards = TokenShards(str(data_dir), "train")
    assert shards[0].tolist() == tok.encode(texts["train"][0])


def test_summary_counts(data_dir, corpus):
    summary = json.loads((data_dir / "summary.json").read_text())
    assert summary["read_documents"] == len(corpus["raw"])
    assert summary["dropped_empty"] == 2
    assert summary["dropped_short"] == 2          # "tiny", "abc" with --min-chars 5
    assert summary["dropped_duplicate"] == 3      # one exact, one only after stripping, one more exact
    assert summary["documents"] == len(corpus["expected"])
    assert summary["bad_lines"] == 0
    assert summary["tokens"] == sum(TokenShards(str(data_dir), s).num_tokens for s in SPLITS)
    assert summary["tokens_per_sec"] > 0 and summary["seconds"] > 0
    assert sum(s["documents"] for s in summary["splits"].values()) == summary["documents"]


def test_manifest(data_dir, corpus):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    model = (data_dir / "tokenizer.model").read_bytes()
    assert manifest["format_version"] == 1
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(model).hexdigest()
    assert manifest["tokenizer"]["vocab_size"] == 500
    assert manifest["tokenizer"]["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4}
    [entry] = manifest["inputs"]
    assert entry["sha256"] == hashlib.sha256(corpus["path"].read_bytes()).hexdigest()
    assert entry["bytes"] == corpus["path"].stat().st_size and entry["format"] == "jsonl"
    assert manifest["args"]["vocab_size"] == 500 and manifest["args"]["min_chars"] == 5
    # How the run went is not what the folder holds: summary.json has the worker count, the manifest none of it.
    assert not {"workers", "output", "overwrite", "quiet", "dry_run"} & set(manifest["args"])
    assert json.loads((data_dir / "summary.json").read_text())["workers"] == 1
    for split in SPLITS:
        shards = TokenShards(str(data_dir), split)
        assert manifest["splits"][split] == {"documents": len(shards), "tokens": shards.num_tokens}


def test_output_is_identical_for_any_worker_count(data_dir, corpus, tmp_path):
    out = tmp_path / "data"
    assert run("--input", corpus["path"], "--output", out, "--vocab-size", 500, "--min-chars", 5,
               "--valid-fraction", 0.1, "--test-fraction", 0.1, "--workers", 2) == 0
    for name in ["tokenizer.model", "manifest.json"] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]:
        assert (out / name).read_bytes() == (data_dir / name).read_bytes(), name


def test_tokenizer_sample_is_the_same_in_every_process(tmp_path):
    # ~280 KB of train text, sampled down to 50 KB, in two processes with different --workers: SentencePiece's
    # own sampling (seeded differently in every process) would make the two tokenizers, and so the shards, differ.
    path = write_jsonl(tmp_path / "c.jsonl", pydoc_documents(300, seed=5, numbered=True))
    outputs = [tmp_path / "w1", tmp_path / "w2"]
    for out, workers in zip(outputs, ("1", "2")):
        done = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--input", str(path), "--output", str(out),
                               "--vocab-size", "400", "--tokenizer-sample-mb", "0.05", "--workers", workers, "--quiet"],
                              cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    for name in ["tokenizer.model", "manifest.json"] + [f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx")]:
        assert (outputs[0] / name).read_bytes() == (outputs[1] / name).read_bytes(), name
    assert run("--input", path, "--output", tmp_path / "all", "--vocab-size", 400, "--workers", 1) == 0
    assert (tmp_path / "all" / "tokenizer.model").read_bytes() != (outputs[0] / "tokenizer.model").read_bytes()
    # Whatever the sample, every document still decodes to its text.
    assert sorted(t for ts in decoded_splits(outputs[0]).values() for t in ts) == \
        sorted(t for ts in decoded_splits(tmp_path / "all").values() for t in ts)


def test_splits_follow_text_and_seed_not_order(data_dir, corpus, tmp_path):
    shuffled = list(corpus["raw"])
    random.Random(1).shuffle(shuffled)
    path = write_jsonl(tmp_path / "shuffled.jsonl", shuffled)
    args = ["--input", path, "--tokenizer", data_dir, "--min-chars", 5, "--valid-fraction", 0.1,
            "--test-fraction", 0.1, "--workers", 1]
    assert run(*args, "--output", tmp_path / "a") == 0
    original, reordered = decoded_splits(data_dir), decoded_splits(tmp_path / "a")
    for split in SPLITS:
        assert sorted(reordered[split]) == sorted(original[split])
    assert run(*args, "--output", tmp_path / "b", "--seed", 7) == 0
    reseeded = decoded_splits(tmp_path / "b")
    assert sorted(reseeded["valid"]) != sorted(original["valid"])
    assert sorted(t for s in SPLITS for t in reseeded[s]) == sorted(corpus["expected"])


def test_split_fractions(data_dir, tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [f"document number {i}" for i in range(2000)])
    assert run("--input", path, "--output", tmp_path / "out", "--tokenizer", data_dir,
               "--valid-fraction", 0.2, "--test-fraction", 0.1, "--workers", 1) == 0
    splits = json.loads((tmp_path / "out" / "summary.json").read_text())["splits"]
    assert 320 < splits["valid"]["documents"] < 480   # 400 expected; the hash is uniform
    assert 140 < splits["test"]["documents"] < 260    # 200 expected
    assert sum(s["documents"] for s in splits.values()) == 2000


def test_every_format_and_globs_in_one_run(data_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    docs = pydoc_documents(12, seed=3, numbered=True)
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl(raw / "a.jsonl", docs[0:2], key="body")
    blockwise = ["\n".join(line for line in d.split("\n") if line.strip()) for d in docs[2:4]]  # no blank lines
    (raw / "b.txt").write_text("\n\n\n".join(blockwise) + "\n", encoding="utf-8")
    with open(raw / "c.csv", "w", encoding="utf-8", newline="") as f:
        import csv
        writer = csv.writer(f)
        writer.writerow(["id", "body"])
        writer.writerows([[i, d] for i, d in enumerate(docs[4:6])])
    (raw / "d.tsv").write_text("body\n" + "\n".join(d.replace("\n", " ").replace("\t", " ") for d in docs[6:8]) + "\n",
                               encoding="utf-8")
    pq.write_table(pa.table({"body": docs[8:10]}), raw / "e.parquet")
    datasets.Dataset.from_dict({"body": docs[10:12]}).save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    assert run("--input", raw / "*.*", tmp_path / "hf", "--output", out, "--tokenizer", data_dir,
               "--text-key", "body", "--valid-fraction", 0, "--test-fraction", 0, "--workers", 1) == 0
    expected = (docs[0:2] + blockwise + docs[4:6]
                + [d.replace("\n", " ").replace("\t", " ") for d in docs[6:8]] + docs[8:12])
    assert decoded_splits(out)["train"] == expected  # the input order, file by file
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["format"] for i in manifest["inputs"]] == ["jsonl", "txt", "csv", "tsv", "parquet", "hf"]


def test_hf_tokenizer_with_more_than_65536_ids_writes_uint32(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import pre_tokenizers
    from tokenizers.models import WordLevel

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    backend = Backend(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "hf")
    path = write_jsonl(tmp_path / "c.jsonl", ["w69999 w0 w65535", "w65536 w1"])
    out = tmp_path / "out"
    assert run("--input", path, "--output", out, "--tokenizer", tmp_path / "hf", "--valid-fraction", 0,
               "--test-fraction", 0) == 0
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "uint32"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    shards = TokenShards(str(out), "train")
    assert shards.dtype == np.uint32
    assert [shards[0].tolist(), shards[1].tolist()] == [[70000, 1, 65536], [65537, 2]]
    assert Tokenizer.load(str(out)).decode(shards[0]) == "w69999 w0 w65535"


def test_nfkc_is_the_only_normalisation_and_only_on_request(data_dir, tmp_path):
    text = "ﬁne ＦＵＬＬ width ① and  two spaces\t tab"
    path = write_jsonl(tmp_path / "c.jsonl", [f"  {text}\n"])
    common = ["--input", path, "--tokenizer", data_dir, "--valid-fraction", 0, "--test-fraction", 0, "--workers", 1]
    assert run(*common, "--output", tmp_path / "plain") == 0
    assert decoded_splits(tmp_path / "plain")["train"] == [text]
    assert run(*common, "--output", tmp_path / "nfkc", "--nfkc") == 0
    assert decoded_splits(tmp_path / "nfkc")["train"] == ["fine FULL width 1 and  two spaces\t tab"]


def test_demo_corpus_and_inspect_tools(data_dir, tmp_path):
    corpus = tmp_path / "demo" / "corpus.jsonl"
    done = subprocess.run([sys.executable, "tools/make_demo_corpus.py", str(corpus)], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    lengths = [len(json.loads(line)["text"]) for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert 300 < len(lengths) < 600 and sum(1000 <= n <= 3000 for n in lengths) > 0.8 * len(lengths)
    done = subprocess.run([sys.executable, "tools/inspect_data.py", str(data_dir), "--split", "valid", "--show", "0",
                           "--max-chars", "0"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    first = decoded_splits(data_dir)["valid"][0]
    assert "valid " in done.stdout and first in done.stdout


# --- bad input: a clear message, exit status 2, and no output folder ----------------------------------------

def test_unpaired_surrogate(capsys, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken \\ud800 escape"}\n', encoding="utf-8")
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--vocab-size", 300),
                 f"{path}:2: text with an unpaired surrogate")


def check_failed(capsys, out, code, *fragments):
    assert code == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    assert not os.path.exists(out)
    assert leftovers(os.path.dirname(out)) == []  # the temporary folder is gone too
    return err


def test_malformed_json_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": "broken\n', encoding="utf-8")
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--vocab-size", 300),
                 f"prepare: error: {path}:3: malformed JSON", "--skip-bad-lines")


def test_failure_after_batches_were_written_leaves_nothing(data_dir, capsys, tmp_path):
    path = write_jsonl(tmp_path / "late.jsonl", [f"document number {i}" for i in range(6000)])
    with open(path, "a", encoding="utf-8") as f:
        f.write("{oops\n")
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--tokenizer", data_dir, "--workers", 1),
                 f"{path}:6001: malformed JSON")


def test_skip_bad_lines_counts_them(data_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good one"}\n{broken\n{"text": "good two"}\n{"text": "\xff"}\n')
    out = tmp_path / "out"
    assert run("--input", path, "--output", out, "--tokenizer", data_dir, "--skip-bad-lines", "--workers", 1,
               "--valid-fraction", 0, "--test-fraction", 0) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_lines"] == 2 and summary["documents"] == 2


def test_missing_key(capsys, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["some text"], key="content")
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--vocab-size", 300),
                 f"{path}:1: no key 'text'", "--text-key")


def test_undecodable_bytes(capsys, tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"good text here\n\nthen latin-1: caf\xe9\n")
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--vocab-size", 300),
                 f"{path}:3: bytes that are not UTF-8", "expected UTF-8")


def test_empty_corpus(data_dir, capsys, tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   ", "\n\t"])
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--vocab-size", 300),
                 "no train documents", "read 3 documents, dropped 3 empty")
    check_failed(capsys, out, run("--input", path, "--output", out, "--tokenizer", data_dir),
                 "no documents left after cleaning")


def test_vocab_too_large(capsys, tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", ["a very small corpus", "of two documents only"])
    out = tmp_path / "out"
    check_failed(capsys, out, run("--input", path, "--output", out, "--vocab-size", 5000, "--valid-fraction", 0,
                                  "--test-fraction", 0), "vocabulary size 5000 is too large for this corpus")


def test_unwritable_output(capsys, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["text"])
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "out"
    assert run("--input", path, "--output", out, "--vocab-size", 300) == 2
    assert "cannot write the output folder" in capsys.readouterr().err


def test_existing_output_needs_overwrite(data_dir, corpus, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    args = ["--input", corpus["path"], "--output", out, "--tokenizer", data_dir, "--workers", 1]
    assert run(*args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["manifest.json"]
    assert run(*args, "--overwrite") == 0
    assert (out / "summary.json").is_file() and leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_prepare_did_not_write(corpus, data_dir, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    assert run("--input", corpus["path"], "--output", tmp_path, "--tokenizer", data_dir, "--overwrite") == 2
    assert "was not written by pipeline.prepare" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_argument_errors(corpus, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(corpus["path"]), "--output", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        main(["--input", str(corpus["path"]), "--output", str(tmp_path / "o"), "--vocab-size", "300",
              "--valid-fraction", "0.6", "--test-fraction", "0.5"])


def test_hash_set():
    seen = HashSet()
    rng = random.Random(3)
    hashes = [rng.getrandbits(64) for _ in range(3000)] + list(range(2, 2000)) + [2**64 - 1, 0]
    assert all(seen.add(h) for h in hashes)
    assert not any(seen.add(h) for h in hashes)
    assert seen.size == len(hashes)
    assert 2 * seen.size <= len(seen.table) <= 4 * seen.size  # 16-32 bytes a hash
    assert not seen.add(1)  # 0 stands for 1: an empty slot is 0


def test_a_killed_run_leaves_a_temporary_folder_that_the_next_run_removes(data_dir, corpus, tmp_path):
    # A run stuck reading its input (a fifo nobody writes) after making its temporary folder, then killed -9.
    fifo = tmp_path / "stuck.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "pipeline.prepare", "--input", str(fifo), "--output", str(out),
                                "--tokenizer", str(data_dir), "--quiet"], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any((tmp_path / name / ".owner").exists() for name in leftovers(tmp_path)):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    [stale] = leftovers(tmp_path)
    assert stale.startswith(".out.") and stale.endswith(".tmp") and not out.exists()
    # Folders that are not stale stay: a live owner, another host's, and one without an owner file.
    others = {".out.live.tmp": {"output": str(out), "host": socket.gethostname(), "pid": os.getpid()},
              ".out.far.tmp": {"output": str(out), "host": "another-host", "pid": process.pid},
              ".out.unknown.tmp": None}
    for name, owner in others.items():
        (tmp_path / name).mkdir()
        if owner is not None:
            (tmp_path / name / ".owner").write_text(json.dumps(owner))
    assert run("--input", corpus["path"], "--output", out, "--tokenizer", data_dir, "--workers", 1) == 0
    assert leftovers(tmp_path) == sorted(others)
    assert sorted(os.listdir(out)) == sorted(os.listdir(data_dir))  # no owner file in the result


def test_dry_run_writes_nothing(corpus, capsys, tmp_path):
    out = tmp_path / "out"
    assert run("--input", corpus["path"], "--output", out, "--vocab-size", 500, "--min-chars", 5, "--dry-run") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] is True
    assert sum(s["documents"] for s in report["splits"].values()) == len(corpus["expected"])
    assert os.listdir(tmp_path) == []


# --- whole processes ---------------------------------------------------------------------------------------

def test_cli_error_and_light_imports(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--input", str(bad), "--output", str(out),
                           "--vocab-size", "300"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert f"prepare: error: {bad}:2: malformed JSON" in done.stderr
    assert not out.exists()
    good = write_jsonl(tmp_path / "good.jsonl", pydoc_documents(40))
    script = ("import sys; from pipeline.prepare import main; "
              f"code = main(['--input', {str(good)!r}, '--output', {str(out)!r}, '--vocab-size', '500', '--quiet']); "
              "print('HEAVY', [m for m in ('torch', 'deepspeed', 'datasets', 'transformers') if m in sys.modules]); "
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


PEAK_RSS = """
import sys
from pipeline.prepare import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("PEAK_KB", next(line.split()[1] for line in f if line.startswith("VmHWM:")), file=sys.stderr)
sys.exit(code)
"""


def peak_rss_kb(args) -> int:
    """Peak resident memory (kB) of one prepare run in a fresh process, as the process itself reads it (VmHWM).
    Not the child's rusage: its ru_maxrss starts at the size of the process that forked it (pytest, by now
    larger than a prepare run) and survives exec, so it would hide any growth below that."""
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *args, "--quiet"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return int(done.stderr.split("PEAK_KB")[-1].split()[0])


def test_memory_does_not_grow_with_the_corpus(data_dir, tmp_path):
    # 1.2 and 12 MB: both past the sizes at which the fixed buffers (1 MiB per shard file) are filled.
    small = write_jsonl(tmp_path / "small.jsonl", covering_documents(1600))
    large = write_jsonl(tmp_path / "large.jsonl", covering_documents(16000))
    assert large.stat().st_size > 9 * small.stat().st_size
    rss = {}
    for name, path in (("small", small), ("large", large)):
        rss[name] = peak_rss_kb(["--input", str(path), "--output", str(tmp_path / name), "--tokenizer", str(data_dir),
                                 "--workers", "1"])
    growth_mb = (rss["large"] - rss["small"]) / 1024
    corpus_growth_mb = (large.stat().st_size - small.stat().st_size) / 2**20
    # Holding the corpus, or its tokens, would add about its size; streaming adds only the duplicate filter
    # (16-32 bytes a document, ~0.5 MB here). Measured: ~1.3 MB.
    assert growth_mb < 0.25 * corpus_growth_mb, (rss, corpus_growth_mb)


def test_memory_does_not_grow_with_the_corpus_when_training_a_tokenizer(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", covering_documents(800))   # ~0.6 MB
    large = write_jsonl(tmp_path / "large.jsonl", covering_documents(8000))  # ~6 MB
    rss = {}
    for name, path in (("small", small), ("large", large)):
        rss[name] = peak_rss_kb(["--input", str(path), "--output", str(tmp_path / name), "--vocab-size", "1000",
                                 "--tokenizer-sample-mb", "0.5", "--workers", "1"])
    growth_mb = (rss["large"] - rss["small"]) / 1024
    corpus_growth_mb = (large.stat().st_size - small.stat().st_size) / 2**20
    # Both tokenizers train on a sample of at most 0.5 MB: training on all of the train split would add
    # several times the corpus growth (SentencePiece holds every line, and more). Measured: ~0.3 MB.
    assert growth_mb < 0.25 * corpus_growth_mb, (rss, corpus_growth_mb)
