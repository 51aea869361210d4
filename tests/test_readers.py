"""Readers: every input format, globs, and a clear error (file, line, expectation) for each kind of bad input."""
import gzip
import json

import pytest

from pipeline.data.readers import (
    BadLines,
    InputError,
    detect_format,
    expand_inputs,
    file_fingerprint,
    read_documents,
    read_records,
)

BOM = "\ufeff"  # what Windows editors and Excel put at the start of a UTF-8 file


def texts(paths, **kwargs):
    return [d.text for d in read_documents([str(p) for p in paths], **kwargs)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- jsonl -----------------------------------------------------------------------------------------------

def test_jsonl_documents_and_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 3}\n', encoding="utf-8")
    docs = list(read_documents([str(path)]))
    assert [(d.text, d.line) for d in docs] == [("one", 1), ("two\nlines", 3)]
    assert docs[0].source == str(path)


def test_jsonl_other_key_and_gzip(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped ü"}) + "\n")
    assert texts([path], text_key="body") == ["zipped ü"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:3: malformed JSON .*expected one JSON object per line"):
        texts([path])


def test_jsonl_skip_bad_lines_counts_them(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "a"}\nnot json\n{"text": "b"}\n[1, 2]\n{"text": "\xff"}\n{"other": 1}\n{"text": 5}\n')
    bad = BadLines()
    assert texts([path], bad_lines=bad) == ["a", "b"]
    assert bad.count == 5
    assert str(bad.first).startswith(f"{path}:2: malformed JSON")


def test_jsonl_missing_key(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"content": "y", "id": 1}])
    with pytest.raises(InputError, match=rf"{path}:2: no key 'text' \(keys: 'content', 'id'\); choose .* --text-key"):
        texts([path])


@pytest.mark.parametrize("value, kind", [(5, "int"), (None, "null"), (["a"], "list")])
def test_jsonl_value_that_is_not_a_string(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": value}])
    with pytest.raises(InputError, match=rf"{path}:1: key 'text' holds a {kind}; expected a string"):
        texts([path])


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('"just a string"\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path}:1: a JSON str; expected a JSON object with key 'text'"):
        texts([path])


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n' + '{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=rf"{path}:2: bytes that are not UTF-8 .*expected UTF-8 text"):
        texts([path])


# --- txt -------------------------------------------------------------------------------------------------

def test_txt_blocks_lines_and_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond  line\n\n  \n\nblock two\n\tindented\nlast", encoding="utf-8")
    assert texts([path]) == ["first line\nsecond  line\n", "block two\n\tindented\nlast"]
    assert [d.line for d in read_documents([str(path)])] == [1, 6]
    assert texts([path], txt_mode="line") == ["first line\n", "second  line\n", "block two\n", "\tindented\n", "last"]
    assert texts([path], txt_mode="file") == [path.read_text(encoding="utf-8")]


def test_txt_undecodable_bytes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"fine\n\nalso fine\n\xc3\x28 broken\n")
    for mode in ("block", "line", "file"):
        with pytest.raises(InputError, match=rf"{path}:4: bytes that are not UTF-8"):
            texts([path], txt_mode=mode)


# --- csv / tsv -------------------------------------------------------------------------------------------

def test_csv_column_with_quotes_and_newlines(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('id,text\n1,"hello, world"\n2,"two\nlines ""quoted"""\n\n3,plain\n', encoding="utf-8")
    docs = list(read_documents([str(path)]))
    assert [d.text for d in docs] == ["hello, world", 'two\nlines "quoted"', "plain"]
    assert [d.line for d in docs] == [2, 4, 6]


def test_tsv(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text("body\tlabel\nsome text, with comma\t1\nmore\t0\n", encoding="utf-8")
    assert texts([path], text_key="body") == ["some text, with comma", "more"]


def test_csv_missing_column(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,body\n1,x\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"{path}:1: no column 'text' in the header \(columns: 'id', 'body'\)"):
        texts([path])


def test_csv_short_row_and_bad_bytes(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"id,text\n1,good\n2\n3,\xff\xfe\n4,also good\n")
    with pytest.raises(InputError, match=rf"{path}:3: 1 fields; expected at least 2"):
        texts([path])
    bad = BadLines()
    assert texts([path], bad_lines=bad) == ["good", "also good"]
    assert bad.count == 2
    assert str(bad.first).startswith(f"{path}:3: 1 fields")
    path.write_bytes(b"id,text\n1,good\n3,\xff\xfe\n")
    with pytest.raises(InputError, match=rf"{path}:3: bytes that are not UTF-8"):
        texts([path])


# --- parquet and HF datasets -----------------------------------------------------------------------------

def test_parquet_reads_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    rows = [f"document {i}" for i in range(2500)]
    pq.write_table(pa.table({"text": rows, "n": list(range(2500))}), path, row_group_size=700)
    docs = list(read_documents([str(path)]))
    assert [d.text for d in docs] == rows
    assert docs[-1].line == "row 2500"


def test_parquet_missing_column_wrong_type_and_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"n": [1, 2]}), path)
    with pytest.raises(InputError, match=rf"{path}: no column 'text' \(columns: 'n'\)"):
        texts([path])
    with pytest.raises(InputError, match="column 'n' has type int64; expected strings"):
        texts([path], text_key="n")
    pq.write_table(pa.table({"text": ["a", None]}), path)
    with pytest.raises(InputError, match=rf"{path}: row 2: column value is null; expected a string"):
        texts([path])


def test_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}).save_to_disk(str(single))
    assert detect_format(str(single)) == "hf"
    assert texts([single]) == ["a", "b", "c"]
    both = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["x", "y"]}),
                          "test": datasets.Dataset.from_dict({"content": ["z"]})}).save_to_disk(str(both))
    assert sorted(texts([both], text_key="content")) == ["x", "y", "z"]
    with pytest.raises(InputError, match="no column 'text'"):
        texts([both])


def test_parquet_dictionary_and_string_view_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ["positive", "negative", "positive", "a longer text than twelve bytes, kept out of line"]
    category = tmp_path / "category.parquet"  # how pandas writes a `category` column
    pq.write_table(pa.table({"text": pa.array(rows).dictionary_encode(), "n": list(range(4))}), category)
    view = tmp_path / "view.parquet"
    pq.write_table(pa.table({"text": pa.array(rows, type=pa.string_view())}), view)
    for path in (category, view):
        assert texts([path]) == rows, path
    assert [r.values["text"] for r in read_records(str(category), ["text", "n"])] == rows
    pq.write_table(pa.table({"text": pa.array(["x", None]).dictionary_encode()}), category)
    with pytest.raises(InputError, match=rf"{category}: row 2: column value is null; expected a string"):
        texts([category])
    pq.write_table(pa.table({"text": pa.array([1, 2]).dictionary_encode()}), category)
    with pytest.raises(InputError, match="column 'text' has type .*int64.*; expected strings"):
        texts([category])


# --- a byte order mark at the start of a file -------------------------------------------------------------

def test_byte_order_mark_is_skipped_in_every_text_format(tmp_path):
    (tmp_path / "a.jsonl").write_text(BOM + '{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "b.csv").write_text(BOM + "text,id\nthree,1\n", encoding="utf-8")
    (tmp_path / "c.tsv").write_text(BOM + "text\tid\nfour\t2\n", encoding="utf-8")
    (tmp_path / "d.txt").write_text(BOM + "five\n\nsix\n", encoding="utf-8")
    with gzip.open(tmp_path / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(BOM + '{"text": "seven"}\n')
    (tmp_path / "f.jsonl").write_text(BOM + "\n" + '{"text": "eight"}\n', encoding="utf-8")  # a BOM on a blank line
    names = ["a.jsonl", "b.csv", "c.tsv", "d.txt", "e.jsonl.gz", "f.jsonl"]
    docs = list(read_documents([str(tmp_path / n) for n in names]))
    assert [d.text for d in docs] == ["one", "two", "three", "four", "five\n", "six\n", "seven", "eight"]
    assert [d.line for d in docs] == [1, 2, 2, 2, 1, 3, 1, 2]
    assert texts([tmp_path / "d.txt"], txt_mode="line") == ["five\n", "six\n"]
    assert texts([tmp_path / "d.txt"], txt_mode="file") == ["five\n\nsix\n"]
    assert [r.values for r in read_records(str(tmp_path / "b.csv"), ["text", "id"])] == [{"text": "three", "id": "1"}]
    assert [r.values for r in read_records(str(tmp_path / "a.jsonl"), ["text"])] == [{"text": "one"}, {"text": "two"}]


def test_byte_order_mark_inside_a_text_is_kept(tmp_path):
    # Only the file's first bytes are a mark; elsewhere U+FEFF is a character of the text.
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"text": BOM + "y"}])
    assert texts([path]) == ["x", BOM + "y"]
    (tmp_path / "b.txt").write_text("first\n\n" + BOM + "second\n", encoding="utf-8")
    assert texts([tmp_path / "b.txt"]) == ["first\n", BOM + "second\n"]


# --- inputs ----------------------------------------------------------------------------------------------

def test_globs_sorted_and_deduplicated(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_jsonl(tmp_path / name, [{"text": name}])
    paths = expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "a.jsonl"), str(tmp_path / "**" / "c.jsonl")])
    assert paths == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "sub" / "c.jsonl")]
    assert texts(paths) == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]


def test_input_errors(tmp_path):
    with pytest.raises(InputError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    with pytest.raises(InputError, match="no such file"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(InputError, match="unknown extension '.docx'"):
        detect_format(str(tmp_path / "a.docx"))
    with pytest.raises(InputError, match="is a folder but not a HuggingFace dataset"):
        detect_format(str(tmp_path))
    assert detect_format(str(tmp_path / "a.weird"), "jsonl") == "jsonl"


def test_file_fingerprint(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"abc")
    info = file_fingerprint(str(path))
    assert info["bytes"] == 3
    assert info["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
