"""What search costs: forward FLOPs per token, and accuracy with its confidence interval.

A forward pass over one token at position p (it attends to the p + 1 tokens up to itself)
costs, after Kaplan et al. (2020), Table 1:

    2 x N  +  2 x n_layer x (p + 1) x d_attn

N is the parameters multiplied by the token: every matrix of the model except the embedding
tables (the LM head counts, tied or not; a reward model's score head replaces it); d_attn is
n_head x head_dim. The second term is the attention's QK^T over the context (Kaplan's
"attention: mask" row). Norms, rotary tables and the softmax are left out, as there. A
mixture of experts counts every expert (an upper bound). Prefilling P tokens then writing G
costs forward_flops(0, P) + forward_flops(P, G): every token, prompt or generated, passes
the model once (`forward_flops` sums the formula over positions start .. start + count - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class FlopsModel:
    """The shapes that price a token: N (matrix parameters), n_layer, d_attn."""

    params: int
    n_layer: int
    d_attn: int

    @classmethod
    def of(cls, model: nn.Module, config=None) -> FlopsModel:
        """From a model (a Transformer, or a RewardModel: its decoder and score head)."""
        config = config if config is not None else model.config
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        params = sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in embeddings)
        for m in model.modules():  # a tied LM head multiplies by the embedding table
            head = getattr(m, "lm_head", None)
            if isinstance(head, nn.Linear) and id(head.weight) in embeddings:
                params += head.weight.numel()
        return cls(int(params), int(config.n_layer), int(config.n_head * config.head_dim))

    def forward_flops(self, start: int, count: int) -> float:
        """FLOPs of `count` tokens at positions start .. start + count - 1 (the formula above)."""
        if count <= 0:
            return 0.0
        return 2.0 * self.params * count + 2.0 * self.n_layer * self.d_attn * attention_context(start, count)

    def generation_flops(self, prompt_tokens: int, generated: list[int]) -> float:
        """A prompt prefilled once, then samples of `generated` tokens each continuing it."""
        return self.forward_flops(0, prompt_tokens) + sum(self.forward_flops(prompt_tokens, g) for g in generated)


def attention_context(start: int, count: int) -> int:
    """Keys seen by the tokens at positions start .. start + count - 1: sum of (p + 1)."""
    return count * start + count * (count + 1) // 2


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion correct / total."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # exactly 0 (1) when none (all) are correct: the formula's rounding would leave ~1e-17, above
    # (below) the proportion itself
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == total else min(1.0, centre + half)
    return lo, hi
