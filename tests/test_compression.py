"""pipeline.compression on tiny models, in process (no DeepSpeed): config checks, integer math, each
method training, cleaning that keeps the outputs, parameter counts, bytes on disk, the load call."""
import copy
import glob
import json
import os

import pytest
import torch

from pipeline.compression import (
    CompressionConfigError,
    QuantScheme,
    clean,
    load_compressed,
    parse_compression,
    prepare,
    save_compressed,
    weight_bytes,
)
from pipeline.compression.compressor import kept_share
from pipeline.compression.distill import distillation_loss, hidden_pairs
from pipeline.compression.quant import (
    dequantize,
    fake_quantize,
    pack_bits,
    pack_nibbles,
    quantize,
    unpack_bits,
    unpack_nibbles,
)
from pipeline.config import load_ds_config, resolve_ds_config, split_compression

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(REPO, "ds_configs", "compression", "*.json")))
DESIGN_NAMES = {"int8_ptq.json", "int8_qat.json", "int4_qat.json", "sparse50.json", "prune_heads_rows.json",
                "half_layers_kd.json", "extreme.json"}
VOCAB = 128


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threads only add synchronization (and on a busy machine, waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- tiny models (64 wide)

def llama(layers=2, kv_heads=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=kv_heads, intermediate_size=128, vocab_size=VOCAB,
                                  max_position_embeddings=64, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def llama_classifier(layers=2):
    """A decoder as a classifier (what pipeline.finetune makes of the demo's tiny Llama)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  num_key_value_heads=4, intermediate_size=128, vocab_size=VOCAB,
                                  max_position_embeddings=64, num_labels=3, pad_token_id=0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


def bert(layers=2):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")


def gpt2(layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


MODELS = {"llama": llama, "bert": bert, "gpt2": gpt2, "llama_classifier": llama_classifier}


def batch_for(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (8, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[:4, 12:] = 0  # some padding
    classifier = type(model).__name__.endswith("ForSequenceClassification")
    labels = torch.randint(0, 3, (8,), generator=g) if classifier else ids
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def group(name, params, modules=("*",), **shared):
    return {name: {"shared_parameters": {"enabled": True, **shared},
                     "different_groups": {"g1": {"params": params, "modules": list(modules)}}}}


def train(model, block, steps=10, lr=3e-3):
    """Prepare `model` as a student of a frozen copy, train `steps` steps; (losses, compressor, teacher)."""
    config = parse_compression(block)
    teacher = copy.deepcopy(model).eval()
    compressor = prepare(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = batch_for(model)
    kd = config.knowledge_distillation
    kept = list(config.layer_reduction.teacher_layer) if config.layer_reduction else list(range(_layers(teacher)))
    losses = []
    for step in range(steps):
        compressor.update(step)
        out = model(**batch, output_hidden_states=bool(kd))
        loss = out.loss
        if kd:
            with torch.no_grad():
                t = teacher(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
            loss, _ = distillation_loss(kd, out.loss, out, t, hidden_pairs(kept, _layers(teacher)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    compressor.finalize()
    return losses, compressor, teacher


def _layers(model):
    return getattr(model.config, "num_hidden_layers", None) or model.config.n_layer


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


def params(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- shipped configs

def test_the_design_names_are_shipped():
    assert DESIGN_NAMES == {os.path.basename(p) for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_config_splits_resolves_and_parses(path, tmp_path):
    raw = load_ds_config(path)
    with pytest.raises(ValueError, match="split_compression"):
        resolve_ds_config(raw, world_size=2, train_steps=10, output_dir=str(tmp_path), accelerator="cpu")
    ds, block = split_compression(raw)
    for world in (1, 2):
        cfg, _ = resolve_ds_config(ds, world_size=world, train_steps=50, output_dir=str(tmp_path), accelerator="cpu")
        assert cfg["train_batch_size"] == 4 * world and cfg["zero_optimization"]["stage"] in (0, 1, 2)
        assert cfg["scheduler"]["params"]["total_num_steps"] == ds["scheduler"]["params"]["total_num_steps"]
    config = parse_compression(block)
    assert config.enabled
    # Every shipped config fits the tiny Llama (4 layers: the demo's `tiny` preset depth) and BERT.
    for make in (llama, bert):
        prepare(make(layers=4), config)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_deepspeed_accepts_the_config_once_the_block_is_set_aside(path, tmp_path, monkeypatch):
    """DeepSpeed's own parser (as in test_config.py: without a process group, the rank query answers 0)."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    ds, _ = split_compression(load_ds_config(path))
    cfg, _ = resolve_ds_config(ds, world_size=1, train_steps=50, output_dir=str(tmp_path), accelerator="cpu")
    parsed = DeepSpeedConfig(cfg)
    assert parsed.train_batch_size == 4 and parsed.zero_optimization_stage == 1


def test_shipped_configs_use_each_method():
    used = set()
    for path in SHIPPED:
        used |= set(parse_compression(split_compression(load_ds_config(path))[1]).enabled)
    assert used == {"weight_quantization", "activation_quantization", "sparse_pruning", "row_pruning", "head_pruning",
                    "post_training_quantization", "layer_reduction", "knowledge_distillation"}


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("block, message", [
    ({"weight_quantisation": {}}, "unknown key 'weight_quantisation'; did you mean 'weight_quantization'"),
    (group("weight_quantization", {"target_bits": 8, "grup_size": 4}), "params: unknown key 'grup_size'"),
    ({"weight_quantization": {"shared_parameters": {"enabled": True, "quantize_groups": 2},
                              "different_groups": {}}}, "shared_parameters: unknown key 'quantize_groups'"),
    (group("weight_quantization", {"target_bits": 3}), "target_bits must be 8 or 4, got 3"),
    (group("weight_quantization", {"group_size": 8}), "missing 'target_bits'"),
    (group("activation_quantization", {"bits": 4}), "bits must be 8"),
    (group("sparse_pruning", {"dense_ratio": 0}), "dense_ratio must be in (0, 1]"),
    (group("row_pruning", {"dense_ratio": 1.5}), "dense_ratio must be in (0, 1]"),
    (group("sparse_pruning", {"dense_ratio": 0.5}, schedule_offset=10, schedule_offset_end=5),
     "schedule_offset_end 5 is before schedule_offset 10"),
    (group("head_pruning", {"dense_ratio": 0.5}, method="topk"), "method must be 'l1'"),
    (group("weight_quantization", {"target_bits": 8}, modules=[]), "non-empty list of module-name patterns"),
    (group("weight_quantization", {"target_bits": 8}, modules=["(unclosed"]), "not a valid regular expression"),
    (group("weight_quantization", {"target_bits": 8}, schedule_offset=-1), "schedule_offset must be an integer >= 0"),
    ({"layer_reduction": {"keep_number_layer": 2, "teacher_layer": [0, 1, 2]}}, "has 3 entries but keep_number_layer is 2"),
    ({"layer_reduction": {"keep_number_layer": 2, "teacher_layer": [3, 1]}}, "increasing without repeats"),
    ({"knowledge_distillation": {"temperature": 0}}, "temperature must be a positive number"),
    ({"knowledge_distillation": {"task_weight": 0, "logits_weight": 0}}, "nothing to train on"),
    (group("weight_quantization", {"target_bits": 8}, enabled=False), "every method has \"enabled\": false"),
    ({}, "is empty"),
    ([], "must be a JSON object"),
])
def test_bad_config_is_a_clear_error(block, message):
    with pytest.raises(CompressionConfigError) as e:
        parse_compression(block)
    assert message in str(e.value)
    assert str(e.value).startswith("compression")  # the key path


@pytest.mark.parametrize("make, block, message", [
    (llama, group("weight_quantization", {"target_bits": 8}, modules=["no_such_layer"]),
     "different_groups.g1.modules: pattern 'no_such_layer' matches no linear or conv1d or embedding module of this llama"),
    (llama, group("head_pruning", {"dense_ratio": 0.5}, modules=["mlp"]), "pattern 'mlp' matches no attention block"),
    (llama, group("head_pruning", {"dense_ratio": 0.2}), "dense_ratio 0.2 keeps 0 of the 2 key/value head units of layer 0"),
    (bert, group("row_pruning", {"dense_ratio": 0.001}), "keeps 0 of the 128 MLP channels"),
    (bert, group("head_pruning", {"dense_ratio": 0.5}, num_heads=12), "num_heads is 12 but the model has 4"),
    (llama, group("sparse_pruning", {"dense_ratio": 1e-6}, modules=["q_proj"]), "keeps no weight of"),
    (llama, group("activation_quantization", {"bits": 8}), "int8 activations need int8 weights"),
    (llama, {**group("weight_quantization", {"target_bits": 8}), **group("post_training_quantization", {"target_bits": 8})},
     "selected by both weight_quantization and post_training_quantization"),
    (gpt2, group("head_pruning", {"dense_ratio": 0.5}), "head_pruning is not supported for gpt2"),
    (llama, {"layer_reduction": {"keep_number_layer": 2, "teacher_layer": [0, 1]}}, "keeps 2 of 2 layers"),
    (llama, {"layer_reduction": {"keep_number_layer": 1, "teacher_layer": [5]}}, "names layer 5, but the model has 2"),
    (llama, {"layer_reduction": {"keep_number_layer": 1, "teacher_layer": [1], "module_name_prefix": "bert.encoder.layer"}},
     "module_name_prefix 'bert.encoder.layer' is not this model's layer list 'model.layers'"),
])
def test_config_that_does_not_fit_the_model_is_a_clear_error(make, block, message):
    with pytest.raises(ValueError) as e:
        prepare(make(), parse_compression(block))
    assert message in str(e.value)


def test_a_module_in_two_groups_is_an_error():
    block = {"sparse_pruning": {"shared_parameters": {"enabled": True}, "different_groups": {
        "a": {"params": {"dense_ratio": 0.5}, "modules": ["q_proj"]},
        "b": {"params": {"dense_ratio": 0.3}, "modules": ["layers.0"]}}}}
    with pytest.raises(CompressionConfigError, match="model.layers.0.self_attn.q_proj is selected by groups 'a' and 'b'"):
        prepare(llama(), parse_compression(block))


# ---------------------------------------------------------------- integer math

@pytest.mark.parametrize("scheme", [QuantScheme(8), QuantScheme(8, 0, False), QuantScheme(4, 16), QuantScheme(4, 24, False),
                                    QuantScheme(8, 7)])
def test_quantize_round_trip(scheme):
    torch.manual_seed(0)
    w = torch.randn(10, 64)
    w[:, 3] = 0
    codes, scale, zero = quantize(w, scheme)
    deq = dequantize(codes, scale, zero, scheme)
    assert torch.equal(deq, fake_quantize(w, scheme))                  # storage == what training saw
    assert (deq[:, 3] == 0).all()                                       # pruned weights stay exactly 0
    assert torch.equal(quantize(deq, scheme)[0], codes)                 # quantizing again changes nothing
    step = scale.max().item()
    assert (deq - w).abs().max() <= step / 2 + 1e-6
    assert int(codes.max()) < 2 ** scheme.bits
    if scheme.bits == 4:
        assert torch.equal(unpack_nibbles(pack_nibbles(codes), codes.numel()).reshape(codes.shape), codes)


def test_fake_quantize_passes_gradients_straight_through():
    w = torch.randn(4, 8, requires_grad=True)
    fake_quantize(w, QuantScheme(4)).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bit_packing():
    mask = torch.rand(101) > 0.3
    assert torch.equal(unpack_bits(pack_bits(mask), 101), mask)
    assert pack_bits(mask).numel() == 13


def test_sparsity_schedule_is_cubic_from_offset_to_end():
    assert kept_share(5, 0.5, offset=10, end=20) == 1.0
    assert kept_share(10, 0.5, offset=10, end=20) == 1.0
    assert kept_share(15, 0.5, offset=10, end=20) == pytest.approx(0.5 + 0.5 * 0.125)
    assert kept_share(20, 0.5, offset=10, end=20) == 0.5 == kept_share(99, 0.5, offset=10, end=20)
    assert kept_share(10, 0.3, offset=10, end=10) == 0.3


def test_hidden_state_pairs():
    assert hidden_pairs([1, 3], 4) == [(1, 2), (2, 4)]
    assert hidden_pairs([0, 1, 2], 3) == [(1, 1), (2, 2), (3, 3)]


# ---------------------------------------------------------------- each method: trains, cleans exactly, stores

METHODS = {
    "int8_qat": group("weight_quantization", {"target_bits": 8}),
    "int4_grouped_asym": group("weight_quantization", {"target_bits": 4, "group_size": 16},
                               quantization_type="asymmetric"),
    "int8_qat_activations": {**group("weight_quantization", {"target_bits": 8}),
                             **group("activation_quantization", {"bits": 8}, modules=[r"\.(layers?|h)\.\d+\."])},
    "sparse": group("sparse_pruning", {"dense_ratio": 0.5}, modules=[r"\.(layers?|h)\.\d+\."], schedule_offset=2,
                    schedule_offset_end=6, schedule_offset_stride=2),
    "rows": group("row_pruning", {"dense_ratio": 0.5}, modules=["mlp|intermediate"], schedule_offset=2),
    "heads": group("head_pruning", {"dense_ratio": 0.5}, modules=["attn|attention"], schedule_offset=2),
    "rows_int4": {**group("row_pruning", {"dense_ratio": 0.5}, modules=["mlp|intermediate"], schedule_offset=2),
                  **group("weight_quantization", {"target_bits": 4, "group_size": 16})},
    "half_layers_kd": {"layer_reduction": {"keep_number_layer": 2, "teacher_layer": [1, 3]},
                       "knowledge_distillation": {"hidden_weight": 1.0}},
}
CASES = [(arch, method) for arch in MODELS for method in METHODS if not (arch == "gpt2" and method == "heads")]


@pytest.mark.parametrize("arch, method", CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_method_trains_and_cleans_to_the_same_outputs(arch, method, tmp_path):
    layers = 4 if method == "half_layers_kd" else 2
    model = MODELS[arch](layers=layers)
    losses, compressor, teacher = train(model, METHODS[method])
    assert losses[-1] < losses[0], losses  # the loss falls
    batch = batch_for(model)
    trained = logits(model, batch)
    cleaned = clean(model, compressor)
    scale = trained.abs().max()
    # The plain HF model computes what the compressed training model computed (activation
    # quantization aside, which only the compressed format carries).
    tolerance = 0.05 * scale if "activations" in method else 1e-4 * scale
    assert (logits(cleaned.hf_model, batch) - trained).abs().max() <= tolerance
    assert (logits(cleaned.model, batch) - trained).abs().max() <= tolerance
    save_compressed(cleaned.model, cleaned.storage, str(tmp_path / "c"))
    exact = load_compressed(str(tmp_path / "c"), runtime="float")
    assert (logits(exact, batch) - trained).abs().max() <= 1e-4 * scale
    fast = load_compressed(str(tmp_path / "c"))  # int8 kernel: activations quantized too
    assert (logits(fast, batch) - trained).abs().max() <= 0.05 * scale


def test_structured_pruning_shrinks_parameters_by_the_configured_amount():
    hidden, inter, layers = 64, 128, 2
    model = llama()
    before = params(model)
    _, compressor, _ = train(model, METHODS["rows"], steps=3)
    cleaned = clean(model, compressor)
    assert params(cleaned.hf_model) == before - layers * 3 * hidden * (inter // 2)  # gate, up rows and down columns
    assert cleaned.hf_model.config.intermediate_size == inter // 2

    model = llama()  # 4 heads sharing 2 key/value heads: one of the two groups kept
    _, compressor, _ = train(model, METHODS["heads"], steps=3)
    cleaned = clean(model, compressor)
    head_dim = hidden // 4
    attention = 2 * hidden * 4 * head_dim + 2 * hidden * 2 * head_dim  # q, o + k, v
    assert params(cleaned.hf_model) == before - layers * attention // 2
    c = cleaned.hf_model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, head_dim)

    model = llama(layers=4)
    full = params(model)
    _, compressor, _ = train(model, METHODS["half_layers_kd"], steps=3)
    cleaned = clean(model, compressor)
    per_layer = (full - params(llama(layers=2))) // 2
    assert params(cleaned.hf_model) == full - 2 * per_layer and cleaned.hf_model.config.num_hidden_layers == 2

    model = llama()
    _, compressor, _ = train(model, METHODS["sparse"], steps=8)
    cleaned = clean(model, compressor)
    for name, module in cleaned.model.named_modules():
        if name in cleaned.storage:
            assert (module.weight != 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_pruned_models_load_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = llama()
    _, compressor, _ = train(model, {**METHODS["rows"], **METHODS["heads"]}, steps=4)
    cleaned = clean(model, compressor)
    cleaned.hf_model.save_pretrained(tmp_path / "llama")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    batch = batch_for(model)
    assert torch.allclose(logits(plain, batch), logits(model, batch), atol=1e-4)
    assert params(plain) < params(llama())

    # BERT's config cannot describe fewer heads: the HF export keeps them as zeros, the compressed model cuts them.
    model = bert()
    _, compressor, _ = train(model, METHODS["heads"], steps=4)
    cleaned = clean(model, compressor)
    assert any("cannot describe" in n for n in cleaned.notes)
    cleaned.hf_model.save_pretrained(tmp_path / "bert")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    batch = batch_for(model)
    assert torch.allclose(logits(plain, batch), logits(model, batch), atol=1e-4)
    assert params(cleaned.model) < params(plain) == params(bert())
    save_compressed(cleaned.model, cleaned.storage, str(tmp_path / "bert_c"))
    loaded = load_compressed(str(tmp_path / "bert_c"))
    assert loaded.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 64)
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_int8_export_is_under_30_percent_of_fp32(arch, tmp_path):
    model = MODELS[arch]()
    reference = copy.deepcopy(model)
    compressor = prepare(model, parse_compression(group("post_training_quantization", {"target_bits": 8})))
    cleaned = clean(model, compressor)
    save_compressed(cleaned.model, cleaned.storage, str(tmp_path / "int8"))
    reference.save_pretrained(tmp_path / "fp32")
    ratio = weight_bytes(str(tmp_path / "int8")) / weight_bytes(str(tmp_path / "fp32"))
    assert ratio <= 0.30, ratio
    batch = batch_for(model)
    expected = logits(reference, batch)
    got = logits(load_compressed(str(tmp_path / "int8")), batch)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_int4_is_smaller_than_int8_and_sparse_is_smaller_than_dense(tmp_path):
    sizes = {}
    for name, block in (("int8", group("post_training_quantization", {"target_bits": 8})),
                        ("int4", group("post_training_quantization", {"target_bits": 4, "group_size": 32})),
                        ("dense", group("row_pruning", {"dense_ratio": 1.0}, modules=["mlp"])),
                        ("sparse", METHODS["sparse"])):
        model = llama()
        _, compressor, _ = train(model, block, steps=8) if name == "sparse" else (None, prepare(model, parse_compression(block)), None)
        cleaned = clean(model, compressor)
        save_compressed(cleaned.model, cleaned.storage, str(tmp_path / name))
        sizes[name] = weight_bytes(str(tmp_path / name))
    assert sizes["int4"] < 0.7 * sizes["int8"]
    assert sizes["sparse"] < 0.8 * sizes["dense"]


def test_tied_embedding_and_head_are_quantized_together_and_stored_once(tmp_path):
    model = llama()
    compressor = prepare(model, parse_compression(group("weight_quantization", {"target_bits": 8}, modules=["lm_head"])))
    assert any("model.embed_tokens shares its weight with lm_head" in n for n in compressor.plan.notes)
    compressor.finalize()
    cleaned = clean(model, compressor)
    save_compressed(cleaned.model, cleaned.storage, str(tmp_path / "t"))
    meta = json.load(open(tmp_path / "t" / "compression.json"))
    tied = {meta["modules"]["lm_head"]["tied_to"], meta["modules"]["model.embed_tokens"]["tied_to"]}
    assert tied in ({None, "lm_head"}, {None, "model.embed_tokens"})  # one holds the tensor, the other points at it
    batch = batch_for(model)
    assert torch.allclose(logits(load_compressed(str(tmp_path / "t"), runtime="float"), batch), logits(model, batch),
                          atol=1e-4)


def test_bert_masked_lm_head_bias_is_stored_once_and_loads(tmp_path):
    # BertForMaskedLM ties cls.predictions.bias to its decoder's bias: safetensors refuses shared memory.
    from transformers import AutoConfig, AutoModelForMaskedLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        model.cls.predictions.bias.normal_()  # not zeros, so that a lost bias shows in the logits
    reference = copy.deepcopy(model)
    cleaned = clean(model, prepare(model, parse_compression(group("post_training_quantization", {"target_bits": 8}))))
    save_compressed(cleaned.model, cleaned.storage, str(tmp_path / "mlm"))
    meta = json.load(open(tmp_path / "mlm" / "compression.json"))
    assert meta["aliases"]["cls.predictions.bias"] == "cls.predictions.decoder.bias"
    batch = batch_for(model)
    expected = logits(reference, batch)
    got = logits(load_compressed(str(tmp_path / "mlm"), runtime="float"), batch)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()


def test_quantization_turns_on_at_its_schedule_offset():
    model = llama()
    reference = copy.deepcopy(model)
    compressor = prepare(model, parse_compression(group("weight_quantization", {"target_bits": 4}, schedule_offset=5)))
    batch = batch_for(model)
    compressor.update(4)
    assert torch.equal(logits(model, batch), logits(reference, batch))
    compressor.update(5)
    assert not torch.allclose(logits(model, batch), logits(reference, batch))


def test_structured_masks_survive_a_state_dict_round_trip():
    """Masks are buffers: a resumed run (DeepSpeed checkpoint = state dict) continues with them."""
    model = llama()
    _, compressor, _ = train(model, METHODS["rows"], steps=4)
    resumed = llama()
    resumed_compressor = prepare(resumed, parse_compression(METHODS["rows"]))
    resumed.load_state_dict(model.state_dict())
    assert resumed_compressor.update(4) == []  # nothing to redo
    assert resumed_compressor.kept_rows() == compressor.kept_rows()


def test_load_compressed_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a compressed model folder"):
        load_compressed(str(tmp_path))
    with pytest.raises(ValueError, match="runtime must be one of"):
        from pipeline.compression.runtime import resolve_runtime

        resolve_runtime("int3")
