"""Data: readers for raw text, the tokenizer, memory-mapped token shards and training datasets."""
from pipeline.data.shards import ShardWriter, TokenShards, token_dtype

__all__ = ["ShardWriter", "TokenShards", "token_dtype"]
