"""A token stream cut into the windows a model reads it in, every token predicted once."""

from __future__ import annotations

import torch


def windows(tokens: torch.Tensor, context: int, bos_id: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, target) pairs over non-overlapping windows of at most `context` positions.

    With BOS: input = [BOS] + chunk[:-1], target = chunk, chunks of `context` tokens, so every
    token is predicted once. Without: the first token is context only, and each later window's
    first input is the token just before its chunk (training's reading of a split: windows of
    context + 1 tokens with stride context).
    """
    pairs, start = [], 0 if bos_id is not None else 1
    while start < len(tokens):
        chunk = tokens[start:start + context]
        first = torch.tensor([bos_id]) if bos_id is not None else tokens[start - 1:start]
        pairs.append((torch.cat([first, chunk[:-1]]), chunk))
        start += context
    return pairs
