"""Pipeline parallelism for the HuggingFace decoders: the same modules, as a DeepSpeed `PipelineModule`.

The HF model is built first, exactly as for a plain run (same seed, same initial weights); its
modules are then wrapped, not copied, into a sequence of pipeline layers. Model code
(pipeline/models/build.py) knows nothing of this. Layers for L decoder blocks:

    idx     layer                 wraps (Llama / GPT-2)                      in -> out
    0       TokenEmbeddingPipe    model.embed_tokens / transformer.wte       input_ids (B, T) -> (h, pos)
   (1)      PositionEmbeddingPipe - / transformer.wpe + drop (GPT-2 only)    (h, pos) -> (h, pos)
    ..      DecoderLayerPipe      model.layers.i / transformer.h.i           (h, pos) -> (h, pos)
    ..      FinalNormPipe         model.norm / transformer.ln_f              (h, pos) -> h
    last    head                  lm_head, or the token embedding's weight   h (B, T, C) -> logits (B, T, V)
    loss    causal_lm_loss        shifted cross-entropy (cross_entropy.py)   (logits, labels) -> scalar

Between stages only a tuple of tensors travels: the hidden states h (B, T, C) and position_ids
(1, T) (int64, no gradient). Each decoder wrapper computes its own rotary cos/sin from position_ids
and its causal mask with HF's `create_causal_mask` (None for SDPA, which then runs is_causal, as in
the plain model), so no stage needs state from another beyond those tensors.

Tied input/output embeddings (the Llama presets, GPT-2) use one `TiedLayerSpec` key for the token
embedding and the head: DeepSpeed keeps a copy on the first and the last stage, starts both from the
first stage's weights and all-reduces their gradients, so the pair trains as one parameter.

Names map one to one: each wrapper holds its HF module as `hf`, so layer i's state dict (what
DeepSpeed writes as `layer_{i:02d}-model_states.pt`) has keys `hf.<rest>` for the HF keys
`<prefix of layer i><rest>`. `pipe_to_hf` / `hf_to_pipe` convert between {layer index: layer state
dict} and the HF state dict.

Activation checkpointing (`pipeline.activation_checkpoint_interval` > 0) uses DeepSpeed's
non-reentrant checkpoint by default: it gives gradients to a checkpointed first layer whose input
(token ids) needs none, so the embedding can sit inside a checkpointed chunk. With
`"use_reentrant": true` in the pipeline block, only decoder layers are checkpointed (the reentrant
function would cut the embedding off from its gradient).
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """What differs between the supported decoder families: attribute paths inside the HF model."""
    base: str                # the decoder trunk inside the *ForCausalLM model
    embed: str               # token embedding
    blocks: str              # the ModuleList of decoder blocks
    norm: str                # final norm
    positions: str | None    # learned position embedding (GPT-2), else None
    dropout: str | None      # embedding dropout (GPT-2), else None
    rotary: str | None       # rotary embedding module (Llama), else None


FAMILIES = {
    "llama": Family(base="model", embed="embed_tokens", blocks="layers", norm="norm", positions=None, dropout=None,
                    rotary="rotary_emb"),
    "gpt2": Family(base="transformer", embed="wte", blocks="h", norm="ln_f", positions="wpe", dropout="drop",
                   rotary=None),
}
TIE_KEY = "embed"


@dataclass(frozen=True)
class PipeLayer:
    """One pipeline layer: its wrapper class name (what `type:REGEX` partitioning matches) and the HF
    key prefix of the module it holds (None for a tied head, which holds no weights of its own)."""
    kind: str
    hf_prefix: str | None


# ---------------------------------------------------------------- the layer wrappers

def _split(inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, position_ids) from what the previous layer passed on."""
    if isinstance(inputs, (tuple, list)):
        return inputs[0], (inputs[1] if len(inputs) > 1 else None)
    return inputs, None


class TokenEmbeddingPipe(nn.Module):
    """input_ids (B, T) -> (embeddings (B, T, C), position_ids (1, T)).

    Position ids are 0..T-1, as the HF model makes them without a cache: the packed windows have no
    padding and attend causally across document boundaries, as in the plain run."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.hf = embedding

    def forward(self, input_ids: torch.Tensor):
        hidden = self.hf(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return hidden, position_ids


def tied_head(embedding: TokenEmbeddingPipe, inputs) -> torch.Tensor:
    """The output projection with the token embedding's weight: (B, T, C) -> logits (B, T, V),
    what HF's lm_head (a bias-free Linear sharing that weight) computes."""
    hidden, _ = _split(inputs)
    return nn.functional.linear(hidden, embedding.hf.weight)


class PositionEmbeddingPipe(nn.Module):
    """GPT-2's learned positions and embedding dropout: (h, pos) -> (drop(h + wpe(pos)), pos)."""

    def __init__(self, positions: nn.Embedding, dropout: nn.Module | None):
        super().__init__()
        self.hf = positions
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, inputs):
        hidden, position_ids = _split(inputs)
        return self.dropout(hidden + self.hf(position_ids)), position_ids


class DecoderLayerPipe(nn.Module):
    """One HF decoder block: (h, pos) -> (h, pos), with the rotary embedding (when the family has
    one; a shared module without persistent state) and the causal mask computed here."""

    def __init__(self, block: nn.Module, config, rotary: nn.Module | None):
        super().__init__()
        self.hf = block
        self.rotary = rotary
        self.config = config  # for create_causal_mask (attention implementation); not a module

    def forward(self, inputs):
        from transformers.masking_utils import create_causal_mask

        hidden, position_ids = _split(inputs)
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        extra = {"position_embeddings": self.rotary(hidden, position_ids)} if self.rotary is not None else {}
        hidden = self.hf(hidden, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra)
        return hidden, position_ids


class FinalNormPipe(nn.Module):
    """(h, pos) -> norm(h)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.hf = norm

    def forward(self, inputs):
        hidden, _ = _split(inputs)
        return self.hf(hidden)


class LMHeadPipe(nn.Module):
    """An untied output projection: h (B, T, C) -> logits (B, T, V)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.hf = head

    def forward(self, inputs):
        hidden, _ = _split(inputs)
        return self.hf(hidden)


def causal_lm_loss(logits: torch.Tensor, labels) -> torch.Tensor:
    """The shifted cross-entropy of causal LMs, as the unpipelined model's (pipeline/models/cross_entropy.py):
    the mean over label tokens (labels != -100) of micro-batch (B, T). When labels is a pair
    (labels, n), it is the sum over label tokens divided by n instead (token-weighted evaluation)."""
    from pipeline.models.cross_entropy import lm_loss

    num_items = None
    if isinstance(labels, (tuple, list)):
        labels, num_items = labels
    return lm_loss(logits, labels, shift=True, num_items=num_items)


# ---------------------------------------------------------------- layout and name mapping

def family_of(config) -> Family:
    if config.model_type not in FAMILIES:
        raise ValueError(f"pipeline parallelism supports the decoder families {sorted(FAMILIES)}; the model is "
                         f"{config.model_type!r}: drop the 'pipeline' block (use ZeRO-3 to split its weights instead)")
    return FAMILIES[config.model_type]


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def pipe_layout(config) -> list[PipeLayer]:
    """The pipeline layers of an HF decoder config, in order (pure: no model, no process group)."""
    fam = family_of(config)
    layers = [PipeLayer(TokenEmbeddingPipe.__name__, f"{fam.base}.{fam.embed}.")]
    if fam.positions:
        layers.append(PipeLayer(PositionEmbeddingPipe.__name__, f"{fam.base}.{fam.positions}."))
    layers += [PipeLayer(DecoderLayerPipe.__name__, f"{fam.base}.{fam.blocks}.{i}.")
               for i in range(config.num_hidden_layers)]
    layers.append(PipeLayer(FinalNormPipe.__name__, f"{fam.base}.{fam.norm}."))
    # A tied head is a TiedLayerSpec of the embedding's type (what DeepSpeed's type: partitioning sees).
    layers.append(PipeLayer(TokenEmbeddingPipe.__name__, None) if _tied(config)
                  else PipeLayer(LMHeadPipe.__name__, "lm_head."))
    return layers


WRAPPER_PREFIX = "hf."


def pipe_to_hf(layers: dict[int, dict[str, torch.Tensor]], config) -> dict[str, torch.Tensor]:
    """{pipeline layer index: that layer's state dict} -> the HF model's state dict (for a tied
    head, lm_head.weight is the embedding's tensor, as in HF's own state dict)."""
    layout = pipe_layout(config)
    state: dict[str, torch.Tensor] = {}
    for idx, layer in enumerate(layout):
        if layer.hf_prefix is None:
            continue
        if idx not in layers:
            raise KeyError(f"pipeline layer {idx} ({layer.kind}, HF {layer.hf_prefix}*) is missing")
        for key, value in layers[idx].items():
            if not key.startswith(WRAPPER_PREFIX):
                raise KeyError(f"pipeline layer {idx}: unexpected key {key!r} (expected {WRAPPER_PREFIX}*)")
            state[layer.hf_prefix + key[len(WRAPPER_PREFIX):]] = value
    if _tied(config):
        state["lm_head.weight"] = state[layout[0].hf_prefix + "weight"]
    return state


def hf_to_pipe(state: dict[str, torch.Tensor], config) -> dict[int, dict[str, torch.Tensor]]:
    """The HF model's state dict -> {pipeline layer index: layer state dict}. Every HF key must land
    in exactly one layer (a tied lm_head.weight is the embedding's and is dropped)."""
    layout = pipe_layout(config)
    layers: dict[int, dict[str, torch.Tensor]] = {i: {} for i, lay in enumerate(layout) if lay.hf_prefix}
    # Longest prefix first, so that no prefix can swallow a longer one's keys.
    by_prefix = sorted(((lay.hf_prefix, i) for i, lay in enumerate(layout) if lay.hf_prefix), key=lambda p: -len(p[0]))
    for key, value in state.items():
        if key == "lm_head.weight" and _tied(config):
            continue
        idx = next((i for prefix, i in by_prefix if key.startswith(prefix)), None)
        if idx is None:
            raise KeyError(f"HF key {key!r} belongs to no pipeline layer")
        layers[idx][WRAPPER_PREFIX + key[len(layout[idx].hf_prefix):]] = value
    return layers


def layer_specs(hf_model) -> list:
    """LayerSpec/TiedLayerSpec over hf_model's own modules, in `pipe_layout` order. A spec's build()
    wraps the existing module, so every stage trains the weights the plain model was initialized with."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    config = hf_model.config
    fam = family_of(config)
    base = hf_model.get_submodule(fam.base)
    embed = base.get_submodule(fam.embed)
    rotary = base.get_submodule(fam.rotary) if fam.rotary else None
    tied = _tied(config)
    if tied and hf_model.get_output_embeddings().weight is not embed.weight:
        raise ValueError("config.tie_word_embeddings is true but lm_head.weight is not the input embedding's tensor")

    specs = [TiedLayerSpec(TIE_KEY, TokenEmbeddingPipe, embed, tied_weight_attr=["hf.weight"]) if tied
             else LayerSpec(TokenEmbeddingPipe, embed)]
    if fam.positions:
        specs.append(LayerSpec(PositionEmbeddingPipe, base.get_submodule(fam.positions),
                               base.get_submodule(fam.dropout) if fam.dropout else None))
    specs += [LayerSpec(DecoderLayerPipe, block, config, rotary) for block in base.get_submodule(fam.blocks)]
    specs.append(LayerSpec(FinalNormPipe, base.get_submodule(fam.norm)))
    specs.append(TiedLayerSpec(TIE_KEY, TokenEmbeddingPipe, embed, forward_fn=tied_head, tied_weight_attr=["hf.weight"])
                 if tied else LayerSpec(LMHeadPipe, hf_model.get_output_embeddings()))
    return specs


# ---------------------------------------------------------------- checks and the PipelineModule

def check_pipeline(config, objective: str, ds_config: dict) -> None:
    """Everything that can be wrong with a pipelined run of this model, before any process starts."""
    block = ds_config.get("pipeline", {})
    stages = block.get("stages", 1)
    if objective != "clm":
        raise ValueError(f"pipeline parallelism ('pipeline.stages' {stages}) is for causal LMs (--objective clm); "
                         f"for --objective {objective} drop the 'pipeline' block")
    layout = pipe_layout(config)
    if stages > len(layout):
        raise ValueError(f"pipeline.stages {stages} is more than the model's {len(layout)} pipeline layers "
                         f"(embedding, {config.num_hidden_layers} blocks, norm, head)")
    method = str(block.get("partition", "parameters"))
    if method.lower().startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        matched = [lay.kind for lay in layout if pattern.search(lay.kind)]
        if len(matched) < stages:
            raise ValueError(f"pipeline.partition {method!r} matches {len(matched)} layers ({sorted(set(matched))}) "
                             f"for {stages} stages; the layer types are {sorted({lay.kind for lay in layout})}")


def describe_stages(hf_model, ds_config: dict) -> str:
    """Which layers each stage gets (for --dry-run, without a process group): DeepSpeed's own
    partition functions over the same weights PipelineModule uses (trainable parameters per layer
    for 'parameters', 1 per matching layer for 'type:REGEX', layer count for 'uniform')."""
    from deepspeed.runtime import utils as ds_utils

    block = ds_config["pipeline"]
    stages, method = block["stages"], str(block.get("partition", "parameters"))
    specs = layer_specs(hf_model)
    if method.lower() == "uniform":
        parts = ds_utils.partition_uniform(len(specs), stages)
    else:
        if method.lower() == "parameters":
            weights = [sum(p.numel() for p in spec.build().parameters() if p.requires_grad) for spec in specs]
        else:
            pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
            weights = [1 if pattern.search(spec.typename.__name__) else 0 for spec in specs]
        parts = ds_utils.partition_balanced(weights, stages)
    layout = pipe_layout(hf_model.config)
    lines = []
    for s in range(stages):
        names = [lay.hf_prefix.rstrip(".") if lay.hf_prefix else "lm_head (tied)" for lay in layout[parts[s]:parts[s + 1]]]
        lines.append(f"stage {s}: layers {parts[s]}..{parts[s + 1] - 1}: {', '.join(names)}")
    return "\n".join(lines)


def build_pipeline_module(hf_model, ds_config: dict):
    """The PipelineModule for hf_model with the `pipeline` block of a resolved DeepSpeed config
    (stages, partition, activation_checkpoint_interval, use_reentrant). Needs the process group."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.activation_checkpointing import checkpointing

    block = ds_config["pipeline"]
    reentrant = block.get("use_reentrant", False) is True
    # no_grad: the constructor broadcasts the tied weights in place, which autograd would otherwise
    # record on the parameter (and warn about in every backward).
    with torch.no_grad():
        module = PipelineModule(
            layers=layer_specs(hf_model), num_stages=block["stages"], loss_fn=causal_lm_loss,
            partition_method=block.get("partition", "parameters"),
            activation_checkpoint_interval=block.get("activation_checkpoint_interval", 0),
            activation_checkpoint_func=checkpointing.checkpoint if reentrant else checkpointing.non_reentrant_checkpoint,
            checkpointable_layers=[DecoderLayerPipe.__name__] if reentrant else None)
    parts = module.partitions()
    empty = [s for s in range(block["stages"]) if parts[s] == parts[s + 1]]
    if empty:
        raise ValueError(f"pipeline.partition {block.get('partition', 'parameters')!r} leaves stage(s) {empty} "
                         f"without layers (boundaries {parts}); use fewer stages or another partition method")
    return module


# ---------------------------------------------------------------- gathering weights for export

def stage_layer_states(module) -> dict[int, dict[str, torch.Tensor]]:
    """This stage's {global layer index: layer state dict} on the CPU (a tied head has no entry:
    its weight is the embedding layer's)."""
    start = module.partitions()[module.stage_id]
    return {start + i: {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()}
            for i, layer in enumerate(module.forward_funcs) if isinstance(layer, nn.Module)}


def gather_hf_state_dict(engine, config) -> dict[str, torch.Tensor] | None:
    """The whole model's HF state dict on global rank 0 (None elsewhere), gathered from the first
    data-parallel replica of every stage. Every rank must call it (a collective)."""
    import torch.distributed as dist

    mine = stage_layer_states(engine.module) if engine.grid.data_parallel_id == 0 else {}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return pipe_to_hf(mine, config)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    layers = {idx: state for part in gathered for idx, state in part.items()}
    return pipe_to_hf(layers, config)


LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt$")


def is_pipeline_checkpoint(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "layer_*-model_states.pt")))


def read_layer_files(folder: str) -> dict[int, dict[str, torch.Tensor]]:
    """{layer index: state dict} from the layer_XX-model_states.pt files of one checkpoint tag."""
    layers = {}
    for path in sorted(glob.glob(os.path.join(folder, "layer_*-model_states.pt"))):
        match = LAYER_FILE.search(os.path.basename(path))
        if match:
            layers[int(match.group(1))] = torch.load(path, map_location="cpu", weights_only=True)
    return layers
