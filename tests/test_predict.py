"""predict's input reading (unit): texts reach the model as they are in the file, without line breaks."""
import io
import json
import sys

from pipeline import predict
from tests.conftest import REPO


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


def test_a_compressed_model_folder_predicts_as_load_compressed(tmp_path, capsys):
    # RUN/compressed of a compress run holds integer weights (no model.safetensors): predict reads it too.
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast

    from pipeline.compression import clean, load_compressed, parse_compression, prepare, save_compressed

    words = ["<pad>", "<unk>", "good", "bad", "soup", "service"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=len(words), max_position_embeddings=32,
                                  num_labels=2, id2label={0: "no", 1: "yes"}, pad_token_id=0,
                                  architectures=["LlamaForSequenceClassification"])  # as a finetune export has
    model = AutoModelForSequenceClassification.from_config(config)
    block = {"post_training_quantization": {"shared_parameters": {"enabled": True},
                                            "different_groups": {"g": {"params": {"target_bits": 8}, "modules": ["*"]}}}}
    cleaned = clean(model, prepare(model, parse_compression(block)))
    folder = str(tmp_path / "compressed")
    save_compressed(cleaned.model, cleaned.storage, folder, tokenizer)
    inputs, out = tmp_path / "in.txt", tmp_path / "out.jsonl"
    inputs.write_text("good soup\nbad service\n")
    assert predict.main(["--model", folder, "--input", str(inputs), "--output", str(out), "--device", "cpu"]) == 2
    rows = [json.loads(line) for line in open(out)]
    with torch.no_grad():
        expected = load_compressed(folder)(input_ids=torch.tensor([[2, 4], [3, 5]])).logits.softmax(-1)
    assert [r["text"] for r in rows] == ["good soup", "bad service"]
    for row, p in zip(rows, expected.tolist()):
        assert abs(row["probs"]["no"] - p[0]) < 1e-5 and abs(row["probs"]["yes"] - p[1]) < 1e-5
    assert "predict: 2 predictions (classify)" in capsys.readouterr().err


def test_a_reader_that_stops_early_is_not_an_error():
    """`python -m pipeline.predict ... | head`: the closed pipe ends the stage quietly (status 1, nothing on stderr)."""
    import subprocess

    code = ("from pipeline.cli import run_main\n"
            "def main():\n"
            "    for i in range(10**7):\n"
            "        print('{\"text\": \"line\"}', i)\n"
            "run_main(main, 'predict')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and err == "", err
