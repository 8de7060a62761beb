"""Evaluation of a model on text: perplexity over windows, the log-likelihood of a continuation,
and how far a matrix's neighbourhoods move when it is quantized.

- `perplexity`: exp(mean next-token cross-entropy) over a token stream read in non-overlapping
  windows of the context (data/windows.py), so every token is predicted exactly once.
- `log_likelihood`: teacher-forced log P(continuation | context), summed over the
  continuation's tokens, and whether greedy decoding would have produced it: what
  lm-evaluation-harness's `loglikelihood` requests return, the basis of multiple-choice scores.
- `nearest_neighbours`, `distinct_rows`, `neighbour_overlap`, `relative_error`: the embedding
  space before and after quantization (do similar tokens stay close?).

Logits are computed by the model's own forward pass without a cache and compared in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.windows import windows
from .errors import InvalidArgument


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, *, context: int, bos_id: int | None,
               batch_size: int = 8) -> tuple[float, float, int]:
    """(perplexity, mean cross-entropy in nats, predicted tokens) of `tokens` (N,) under `model`."""
    pairs = windows(tokens, context, bos_id)
    if not pairs:
        raise InvalidArgument("perplexity needs at least one token to predict")
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(pairs), batch_size):
        group = pairs[i:i + batch_size]
        by_len: dict[int, list] = {}
        for inp, tgt in group:  # only the last window can be shorter: batch equal lengths together
            by_len.setdefault(len(inp), []).append((inp, tgt))
        for same in by_len.values():
            inp = torch.stack([p[0] for p in same]).to(device)
            tgt = torch.stack([p[1] for p in same]).to(device)
            logits = model(inp).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
            count += tgt.numel()
    mean = total / count
    return math.exp(mean), mean, count


@torch.no_grad()
def log_likelihood(model: nn.Module, context: Sequence[int], continuation: Sequence[int]) -> tuple[float, bool]:
    """(sum of log P(continuation[i] | context + continuation[:i]), whether every continuation
    token is the argmax at its position), teacher-forced in one forward pass. The context must
    hold at least one token, and both must fit the model's window."""
    if not context or not continuation:
        raise InvalidArgument("log_likelihood needs a non-empty context and a non-empty continuation")
    ids = list(context) + list(continuation)
    window = model.config.block_size
    if len(ids) - 1 > window:
        raise InvalidArgument(f"context + continuation of {len(ids)} tokens exceed the context window of {window}")
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids[:-1]], device=device))[0, len(context) - 1:].float()  # (len(continuation), V)
    logp = logits.log_softmax(dim=-1)
    target = torch.tensor(continuation, device=device)
    chosen = logp.gather(1, target[:, None])[:, 0]
    return chosen.sum().item(), bool((logp.argmax(dim=-1) == target).all())


# ------------------------------------------------------------------------ embedding space
def nearest_neighbours(w: torch.Tensor, k: int = 10, chunk: int = 4096) -> torch.Tensor:
    """(V, k) indices of each row's k nearest rows by cosine similarity, itself excluded."""
    unit = F.normalize(w.float(), dim=1)
    out = []
    for s in range(0, len(unit), chunk):
        sim = unit[s:s + chunk] @ unit.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -math.inf
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def distinct_rows(w: torch.Tensor, threshold: float = 0.999, chunk: int = 4096) -> torch.Tensor:
    """(V,) bool: rows whose most similar other row has cosine similarity below `threshold`.

    Tokens the training never used tend to collapse onto one shared vector (with a tied output
    head, every never-seen token gets the same gradient there); among such near-duplicates the
    nearest-neighbour order is decided by rounding noise, so an overlap is best also measured
    over the distinct rows only, neighbours searched among them.
    """
    unit = F.normalize(w.float(), dim=1)
    best = []
    for s in range(0, len(unit), chunk):
        sim = unit[s:s + chunk] @ unit.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -math.inf
        best.append(sim.max(dim=1).values)
    return torch.cat(best) < threshold


def neighbour_overlap(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over rows of |before_i & after_i| / k for (V, k) neighbour index tensors."""
    shared = (before[:, :, None] == after[:, None, :]).any(dim=2).sum(dim=1)
    return (shared.double() / before.shape[1]).mean().item()


def relative_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    """||w - wq||_F / ||w||_F."""
    return (torch.linalg.norm(w.double() - wq.double()) / torch.linalg.norm(w.double())).item()
