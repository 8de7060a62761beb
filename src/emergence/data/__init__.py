"""Training data: corpus -> memory-mapped token shards (`shards`)."""

from .shards import TokenShards, prepare_corpus

__all__ = ["TokenShards", "prepare_corpus"]
