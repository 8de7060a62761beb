"""Optimizer, learning-rate schedules and weight initialisation for training from scratch.

Schedules are pure functions of the step, so a resumed run needs only the step to be back
on the same curve:

- cosine: linear warmup to `lr`, cosine decay to `min_lr` at `max_steps` (GPT-3, LLaMA);
- wsd: warmup, stable at `lr`, then linear decay to `min_lr` over the last
  `decay_fraction` of the steps (warmup-stable-decay, MiniCPM);
- constant: warmup, then `lr`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidArgument
from ..model import MoE, Transformer

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate(step: int, *, schedule: str, lr: float, min_lr: float, warmup_steps: int, max_steps: int,
                  decay_fraction: float = 0.2) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_start = max_steps - round(decay_fraction * max_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
        return lr + (min_lr - lr) * progress
    raise InvalidArgument(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (linear and embedding weights) decay; biases and norm gains
    (1-D tensors) do not, since shrinking them towards 0 only fights the normalisation."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # a tied embedding appears twice
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float = 1e-8) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in model.parameters())  # one kernel for all parameters on GPU
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=fused or None)


@torch.no_grad()
def initialize_weights(model: Transformer, *, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """GPT-2's initialisation: N(0, 0.02) for matrices and embeddings, zero biases, unit norm
    gains; the projections that write into the residual stream (attention output, MLP down)
    get std / sqrt(2 * n_layer), so the residual's variance does not grow with depth."""
    residual_std = std / math.sqrt(2 * model.config.n_layer)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            is_residual = name.endswith("o_proj") or name.endswith("down_proj")
            module.weight.normal_(0.0, residual_std if is_residual else std, generator=generator)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std, generator=generator)
        elif isinstance(module, MoE):  # the stacked experts: each an MLP (down writes the residual)
            module.gate_up_proj.normal_(0.0, std, generator=generator)
            module.down_proj.normal_(0.0, residual_std, generator=generator)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 1:
            module.weight.fill_(1.0)  # RMSNorm / LayerNorm gain
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
