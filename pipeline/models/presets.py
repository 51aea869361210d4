"""Model presets: name -> HuggingFace config arguments. The vocabulary size comes from the tokenizer.

Sizes are the parameter counts at a 32k vocabulary (tied embeddings for the Llama presets).
`tiny`, `gpt2-tiny` and `bert-tiny` train on a laptop CPU in minutes; the rest are for GPUs.
"""
from __future__ import annotations

# model_type -> objective it pretrains with.
DECODERS = {"llama", "gpt2", "mistral", "qwen2", "gpt_neox", "opt", "phi", "gemma"}
ENCODERS = {"bert", "roberta", "distilbert", "electra"}


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, max_len: int) -> dict:
    return dict(model_type="llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_len,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, attention_dropout=0.0)


def _gpt2(hidden: int, layers: int, heads: int, max_len: int) -> dict:
    return dict(model_type="gpt2", n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_len,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)


def _bert(hidden: int, layers: int, heads: int, max_len: int) -> dict:
    return dict(model_type="bert", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, max_position_embeddings=max_len, type_vocab_size=2,
                hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


PRESETS: dict[str, dict] = {
    # Llama-style decoders (RMSNorm, RoPE, SwiGLU, grouped-query attention from 350m up).
    "tiny": _llama(128, 4, 4, 4, 344, 1024),            # ~0.8M + embeddings (1.8M at 8k vocab)
    "llama-20m": _llama(256, 8, 8, 8, 688, 2048),       # ~6M + 8M embeddings
    "llama-125m": _llama(768, 12, 12, 12, 2048, 2048),  # ~125M
    "llama-350m": _llama(1024, 24, 16, 8, 2816, 2048),  # ~350M
    "llama-1b": _llama(2048, 16, 32, 8, 8192, 2048),    # ~1.1B
    # GPT-2 style decoders (LayerNorm, learned positions, GELU MLP).
    "gpt2-tiny": _gpt2(128, 4, 4, 1024),
    "gpt2-small": _gpt2(768, 12, 12, 1024),             # GPT-2 124M
    # BERT-style encoders for masked-LM pretraining and classification.
    "bert-tiny": _bert(128, 2, 2, 512),
    "bert-mini": _bert(256, 4, 4, 512),
    "bert-base": _bert(768, 12, 12, 512),                # BERT-base 110M
}
