"""The auxiliary losses and metrics of training a mixture of experts (model.MoE).

Each MoE layer keeps its last forward's router logits (N tokens, E experts) and choices.
- Load balancing (Switch Transformer eq. 4-6, as transformers' Mixtral computes it over all
  layers at once): E * sum_i f_i * P_i, with f_i the share of the N k choices routed to expert i
  and P_i the mean router probability of expert i, both over every layer's tokens.
  Balanced routing gives k; all tokens on one expert E * k.
- Router z-loss (ST-MoE): mean over every layer's tokens of logsumexp(router logits)^2, which
  keeps the logits small and the router's softmax stable.
- Metrics: both losses and, per layer, the share of the choices each expert took, and the fraction the
  capacity dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def load_balancing_loss(layers: list[MoE]) -> torch.Tensor:
    logits = torch.cat([m.router_logits for m in layers]).float()  # (L N, E)
    E, k = layers[0].n_experts, layers[0].k
    probs = logits.softmax(dim=-1)
    choices = probs.topk(k, dim=-1).indices
    # f_i, summing to k (counted by index_add: bincount would wait for the device to size its result)
    share = torch.zeros(E, device=logits.device).index_add_(0, choices.flatten(), torch.ones(choices.numel(),
                                                                                              device=logits.device))
    share = share / logits.shape[0]
    return E * (share * probs.mean(dim=0)).sum()


def router_z_loss(layers: list[MoE]) -> torch.Tensor:
    logits = torch.cat([m.router_logits for m in layers]).float()
    return (torch.logsumexp(logits, dim=-1) ** 2).mean()


def auxiliary_loss(layers: list[MoE], balance_coef: float, z_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """coef-weighted sum of both losses, and the two losses detached (2,) for the metrics, left on
    the device: read back only when a metrics row is written, not on every micro-batch."""
    balance, z = load_balancing_loss(layers), router_z_loss(layers)
    return balance_coef * balance + z_coef * z, torch.stack([balance, z]).detach()


def metrics(layers: list[MoE], losses: torch.Tensor) -> dict[str, object]:
    """The last micro-batch's routing for a metrics row: both auxiliary losses (from
    auxiliary_loss), each layer's expert shares of the choices (rounded), and the mean fraction
    of choices the capacity dropped."""
    balance, z = losses.tolist()
    shares = [(torch.bincount(m.choices.flatten(), minlength=m.n_experts).float() / m.choices.numel()).tolist()
              for m in layers]
    return {"moe_balance_loss": balance, "moe_z_loss": z,
            "expert_share": [[round(s, 4) for s in layer] for layer in shares],
            "moe_dropped": sum(m.dropped for m in layers) / len(layers)}
