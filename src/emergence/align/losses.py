"""Alignment losses as pure functions: tensors in, (loss, stats) out; no model, no optimizer.

Formulas follow TRL's trainers (RewardTrainer, DPOTrainer, PPOTrainer, GRPOTrainer): the same
inputs give TRL's numbers; where TRL has a quirk, the docstring says which way this module goes.
Stats are detached 0-dim tensors (`float()` them to log), keyed as TRL logs them.

Shapes: B rows (sequences, or pairs for the preference losses), T tokens, V vocabulary. A mask
is bool or 0/1 of shape (B, T), true on the tokens that count (completion tokens).

    sequence_logps       logits, ids, completion mask -> summed / averaged completion log-probs
    reward_model_loss    -logsigmoid(r_c - r_r - margin) [+ c * mean((r_c + r_r)^2)]
    dpo_loss             sigmoid (with cDPO label smoothing) and IPO
    ppo_advantages       per-token KL penalty + score, GAE, whitened advantages (one rollout)
    ppo_loss             clipped policy loss + vf_coef * clipped value loss (one minibatch)
    grpo_advantages      (r - group mean) / (group or batch std + 1e-4)
    grpo_loss            clipped token ratio (epsilon_low, epsilon_high), k3 KL, four normalisations
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument

Tensor = torch.Tensor
Stats = dict[str, Tensor]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _fraction(condition: Tensor, like: Tensor) -> Tensor:
    """A boolean tensor as numbers of `like`'s float type (at least float32), for rates."""
    return condition.to(torch.promote_types(like.dtype, torch.float32))


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(values * mask) / sum(mask), over all elements or along `dim` (TRL's masked_mean)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked elements, var unbiased (Bessel), as TRL's
    masked_whiten; shift_mean=False adds the mean back (scales without centring). Positions
    outside the mask are transformed too: callers zero them afterwards."""
    count = mask.sum()
    if count < 2:  # TRL raises for 0 and divides by zero for 1
        raise InvalidArgument(f"whitening needs at least 2 masked values, got {int(count)}")
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ------------------------------------------------------------------ log-probabilities
class SequenceLogps(NamedTuple):
    total: Tensor  # (B,) sum of the completion tokens' log-probs (DPO's log pi(y|x))
    mean: Tensor  # (B,) total / max(count, 1) (IPO's length-normalised log-prob)
    per_token: Tensor  # (B, T-1) log p(ids[:, t+1] | ids[:, :t+1]), 0 where not a completion token
    count: Tensor  # (B,) completion tokens scored


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> SequenceLogps:
    """Completion log-probabilities of each row, from one forward pass over prompt + completion.

    logits (B, T, V) are the model's outputs for input_ids (B, T); completion_mask (B, T) marks
    the completion tokens *in input_ids* (false on the prompt and on padding). The shift: the
    logits at position t predict token t+1, so per_token[:, t] = log_softmax(logits[:, t])[ids[:, t+1]]
    for t < T-1, counted where completion_mask[:, t+1] (TRL's shift_logits / shift_labels /
    shift_completion_mask). The first token is never scored (nothing predicts it). Log-softmax runs
    in float32 at least; masked positions are set to 0 rather than multiplied (no -inf * 0).
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise InvalidArgument(f"sequence_logps takes logits (B, T, V) with input_ids and completion_mask (B, T), "
                              f"got {tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(completion_mask.shape)}")
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    shift_logits, labels, mask = logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:].bool()
    picked = shift_logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    per_token = torch.where(mask, picked - torch.logsumexp(shift_logits, dim=-1), 0.0)
    total, count = per_token.sum(-1), mask.sum(-1)
    return SequenceLogps(total, total / count.clamp(min=1), per_token, count)


# ------------------------------------------------------------------ reward model
def reward_model_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                      center_rewards_coefficient: float | None = None) -> tuple[Tensor, Stats]:
    """Bradley-Terry loss of a reward model (TRL RewardTrainer.compute_loss).

    chosen, rejected (B,): the scalar rewards r_c, r_r of each pair; margin (B,) optional.

        loss = mean(-logsigmoid(r_c - r_r - margin)) [+ c * mean((r_c + r_r)^2)]

    The centring term (center_rewards_coefficient c, Eisenstein et al. 2023) pulls the rewards
    towards zero mean. Stats: accuracy = mean(r_c > r_r) (ties count as wrong), margin =
    mean(r_c - r_r), chosen_reward / rejected_reward means, and min/mean/max over all 2B rewards.
    """
    diff = chosen - rejected
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    every = torch.cat([chosen, rejected]).detach()
    stats = {"accuracy": _fraction(chosen > rejected, chosen).mean().detach(), "margin": diff.mean().detach(),
             "chosen_reward": chosen.mean().detach(), "rejected_reward": rejected.mean().detach(),
             "min_reward": every.min(), "mean_reward": every.mean(), "max_reward": every.max()}
    return loss, stats


# ------------------------------------------------------------------ DPO
DPO_LOSSES = ("sigmoid", "ipo")


def dpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_count: Tensor | None = None, rejected_count: Tensor | None = None) -> tuple[Tensor, Stats]:
    """DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on summed completion log-probs (B,)
    of the policy and the frozen reference (SequenceLogps.total).

    With the log-ratios rho_c = logp_c - ref_c and rho_r = logp_r - ref_r:

        sigmoid  loss = mean(-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)),  z = beta * (rho_c - rho_r)
        ipo      loss = mean((rho_c / n_c - rho_r / n_r - 1 / (2 * beta))^2)

    eps = label_smoothing is conservative DPO (the labels flipped with probability eps), TRL's
    sigmoid loss until 0.2x (TRL 1.x moved it to its "robust" and "exo_pair" losses); IPO takes
    none. IPO divides each log-ratio by its completion's token count n (chosen_count,
    rejected_count (B,), SequenceLogps.count, clamped to >= 1): log-ratios of average per-token
    log-probs, as TRL does. Stats, from the summed log-ratios: rewards/chosen = mean(beta * rho_c),
    rewards/rejected, rewards/accuracies = mean(beta rho_c > beta rho_r), rewards/margins, and
    logps/chosen, logps/rejected (policy means).
    """
    _check_choice("loss_type", loss_type, DPO_LOSSES)
    if not 0.0 <= label_smoothing < 0.5:
        raise InvalidArgument(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if not beta > 0:
        raise InvalidArgument(f"beta must be positive, got {beta}")
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        logits = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        if label_smoothing:
            raise InvalidArgument("the ipo loss takes no label_smoothing")
        if chosen_count is None or rejected_count is None:
            raise InvalidArgument("the ipo loss averages per token: give chosen_count and rejected_count")
        delta = chosen_ratio / chosen_count.clamp(min=1) - rejected_ratio / rejected_count.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    stats = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
             "rewards/accuracies": _fraction(chosen_rewards > rejected_rewards, chosen_rewards).mean(),
             "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
             "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean()}
    return losses.mean(), stats


# ------------------------------------------------------------------ PPO
KL_ESTIMATORS = ("k1", "k3")


class PPORollout(NamedTuple):
    """What one rollout gives the PPO epochs that follow it; every tensor (B, T)."""

    advantages: Tensor  # whitened over the response mask, 0 outside it
    returns: Tensor  # raw (unwhitened) advantages + values: the value head's targets
    values: Tensor  # the rollout's values, 0 outside the value mask (the value loss's clip centre)
    rewards: Tensor  # per-token rewards: -kl_coef * KL, plus the score on its token
    stats: Stats


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman,
    "Approximating KL divergence"): k1 = logprob - ref_logprob; k3 = (r - 1) - log r with
    r = exp(ref_logprob - logprob) (non-negative, lower variance)."""
    _check_choice("kl_estimator", estimator, KL_ESTIMATORS)
    log_r = ref_logprobs - logprobs
    return -log_r if estimator == "k1" else torch.expm1(log_r) - log_r


@torch.no_grad()
def ppo_advantages(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, scores: Tensor, mask: Tensor, *,
                   kl_coef: float = 0.05, kl_estimator: str = "k1", gamma: float = 1.0, lam: float = 0.95,
                   whiten_rewards: bool = False, score_index: Tensor | None = None,
                   value_mask: Tensor | None = None) -> PPORollout:
    """Rewards, advantages and returns of one rollout, as TRL's PPOTrainer (the "PPOv2" of TRL
    0.11+, now trl.experimental.ppo) computes them before its PPO epochs.

    logprobs, ref_logprobs (B, T): the policy's and the reference's log-probs of the sampled
    response tokens (T = the response width, right-padded); values (B, T): the value head's
    estimates; scores (B,): the reward model's score of each whole response; mask (B, T): the
    response tokens (false on padding). Then, per row:

        KL_t      = kl_estimate(logprob_t, ref_logprob_t), 0 outside the mask
        reward_t  = -kl_coef * KL_t, plus scores at t = score_index (default: the last masked token)
        [whiten_rewards: reward = masked_whiten(reward, value_mask, shift_mean=False), 0 outside]
        delta_t   = reward_t + gamma * V_{t+1} - V_t                     (V_T = 0, V = 0 outside value_mask)
        A_t       = delta_t + gamma * lam * A_{t+1}                      (GAE, backwards over t, A_T = 0)
        returns   = A + V;  advantages = masked_whiten(A, mask) (centred), 0 outside the mask

    TRL's padding layout differs by one slot: it adds the score one token after the last response
    token (on the first padding slot, unless the response fills the width; huggingface/trl#3750)
    and trains the value on that slot too. Here the score lands on the last real token and the
    value mask is the response mask; pass score_index = last + 1 (capped at T - 1) and a value_mask
    one slot longer to reproduce TRL exactly. Stats as TRL's objective/*: kl and
    non_score_reward (sums per row, mean over rows), scores, rlhf_reward, entropy (-logprob summed).
    """
    mask = mask.bool()
    value_mask = mask if value_mask is None else value_mask.bool()
    B, T = logprobs.shape
    if mask.shape != (B, T) or value_mask.shape != (B, T) or values.shape != (B, T) or scores.shape != (B,):
        raise InvalidArgument(f"ppo_advantages takes (B, T) log-probs, values and masks and (B,) scores, got "
                              f"{tuple(logprobs.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}, "
                              f"{tuple(scores.shape)}")
    if not mask.any(dim=1).all():
        raise InvalidArgument("every row needs at least one response token")
    kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, kl_estimator), 0.0)
    non_score_reward = -kl_coef * kl
    if score_index is None:  # the last masked slot of each row
        score_index = (torch.arange(T, device=mask.device) * mask).argmax(dim=1)
    rewards = non_score_reward.clone()
    rewards[torch.arange(B, device=rewards.device), score_index] += scores.to(rewards.dtype)
    if whiten_rewards:
        rewards = masked_whiten(rewards, value_mask, shift_mean=False).masked_fill(~value_mask, 0.0)
    values = values.masked_fill(~value_mask, 0.0)
    gae = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        gae = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * gae
        reversed_advantages.append(gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    advantages = masked_whiten(advantages, mask).masked_fill(~mask, 0.0)
    non_score = non_score_reward.sum(1).mean()
    stats = {"objective/kl": kl.sum(1).mean(), "objective/non_score_reward": non_score,
             "objective/scores": scores.mean(), "objective/rlhf_reward": non_score + scores.mean(),
             "objective/entropy": torch.where(mask, -logprobs, 0.0).sum(1).mean()}
    return PPORollout(advantages, returns, values, rewards, stats)


def ppo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, vpred: Tensor, old_values: Tensor,
             returns: Tensor, mask: Tensor, *, value_mask: Tensor | None = None, cliprange: float = 0.2,
             cliprange_value: float = 0.2, vf_coef: float = 0.1, logits: Tensor | None = None) -> tuple[Tensor, Stats]:
    """PPO's clipped surrogate plus clipped value loss on one minibatch (TRL PPOTrainer's inner loop).

    logprobs (B, T): the current policy's log-probs of the rollout's tokens; old_logprobs,
    advantages, old_values, returns (B, T): from the rollout (PPORollout); vpred (B, T): the
    current value head; mask (B, T): response tokens; value_mask: the value loss's tokens
    (default: mask). With ratio = exp(logprobs - old_logprobs):

        pg = masked_mean(max(-A * ratio, -A * clamp(ratio, 1 - cliprange, 1 + cliprange)), mask)
        vf = 0.5 * masked_mean(max((vpred - R)^2, (clamp(vpred, V_old - cv, V_old + cv) - R)^2), value_mask)
        loss = pg + vf_coef * vf

    Stats as TRL logs them: policy/approxkl = 0.5 * mean((logprobs - old_logprobs)^2) over all B*T
    slots (0 on padding), policy/clipfrac (the clipped term was the larger), loss/policy,
    loss/value, val/clipfrac, val/ratio (mean over all slots, 1 on padding); with logits (B, T, V),
    policy/entropy: the mean entropy of the masked positions' distributions (TRL averages over
    the padding slots too).
    """
    mask = mask.bool()
    value_mask = mask if value_mask is None else value_mask.bool()
    diff = torch.where(mask, logprobs - old_logprobs, 0.0)
    ratio = torch.exp(diff)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), mask)
    vpred = vpred.masked_fill(~value_mask, 0.0)
    vpred_clipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses, vf_losses_clipped = (vpred - returns) ** 2, (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), value_mask)
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        stats = {"policy/approxkl": 0.5 * (diff ** 2).mean(),
                 "policy/clipfrac": masked_mean(_fraction(pg_losses_clipped > pg_losses, pg_losses), mask),
                 "loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(),
                 "val/clipfrac": masked_mean(_fraction(vf_losses_clipped > vf_losses, vf_losses), value_mask),
                 "val/ratio": ratio.mean()}
        if logits is not None:
            logits = logits if logits.dtype == torch.float64 else logits.float()
            entropy = torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1)
            stats["policy/entropy"] = masked_mean(entropy, mask)
    return loss, stats


# ------------------------------------------------------------------ GRPO
SCALE_REWARDS = ("group", "batch", "none")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std ignoring NaNs; NaN where fewer than two values (TRL's nanstd)."""
    keep = dim is not None
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=keep)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keep)
    var = torch.where(count > 1, var * count / (count - 1), torch.nan)
    return var.sqrt()


@torch.no_grad()
def grpo_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> tuple[Tensor, Stats]:
    """Group-relative advantages (Shao et al. 2024) of B = prompts * G completions (TRL
    GRPOTrainer, multi_objective_aggregation "sum_then_normalize").

    rewards (B,): one reward per completion, the G completions of a prompt consecutive (TRL's
    RepeatSampler order); NaN marks an unscorable completion, left out of its group's statistics.

        A = (r - mean_group(r)) / (std + 1e-4)

    std (unbiased) is the group's ("group"), the whole batch's ("batch": the mean stays the
    group's), or none ("none": A = r - mean_group). A group of identical rewards has std 0 and
    advantages 0 (the 1e-4 keeps it finite); NaN advantages become 0. Stats: reward, reward_std
    (batch mean and std), frac_reward_zero_std (completions whose std is 0).
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    B, G = rewards.numel(), num_generations
    if rewards.dim() != 1 or G < 1 or B % G:
        raise InvalidArgument(f"rewards (B,) must hold whole groups of num_generations={G}, got {tuple(rewards.shape)}")
    grouped = rewards.view(-1, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(G)
    if scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if B > 1 else torch.zeros_like(rewards)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(G) if G > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    stats = {"reward": torch.nanmean(rewards), "reward_std": _nanstd(rewards),
             "frac_reward_zero_std": _fraction(torch.isclose(std, torch.zeros_like(std)), std).mean()}
    return torch.nan_to_num(advantages, nan=0.0), stats


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              ref_logprobs: Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: float | None = None, delta: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = None, num_items_in_batch: Tensor | float | None = None
              ) -> tuple[Tensor, Stats]:
    """GRPO's clipped token-level objective (TRL GRPOTrainer._compute_loss, token-level
    importance sampling) and its loss normalisations.

    logprobs (B, T): the current policy's log-probs of the completion tokens; old_logprobs (B, T):
    the sampling policy's (logprobs.detach() when each batch is used once: ratio 1); advantages
    (B,) from grpo_advantages; mask (B, T): completion tokens. Per token:

        ratio = exp(logprobs - old_logprobs);  clipped = clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
        [delta: ratio = min(ratio, delta), the two-sided bound of INTELLECT-2]
        l_t = -min(ratio * A, clipped * A) + beta * KL_t,  KL_t = exp(ref - logp) - (ref - logp) - 1 (k3)

    epsilon_high defaults to epsilon_low; beta > 0 needs ref_logprobs. The loss aggregates l_t:

        grpo     mean over rows of (sum_t l_t * m_t / max(sum_t m_t, 1))
        bnpo     sum(l * m) / max(sum(m), 1)
        dr_grpo  sum(l * m) / (B * max_completion_length)
        dapo     sum(l * m) / max(num_items_in_batch, 1): completion tokens of the whole
                 generation batch (every micro-batch of the step, every rank) / world size, as TRL
                 passes it; default sum(m), this batch's count (then equal to bnpo)

    TRL also divides grpo, bnpo and dr_grpo by the gradient-accumulation steps; that is the
    training loop's business, not done here. Stats: clip_ratio/low_mean (ratio < 1 - eps_low with
    A < 0), clip_ratio/high_mean (ratio > 1 + eps_high with A > 0), clip_ratio/region_mean, all
    masked token means, and kl (masked mean of KL_t) when beta > 0.
    """
    _check_choice("loss_type", loss_type, GRPO_LOSSES)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    maskf = mask.to(logprobs.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = torch.clamp(ratio, max=delta)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if beta != 0.0:
        if ref_logprobs is None:
            raise InvalidArgument("a KL penalty (beta != 0) needs ref_logprobs")
        per_token_kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        per_token = per_token + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * maskf).sum() / maskf.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise InvalidArgument("the dr_grpo loss divides by max_completion_length: give it")
        loss = (per_token * maskf).sum() / (per_token.size(0) * max_completion_length)
    else:
        count = maskf.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=maskf.dtype)
        loss = (per_token * maskf).sum() / count.clamp(min=1.0)
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        tokens = maskf.sum().clamp(min=1.0)
        stats = {"clip_ratio/low_mean": (low * maskf).sum() / tokens,
                 "clip_ratio/high_mean": (high * maskf).sum() / tokens,
                 "clip_ratio/region_mean": ((low | high) * maskf).sum() / tokens}
        if beta != 0.0:
            stats["kl"] = (per_token_kl * maskf).sum() / tokens
    return loss, stats
