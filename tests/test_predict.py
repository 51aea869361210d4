"""predict's input reading (unit): texts reach the model as they are in the file, without line breaks."""
import io
import json
import sys

from pipeline import predict


def test_txt_lines_lose_their_line_breaks(tmp_path):
    # A .txt file from Windows (CRLF), with a blank line and no break after the last line.
    path = tmp_path / "prompts.txt"
    path.write_bytes("good soup \U0001F600\r\n\r\nbad service\nlast line".encode())
    assert list(predict.read_inputs(str(path), "text")) == ["good soup \U0001F600", "bad service", "last line"]


def test_jsonl_texts_are_kept_as_they_are(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"body": "two\nlines\n"}) + "\r\n", encoding="utf-8")
    assert list(predict.read_inputs(str(path), "body")) == ["two\nlines\n"]


def test_stdin_lines_lose_their_line_breaks(monkeypatch):
    text = "good soup\r\n" + json.dumps({"text": "kept\n"}) + "\n\nbad service\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(text, newline=""))  # newline="": "\r\n" arrives as on Linux
    assert list(predict.read_inputs("-", "text")) == ["good soup", "kept\n", "bad service"]
