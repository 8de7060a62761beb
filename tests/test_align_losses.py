"""emergence.align.losses on small fixed tensors: each loss and stat against hand-computed numbers
or a float64 reference written from the formula (a row at a time, no masks, padding cut off),
and against TRL's own helpers where TRL exposes them as functions (selective_log_softmax,
entropy_from_logits, nanstd)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from emergence.align.losses import (dpo_loss, grpo_advantages, grpo_loss, kl_estimate, masked_whiten,
                                    ppo_advantages, ppo_loss, reward_model_loss, sequence_logps)
from emergence.errors import InvalidArgument

D = torch.float64


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def softplus(x: float) -> float:
    """-logsigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def close(actual, expected, tol: float = 1e-9) -> None:
    assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D), rtol=tol, atol=tol)


# ------------------------------------------------------------------ log-probs
def padded_logits_batch():
    """Two rows over a vocabulary of 6: row 0 has 2 prompt + 4 completion tokens; row 1 has 3 prompt
    + 1 completion token, then 2 padding slots whose logits are garbage (-inf and huge)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 6, dtype=D) * 2
    logits[1, 4:] = torch.tensor([float("-inf"), 1e30, 0, 0, 0, 0], dtype=D)
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [5, 4, 3, 2, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    return logits, ids, mask


def reference_logp(logits_row, ids_row, first: int, end: int) -> float:
    """sum over completion tokens k in [first, end) of log softmax(logits[k-1])[ids[k]], in Python."""
    total = 0.0
    for k in range(first, end):
        row = [float(x) for x in logits_row[k - 1]]
        total += row[int(ids_row[k])] - math.log(sum(math.exp(x) for x in row))
    return total


def test_sequence_logps_shift_and_mask():
    from trl.trainer.utils import selective_log_softmax

    logits, ids, mask = padded_logits_batch()
    out = sequence_logps(logits, ids, mask)
    expected = [reference_logp(logits[0], ids[0], 2, 6), reference_logp(logits[1], ids[1], 3, 4)]
    close(out.total, expected)
    assert out.count.tolist() == [4, 1]
    close(out.mean, [expected[0] / 4, expected[1]])
    assert out.per_token.shape == (2, 5)
    assert torch.isfinite(out.per_token).all()  # the garbage padding logits are never read into a sum
    assert (out.per_token[0, :1] == 0).all() and (out.per_token[1, [0, 1, 3, 4]] == 0).all()
    trl = selective_log_softmax(logits[:, :-1], ids[:, 1:])  # TRL's helper, then its mask fill
    trl[~mask[:, 1:]] = 0.0
    close(out.per_token, trl)
    # a uniform distribution: every token costs log V
    flat = sequence_logps(torch.zeros(1, 3, 6), torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
    close(flat.total, [-2 * math.log(6)], 1e-6)


# ------------------------------------------------------------------ reward model
def test_reward_model_loss_numbers():
    chosen, rejected = t(1.0, 0.0, 2.0), t(0.0, 0.5, 2.0)  # differences 1, -0.5 and a tie
    loss, stats = reward_model_loss(chosen, rejected)
    close(loss, (softplus(-1.0) + softplus(0.5) + math.log(2)) / 3)
    close(loss, 0.6601619508, 1e-9)
    close(stats["accuracy"], 1 / 3)  # the tie counts as wrong
    close(stats["margin"], 0.5 / 3)
    close(stats["chosen_reward"], 1.0)
    close(stats["rejected_reward"], 2.5 / 3)
    assert (stats["min_reward"].item(), stats["max_reward"].item()) == (0.0, 2.0)
    close(stats["mean_reward"], 5.5 / 6)
    # margin: -logsigmoid(r_c - r_r - m); centring: + c * mean((r_c + r_r)^2) = 0.01 * (1 + 0.25 + 16) / 3
    loss, _ = reward_model_loss(chosen, rejected, margin=t(0.5, 0.0, 1.0), center_rewards_coefficient=0.01)
    close(loss, (softplus(-0.5) + softplus(0.5) + softplus(1.0)) / 3 + 0.01 * 17.25 / 3)


def test_reward_model_loss_gradient_pushes_chosen_up():
    chosen, rejected = t(0.2).requires_grad_(), t(0.4).requires_grad_()
    loss, _ = reward_model_loss(chosen, rejected)
    loss.backward()
    close(chosen.grad, [-1 / (1 + math.exp(-0.2))])  # d/dx softplus(-x) = -sigmoid(-x), x = -0.2
    close(rejected.grad, [1 / (1 + math.exp(-0.2))])


# ------------------------------------------------------------------ DPO
POLICY_C, POLICY_R = t(-5.0, -8.0), t(-7.0, -6.0)
REF_C, REF_R = t(-6.0, -8.0), t(-6.0, -7.0)  # log-ratios: chosen (1, 0), rejected (-1, 1)


def test_dpo_sigmoid_numbers_and_stats():
    loss, stats = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1)
    # beta * (rho_c - rho_r) = (0.2, -0.1)
    close(loss, (softplus(-0.2) + softplus(0.1)) / 2)
    close(stats["rewards/chosen"], 0.05)
    close(stats["rewards/rejected"], 0.0)
    close(stats["rewards/accuracies"], 0.5)
    close(stats["rewards/margins"], 0.05)
    close(stats["logps/chosen"], -6.5)
    close(stats["logps/rejected"], -6.5)


def test_dpo_label_smoothing_is_conservative_dpo():
    eps = 0.1
    loss, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.1, label_smoothing=eps)
    expected = [(1 - eps) * softplus(-z) + eps * softplus(z) for z in (0.2, -0.1)]
    close(loss, sum(expected) / 2)


def test_ipo_averages_log_ratios_per_token():
    loss, stats = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, loss_type="ipo",
                           chosen_count=torch.tensor([2, 4]), rejected_count=torch.tensor([1, 2]))
    # rho_c / n_c - rho_r / n_r = (0.5 + 1, 0 - 0.5); minus 1 / (2 beta) = 1; squared: 0.25, 2.25
    close(loss, 1.25)
    close(stats["rewards/margins"], 0.5 * (2 - 1) / 2)  # stats from the summed log-ratios
    # an empty completion counts as one token (no division by zero)
    loss, _ = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, loss_type="ipo",
                       chosen_count=torch.tensor([0, 1]), rejected_count=torch.tensor([1, 1]))
    close(loss, ((2.0 - 1) ** 2 + (-1.0 - 1) ** 2) / 2)
    with pytest.raises(InvalidArgument, match="give chosen_count and rejected_count"):
        dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, loss_type="ipo")
    with pytest.raises(InvalidArgument, match="no label_smoothing"):
        dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, loss_type="ipo", label_smoothing=0.1,
                 chosen_count=torch.tensor([1, 1]), rejected_count=torch.tensor([1, 1]))


def test_dpo_from_logits_ignores_prompt_and_padding():
    """The batch layout of TRL: chosen rows then rejected rows, right-padded, one forward each for
    the policy and the reference; the reference computes each unpadded row on its own."""
    torch.manual_seed(1)
    policy, ref = torch.randn(4, 7, 5, dtype=D), torch.randn(4, 7, 5, dtype=D)
    ids = torch.randint(0, 5, (4, 7))
    lengths, prompts = [7, 5, 6, 4], [3, 2, 3, 2]
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        mask[i, p:n] = True
    logps, ref_logps = sequence_logps(policy, ids, mask), sequence_logps(ref, ids, mask)
    loss, _ = dpo_loss(*logps.total.chunk(2), *ref_logps.total.chunk(2), beta=0.2)
    pol = [reference_logp(policy[i], ids[i], prompts[i], lengths[i]) for i in range(4)]
    rf = [reference_logp(ref[i], ids[i], prompts[i], lengths[i]) for i in range(4)]
    z = [0.2 * ((pol[k] - rf[k]) - (pol[k + 2] - rf[k + 2])) for k in range(2)]
    close(loss, (softplus(-z[0]) + softplus(-z[1])) / 2)


# ------------------------------------------------------------------ PPO
def test_kl_estimators():
    lp, ref = t(-1.0, -2.0), t(-1.5, -2.0)
    close(kl_estimate(lp, ref, "k1"), [0.5, 0.0])
    close(kl_estimate(lp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, 0.0])
    close(kl_estimate(lp, ref, "k3")[0], 0.1065306597, 1e-9)
    with pytest.raises(InvalidArgument, match="kl_estimator must be one of k1, k3"):
        kl_estimate(lp, ref, "k2")


def test_ppo_advantages_by_hand():
    # one row of two tokens, no KL, gamma = lam = 1: rewards (0, 1), values (0.5, 0.25)
    # A1 = 1 - 0.25 = 0.75, A0 = 0 + 0.25 - 0.5 + 0.75 = 0.5; returns = A + V = (1, 1)
    out = ppo_advantages(t(-1.0, -1.0).view(1, 2), t(-1.0, -1.0).view(1, 2), t(0.5, 0.25).view(1, 2), t(1.0),
                         torch.ones(1, 2, dtype=torch.bool), kl_coef=0.0, gamma=1.0, lam=1.0)
    close(out.returns, [[1.0, 1.0]])
    close(out.rewards, [[0.0, 1.0]])
    # whitened: mean 0.625, unbiased variance 0.03125
    std = math.sqrt(0.03125 + 1e-8)
    close(out.advantages, [[-0.125 / std, 0.125 / std]])
    close(out.advantages[0, 1], 0.7071066680, 1e-9)


def reference_rollout(lp, ref, values, score, kl_coef, gamma, lam, estimator):
    """One unpadded row: (raw advantages, returns), straight from the formulas."""
    n = len(lp)
    kl = [(a - b) if estimator == "k1" else (math.exp(b - a) - 1 - (b - a)) for a, b in zip(lp, ref)]
    rewards = [-kl_coef * k for k in kl]
    rewards[-1] += score
    adv, gae = [0.0] * n, 0.0
    for k in reversed(range(n)):
        nxt = values[k + 1] if k + 1 < n else 0.0
        gae = rewards[k] + gamma * nxt - values[k] + gamma * lam * gae
        adv[k] = gae
    return adv, [a + v for a, v in zip(adv, values)], sum(kl)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_advantages_with_padding(estimator):
    torch.manual_seed(2)
    B, T, lengths = 3, 5, [5, 2, 3]
    lp, ref, values = -torch.rand(B, T, dtype=D) * 3, -torch.rand(B, T, dtype=D) * 3, torch.randn(B, T, dtype=D)
    scores = t(1.5, -0.7, 0.3)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    lp_garbage = lp.masked_fill(~mask, 123.0)  # whatever padding holds must not matter
    out = ppo_advantages(lp_garbage, ref, values.masked_fill(~mask, -9.0), scores, mask, kl_coef=0.1,
                         kl_estimator=estimator, gamma=0.9, lam=0.8)
    raw, returns, kls = [], [], []
    for i, n in enumerate(lengths):
        a, r, k = reference_rollout(lp[i, :n].tolist(), ref[i, :n].tolist(), values[i, :n].tolist(),
                                    float(scores[i]), 0.1, 0.9, 0.8, estimator)
        raw.append(a)
        returns.append(r)
        kls.append(k)
    flat = [a for row in raw for a in row]
    mean = sum(flat) / len(flat)
    var = sum((a - mean) ** 2 for a in flat) / (len(flat) - 1)
    for i, n in enumerate(lengths):
        close(out.advantages[i, :n], [(a - mean) / math.sqrt(var + 1e-8) for a in raw[i]])
        close(out.returns[i, :n], returns[i])
        assert (out.advantages[i, n:] == 0).all()
        last_kl = float(kl_estimate(lp[i, n - 1], ref[i, n - 1], estimator))
        close(out.rewards[i, n - 1], -0.1 * last_kl + float(scores[i]))
    close(out.stats["objective/kl"], sum(kls) / 3)
    close(out.stats["objective/scores"], 1.1 / 3)
    close(out.stats["objective/rlhf_reward"], -0.1 * sum(kls) / 3 + 1.1 / 3)


def trl_rollout(lp, ref, values, scores, seq_len, kl_coef, gamma, lam, whiten_rewards):
    """TRL PPOTrainer's rollout arithmetic, transcribed: INVALID_LOGPROB (1.0) on padding, the score one
    slot past the last token, values kept one slot past it (padding_mask_p1)."""
    B, T = lp.shape
    idx = torch.arange(T).repeat(B, 1)
    padding_mask = idx > seq_len[:, None]
    padding_mask_p1 = idx > (seq_len + 1)[:, None]
    lp, ref = lp.masked_fill(padding_mask, 1.0), ref.masked_fill(padding_mask, 1.0)
    values = values.masked_fill(padding_mask_p1, 0)
    logr = ref - lp
    rewards = -kl_coef * ((logr.exp() - 1) - logr)  # k3
    end = torch.where(seq_len + 1 < T, seq_len + 1, seq_len)
    rewards[torch.arange(B), end] += scores

    def whiten(v, m, shift_mean=True):
        mean = (v * m).sum() / m.sum()
        var = (((v - mean) ** 2) * m).sum() / m.sum() * m.sum() / (m.sum() - 1)
        w = (v - mean) * torch.rsqrt(var + 1e-8)
        return w if shift_mean else w + mean

    if whiten_rewards:
        rewards = whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0)
    gae, out = 0, []
    for k in reversed(range(T)):
        nxt = values[:, k + 1] if k < T - 1 else 0.0
        gae = rewards[:, k] + gamma * nxt - values[:, k] + gamma * lam * gae
        out.append(gae)
    adv = torch.stack(out[::-1], 1)
    returns = adv + values
    return whiten(adv, ~padding_mask).masked_fill(padding_mask, 0), returns, rewards


def test_ppo_advantages_reproduce_trl_padding_layout():
    torch.manual_seed(3)
    B, T = 3, 6
    seq_len = torch.tensor([5, 2, 3])  # index of the last response token; row 0 fills the width
    lp, ref, values = -torch.rand(B, T, dtype=D) * 2, -torch.rand(B, T, dtype=D) * 2, torch.randn(B, T, dtype=D)
    scores = t(0.9, -1.2, 0.4)
    idx = torch.arange(T)[None]
    mask, value_mask = idx <= seq_len[:, None], idx <= (seq_len + 1)[:, None]
    score_index = torch.where(seq_len + 1 < T, seq_len + 1, seq_len)
    for whiten in (False, True):
        adv, returns, rewards = trl_rollout(lp, ref, values, scores, seq_len, 0.05, 1.0, 0.95, whiten)
        out = ppo_advantages(lp, ref, values, scores, mask, kl_coef=0.05, kl_estimator="k3", gamma=1.0, lam=0.95,
                             whiten_rewards=whiten, score_index=score_index, value_mask=value_mask)
        close(out.advantages, adv)
        close(out.rewards, rewards)
        close(out.returns.masked_fill(~value_mask, 0), returns.masked_fill(~value_mask, 0))


def test_ppo_loss_clipping_by_hand():
    from trl.trainer.utils import entropy_from_logits

    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    old = t(-1.0, -1.0, -1.0, -1.0).view(1, 4)
    new = old + torch.log(t(1.5, 0.5, 1.1, 7.0)).view(1, 4)  # ratios; the padding one must not count
    advantages = t(1.0, 1.0, -1.0, 0.0).view(1, 4)
    vpred, old_values, returns = t(0.5, -0.1, 0.3, 9.0).view(1, 4), torch.zeros(1, 4, dtype=D), t(1, 1, 0, 0).view(1, 4)
    torch.manual_seed(4)
    logits = torch.randn(1, 4, 6, dtype=D)
    loss, stats = ppo_loss(new, old, advantages, vpred, old_values, returns, mask, cliprange=0.2, cliprange_value=0.2,
                           vf_coef=0.1, logits=logits)
    # policy: max(-A r, -A clip(r)) = -1.2 (clipped), -0.5, 1.1 -> mean -0.2
    close(stats["loss/policy"], -0.2)
    close(stats["policy/clipfrac"], 1 / 3)
    # value: max((v - R)^2, (clip(v, -0.2, 0.2) - R)^2) = 0.64 (clipped), 1.21, 0.09 -> 0.5 * mean
    close(stats["loss/value"], 0.5 * 1.94 / 3)
    close(stats["val/clipfrac"], 1 / 3)
    close(loss, -0.2 + 0.1 * 0.5 * 1.94 / 3)
    close(stats["policy/approxkl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 4)
    close(stats["val/ratio"], (1.5 + 0.5 + 1.1 + 1.0) / 4)  # padding counts as ratio 1, as TRL logs it
    close(stats["policy/entropy"], entropy_from_logits(logits)[0, :3].mean())
    # the gradient flows through the unclipped tokens only: d loss / d new = -A r / 3 there, 0 where clipped
    new = new.clone().requires_grad_()
    ppo_loss(new, old, advantages, vpred, old_values, returns, mask)[0].backward()
    close(new.grad, [[0.0, -0.5 / 3, 1.1 / 3, 0.0]])


def test_masked_whiten_needs_two_values():
    s = math.sqrt(2 + 1e-8)  # mean 2, unbiased variance 2 over the masked (1, 3); the third is moved alike
    close(masked_whiten(t(1.0, 3.0, 100.0), torch.tensor([1, 1, 0])), [-1 / s, 1 / s, 98 / s])
    close(masked_whiten(t(1.0, 3.0), torch.tensor([1, 1]), shift_mean=False), [2 - 1 / s, 2 + 1 / s])
    with pytest.raises(InvalidArgument, match="at least 2 masked values, got 1"):
        masked_whiten(t(1.0, 3.0), torch.tensor([1, 0]))


# ------------------------------------------------------------------ GRPO
def test_grpo_advantages_group_batch_none():
    from trl.trainer.utils import nanstd

    rewards = t(1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0)  # the second group is all the same
    adv, stats = grpo_advantages(rewards, 4, "group")
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1, 0)
    close(adv, [0.5 / (s + 1e-4), -0.5 / (s + 1e-4)] * 2 + [0.0] * 4)
    close(stats["frac_reward_zero_std"], 0.5)
    close(stats["reward"], 1.25)
    close(stats["reward_std"], nanstd(rewards), 1e-6)  # TRL corrects in float32
    batch_std = math.sqrt((4 * 0.75 ** 2 + 2 * 1.25 ** 2 + 2 * 0.25 ** 2) / 7)  # around the batch mean 1.25
    close(stats["reward_std"], batch_std)
    adv, _ = grpo_advantages(rewards, 4, "batch")  # the group's mean, the batch's std
    close(adv, [0.5 / (batch_std + 1e-4), -0.5 / (batch_std + 1e-4)] * 2 + [0.0] * 4)
    adv, _ = grpo_advantages(rewards, 4, "none")
    close(adv, [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    adv, stats = grpo_advantages(rewards, 1)  # one completion per prompt: nothing to compare with
    close(adv, [0.0] * 8)
    close(stats["frac_reward_zero_std"], 1.0)


def test_grpo_advantages_unscorable_completions():
    rewards = t(1.0, float("nan"), 3.0, 2.0, float("nan"), 5.0)  # groups of 3
    adv, _ = grpo_advantages(rewards, 3)
    s, s2 = math.sqrt(2.0), math.sqrt(4.5)  # stds of (1, 3) and (2, 5)
    close(adv, [-1 / (s + 1e-4), 0.0, 1 / (s + 1e-4), -1.5 / (s2 + 1e-4), 0.0, 1.5 / (s2 + 1e-4)])
    with pytest.raises(InvalidArgument, match="whole groups of num_generations=4"):
        grpo_advantages(rewards, 4)


GRPO_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
GRPO_OLD = torch.full((2, 3), -2.0, dtype=D)
GRPO_NEW = GRPO_OLD + torch.log(t(1.3, 0.9, 1.0, 0.7, 1.1, 5.0)).view(2, 3)
GRPO_ADV = t(1.0, -1.0)


@pytest.mark.parametrize("loss_type, kwargs, expected", [
    # per token: -min(r A, clip(r, 0.8, 1.28) A) = (-1.28, -0.9, -1) and (0.8, 1.1, [5 on padding])
    ("grpo", {}, ((-1.28 - 0.9 - 1.0) / 3 + (0.8 + 1.1) / 2) / 2),
    ("bnpo", {}, (-3.18 + 1.9) / 5),
    ("dr_grpo", {"max_completion_length": 4}, (-3.18 + 1.9) / (2 * 4)),
    ("dapo", {"num_items_in_batch": 10}, (-3.18 + 1.9) / 10),
    ("dapo", {}, (-3.18 + 1.9) / 5),
])
def test_grpo_loss_normalisations(loss_type, kwargs, expected):
    loss, stats = grpo_loss(GRPO_NEW, GRPO_OLD, GRPO_ADV, GRPO_MASK, epsilon_low=0.2, epsilon_high=0.28,
                            loss_type=loss_type, **kwargs)
    close(loss, expected)
    close(stats["clip_ratio/low_mean"], 0.2)  # 0.7 < 0.8 with A < 0
    close(stats["clip_ratio/high_mean"], 0.2)  # 1.3 > 1.28 with A > 0
    close(stats["clip_ratio/region_mean"], 0.4)
    assert "kl" not in stats


def test_grpo_loss_kl_and_delta():
    torch.manual_seed(5)
    ref = GRPO_OLD + torch.randn(2, 3, dtype=D) * 0.3
    loss, stats = grpo_loss(GRPO_NEW, GRPO_OLD, GRPO_ADV, GRPO_MASK, ref_logprobs=ref, beta=0.04, epsilon_low=0.2,
                            epsilon_high=0.28, loss_type="bnpo")
    d = (ref - GRPO_NEW).tolist()
    kl = [[math.exp(x) - x - 1 for x in row] for row in d]
    kl_sum = sum(kl[0]) + kl[1][0] + kl[1][1]
    close(loss, (-3.18 + 1.9 + 0.04 * kl_sum) / 5)
    close(stats["kl"], kl_sum / 5)
    # delta caps the unclipped ratio: 1.3 -> 1.2 < 1.28, so the first token is no longer clipped
    loss, stats = grpo_loss(GRPO_NEW, GRPO_OLD, GRPO_ADV, GRPO_MASK, epsilon_low=0.2, epsilon_high=0.28, delta=1.2,
                            loss_type="bnpo")
    close(loss, (-1.2 - 0.9 - 1.0 + 0.8 + 1.1) / 5)
    close(stats["clip_ratio/high_mean"], 0.0)
    # symmetric epsilon by default: clip(1.3, 0.8, 1.2) = 1.2
    loss, _ = grpo_loss(GRPO_NEW, GRPO_OLD, GRPO_ADV, GRPO_MASK, epsilon_low=0.2, loss_type="bnpo")
    close(loss, (-1.2 - 0.9 - 1.0 + 0.8 + 1.1) / 5)
    with pytest.raises(InvalidArgument, match="needs ref_logprobs"):
        grpo_loss(GRPO_NEW, GRPO_OLD, GRPO_ADV, GRPO_MASK, beta=0.1)
    with pytest.raises(InvalidArgument, match="give it"):
        grpo_loss(GRPO_NEW, GRPO_OLD, GRPO_ADV, GRPO_MASK, loss_type="dr_grpo")


def test_grpo_on_policy_gradient_is_the_advantage():
    """With old = new.detach() the ratio is 1 and d loss / d logp_t = -A / n per token (grpo)."""
    new = GRPO_OLD.clone().requires_grad_()
    loss, stats = grpo_loss(new, new.detach(), GRPO_ADV, GRPO_MASK, loss_type="grpo")
    close(loss, (-1.0 + 1.0) / 2)
    loss.backward()
    close(new.grad, [[-1 / 6, -1 / 6, -1 / 6], [0.25, 0.25, 0.0]])
    close(stats["clip_ratio/region_mean"], 0.0)
