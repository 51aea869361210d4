"""pipeline.models.pipe without a launcher: the pipeline layers over the HF modules compute what the HF
model computes, names map one to one, and a bad pipeline setup fails before any process group."""
import functools
import json
import os

import pytest
import torch

from pipeline.config import resolve_ds_config
from pipeline.models import build_model, load_model_config
from pipeline.models.pipe import (
    check_pipeline,
    describe_stages,
    hf_to_pipe,
    layer_specs,
    pipe_layout,
    pipe_to_hf,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
VOCAB = 1000


def tiny_model(spec, tmp_path=None, **overrides):
    """A fresh model from a preset, or from a config JSON derived from one (overrides, e.g. untied)."""
    if overrides:
        from pipeline.models.presets import PRESETS

        path = tmp_path / f"{spec}_custom.json"
        path.write_text(json.dumps({**PRESETS[spec], **overrides}))
        spec = str(path)
    torch.manual_seed(0)
    return build_model(spec, "clm", VOCAB, SPECIAL)


def run_layers(specs, ids, checkpoint_first=0):
    """What PipelineModule does on one stage holding every layer: build each spec (a tied key once),
    feed each layer's output to the next; the first `checkpoint_first` layers in one chunk under
    DeepSpeed's non-reentrant activation checkpoint."""
    from deepspeed.pipe import TiedLayerSpec
    from deepspeed.runtime.activation_checkpointing import checkpointing

    tied, funcs = {}, []
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            funcs.append(functools.partial(spec.forward_fn, module) if spec.forward_fn else module)
        else:
            funcs.append(spec.build())

    def chunk(x):
        for f in funcs[:checkpoint_first]:
            x = f(x)
        return x

    x = checkpointing.non_reentrant_checkpoint(chunk, ids) if checkpoint_first else chunk(ids)
    for f in funcs[checkpoint_first:]:
        x = f(x)
    return x, funcs


MODELS = [("tiny", {}), ("gpt2-tiny", {}), ("tiny", {"tie_word_embeddings": False})]


@pytest.mark.parametrize("spec, overrides", MODELS, ids=["llama-tied", "gpt2", "llama-untied"])
def test_layers_compute_the_hf_logits_and_loss(spec, overrides, tmp_path):
    from pipeline.models.cross_entropy import lm_loss
    from pipeline.models.pipe import causal_lm_loss

    model = tiny_model(spec, tmp_path, **overrides).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = run_layers(layer_specs(model), ids)
        ref = model(input_ids=ids, labels=ids)
    assert torch.equal(logits, ref.logits)
    # the unpipelined stage's own loss exactly; the HF model's up to summation order
    assert causal_lm_loss(logits, ids).item() == lm_loss(ref.logits, ids, shift=True).item()
    assert causal_lm_loss(logits, ids).item() == pytest.approx(ref.loss.item(), rel=1e-6)
    # (labels, n): the sum over label tokens / n, for token-weighted evaluation
    n = torch.tensor(7.0)
    assert causal_lm_loss(logits, (ids, n)).item() == pytest.approx(ref.loss.item() * ids[:, 1:].numel() / 7.0)


@pytest.mark.parametrize("spec, overrides", MODELS, ids=["llama-tied", "gpt2", "llama-untied"])
def test_state_dict_mapping_round_trips(spec, overrides, tmp_path):
    model = tiny_model(spec, tmp_path, **overrides)
    hf = model.state_dict()
    _, funcs = run_layers(layer_specs(model), torch.zeros(1, 4, dtype=torch.long))
    # What each pipeline layer holds (and DeepSpeed writes as layer_XX-model_states.pt).
    layers = {i: f.state_dict() for i, f in enumerate(funcs) if isinstance(f, torch.nn.Module)}
    if overrides.get("tie_word_embeddings") is False:
        assert len(layers) == len(funcs)  # an untied head is a layer with its own weight
    else:
        assert len(layers) == len(funcs) - 1  # the tied head holds the embedding's weight, not its own
    assert [len(pipe_layout(model.config))] == [len(funcs)]

    to_hf = pipe_to_hf(layers, model.config)
    assert sorted(to_hf) == sorted(hf)
    assert all(torch.equal(to_hf[k], hf[k]) for k in hf)
    to_pipe = hf_to_pipe(hf, model.config)
    assert sorted(to_pipe) == sorted(layers)
    for i in layers:
        assert sorted(to_pipe[i]) == sorted(layers[i]) and all(torch.equal(to_pipe[i][k], layers[i][k]) for k in layers[i])
    # one to one: every HF tensor lands in exactly one layer (the tied lm_head is the embedding)
    assert sum(len(v) for v in to_pipe.values()) == len(hf) - (0 if overrides else 1)
    # and the layers hold the HF model's own tensors, not copies
    assert layers[0]["hf.weight"].data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_many_layers_map_by_longest_prefix(tmp_path):
    model = tiny_model("tiny", tmp_path, num_hidden_layers=11, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=2)
    layers = hf_to_pipe(model.state_dict(), model.config)
    assert all(k.startswith("hf.") for v in layers.values() for k in v)
    assert layers[11]["hf.self_attn.q_proj.weight"].data_ptr() == model.model.layers[10].self_attn.q_proj.weight.data_ptr()
    assert layers[2]["hf.self_attn.q_proj.weight"].data_ptr() == model.model.layers[1].self_attn.q_proj.weight.data_ptr()


def test_checkpointed_chunk_with_the_embedding_first_gets_the_same_gradients():
    model = tiny_model("tiny")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for first in (0, 3):  # plain, then [embedding, block 0, block 1] in one checkpointed chunk
        model.zero_grad()
        logits, _ = run_layers(layer_specs(model), ids, checkpoint_first=first)
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[1]["model.embed_tokens.weight"].abs().sum() > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def pipeline_config(**block):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
            "pipeline": {"stages": 2, **block}}


def test_check_pipeline_names_what_is_wrong():
    config, _ = load_model_config("tiny", VOCAB, SPECIAL)
    check_pipeline(config, "clm", pipeline_config())
    check_pipeline(config, "clm", pipeline_config(partition="type:DecoderLayer"))
    with pytest.raises(ValueError, match="for causal LMs"):
        check_pipeline(config, "mlm", pipeline_config())
    with pytest.raises(ValueError, match="more than the model's 7 pipeline layers"):
        check_pipeline(config, "clm", {"pipeline": {"stages": 8}})
    with pytest.raises(ValueError, match="matches 0 layers"):
        check_pipeline(config, "clm", pipeline_config(partition="type:Attention"))
    bert, _ = load_model_config("bert-tiny", VOCAB, SPECIAL)
    with pytest.raises(ValueError, match="supports the decoder families"):
        check_pipeline(bert, "clm", pipeline_config())


@pytest.mark.parametrize("block, message", [
    ({"partition": "best"}, "pipeline.partition must be"),
    ({"partition": "type:("}, "not a valid regular expression"),
    ({"activation_checkpoint_interval": -1}, "activation_checkpoint_interval must be"),
    ({"use_reentrant": "no"}, "use_reentrant must be true or false"),
])
def test_bad_pipeline_block_is_rejected_by_the_resolver(block, message):
    with pytest.raises(ValueError, match=message):
        resolve_ds_config(pipeline_config(**block), world_size=2, train_steps=10, output_dir="/r", accelerator="cpu")


def test_describe_stages_uses_deepspeeds_partition():
    model = tiny_model("tiny")
    text = describe_stages(model, pipeline_config(partition="uniform"))
    assert text.splitlines() == ["stage 0: layers 0..3: model.embed_tokens, model.layers.0, model.layers.1, model.layers.2",
                                 "stage 1: layers 4..6: model.layers.3, model.norm, lm_head (tied)"]
    by_type = describe_stages(model, pipeline_config(partition="type:DecoderLayer"))
    assert "model.layers.1\n" in by_type + "\n" and "stage 1: layers 3..6" in by_type


def test_pipeline_with_zero2_fails_in_one_process_before_any_process_group(prepared, tmp_path):
    import torch.distributed as dist

    from pipeline import pretrain

    ds = json.load(open(os.path.join(REPO, "ds_configs", "zero2.json")))
    ds["pipeline"] = {"stages": 2}
    (tmp_path / "pipe_zero2.json").write_text(json.dumps(ds))
    with pytest.raises(ValueError, match="pipeline engine supports ZeRO stage 0 or 1 only") as e:
        pretrain.main(["--data", prepared, "--model", "tiny", "--deepspeed_config", str(tmp_path / "pipe_zero2.json"),
                       "--output", str(tmp_path / "run"), "--train-steps", "2"])
    assert "ZeRO stage 2" in str(e.value) and "pipe2.json" in str(e.value)
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_dry_run_prints_the_stages(prepared, tmp_path, capsys, monkeypatch):
    from pipeline import pretrain

    monkeypatch.setenv("WORLD_SIZE", "2")  # as the launcher would set it for 2 ranks
    pretrain.main(["--data", prepared, "--model", "tiny", "--deepspeed_config", os.path.join(REPO, "ds_configs", "pipe2.json"),
                   "--output", str(tmp_path / "dry"), "--train-steps", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert "pipeline: 2 stages x 1 data-parallel replicas" in out and "stage 1: layers" in out
    assert not (tmp_path / "dry").exists()
