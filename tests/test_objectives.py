"""Training objectives (`emergence.train.objectives`) and optimizer pieces (`emergence.train.optim`),
checked against hand-worked examples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emergence.config import Config
from emergence.errors import InvalidArgument
from emergence.model import Transformer
from emergence.train.objectives import (
    IGNORE_INDEX,
    next_token_batch,
    next_token_loss,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_batch,
    span_corruption_length,
    t5_sentinel_ids,
    window_length_for,
)
from emergence.train.optim import initialize_weights, learning_rate, make_optimizer, parameter_groups

FEW = settings(max_examples=40, deadline=None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs(mask: list[bool]) -> list[tuple[bool, int]]:
    """[0 0 1 1 1 0] -> [(False, 2), (True, 3), (False, 1)]."""
    out: list[tuple[bool, int]] = []
    for m in mask:
        if out and out[-1][0] == m:
            out[-1] = (m, out[-1][1] + 1)
        else:
            out.append((m, 1))
    return out


# ---------------------------------------------------------------------- span_corruption
def test_span_corruption_docstring_example():
    a, b, c, d, e, f = 11, 12, 13, 14, 15, 16
    S0, S1 = 99, 98
    assert span_corruption([a, b, c, d, e, f], [0, 1, 1, 0, 0, 1], [S0, S1]) == (
        [a, S0, d, e, S1], [S0, b, c, S1, f])


def test_span_corruption_mask_starting_with_noise():
    assert span_corruption([1, 2, 3, 4, 5], [1, 1, 0, 1, 0], [90, 91, 92]) == ([90, 3, 91, 5], [90, 1, 2, 91, 4])
    assert span_corruption([1, 2, 3], [True, False, True], [7, 8]) == ([7, 2, 8], [7, 1, 8, 3])
    # No noise: inputs are the tokens, nothing to predict; all noise: one sentinel.
    assert span_corruption([1, 2, 3], [0, 0, 0], []) == ([1, 2, 3], [])
    assert span_corruption([1, 2, 3], [1, 1, 1], [50]) == ([50], [50, 1, 2, 3])


def test_span_corruption_errors():
    with pytest.raises(ValueError, match="3 tokens but a mask of 2"):
        span_corruption([1, 2, 3], [0, 1], [9])
    with pytest.raises(ValueError, match="2 noise spans but only 1 sentinel"):
        span_corruption([1, 2, 3], [1, 0, 1], [9])


def test_t5_sentinel_ids():
    ids = t5_sentinel_ids(32128)
    assert ids[:2] == [32127, 32126] and len(ids) == 100 and ids[-1] == 32028
    assert t5_sentinel_ids(10, count=3) == [9, 8, 7]


# ---------------------------------------------------------------- random_spans_noise_mask
@FEW
@given(length=st.integers(2, 1000), seed=st.integers(0, 2**31 - 1))
def test_noise_mask_counts(length, seed):
    mask = random_spans_noise_mask(length, generator=gen(seed))
    assert mask.dtype == torch.bool and mask.shape == (length,)
    num_noise = min(max(round(length * 0.15), 1), length - 1)
    assert int(mask.sum()) == num_noise
    spans = [n for noise, n in runs(mask.tolist()) if noise]
    assert len(spans) == max(round(num_noise / 3), 1)
    assert not mask[0]  # starts with non-noise
    # Deterministic for a seeded generator.
    assert torch.equal(random_spans_noise_mask(length, generator=gen(seed)), mask)


@FEW
@given(length=st.integers(2, 400), density=st.floats(0.05, 0.5), mean=st.floats(1.0, 8.0),
       seed=st.integers(0, 1000))
def test_noise_mask_counts_other_densities(length, density, mean, seed):
    mask = random_spans_noise_mask(length, density, mean, generator=gen(seed)).tolist()
    num_noise = min(max(round(length * density), 1), length - 1)
    num_spans = min(max(round(num_noise / mean), 1), num_noise, length - num_noise)
    assert sum(mask) == num_noise
    r = runs(mask)
    assert [noise for noise, _ in r] == [False, True] * num_spans  # keep, noise, keep, noise...
    assert sum(1 for noise, _ in r if noise) == num_spans
    assert span_corruption_length(length, density, mean) == length + 2 * num_spans + 2


def test_noise_mask_hand_counts_and_randomness():
    # 100 tokens: 15 noise tokens in round(15 / 3) = 5 spans; 20 tokens: 3 noise in 1 span.
    m = random_spans_noise_mask(100, generator=gen(0)).tolist()
    assert sum(m) == 15 and sum(1 for noise, _ in runs(m) if noise) == 5
    m = random_spans_noise_mask(20, generator=gen(0)).tolist()
    assert sum(m) == 3 and [n for noise, n in runs(m) if noise] == [3]
    # 2 tokens: one kept, then one noise.
    assert random_spans_noise_mask(2, generator=gen(5)).tolist() == [False, True]
    # Different seeds give different masks; one generator moves on between calls.
    masks = {tuple(random_spans_noise_mask(100, generator=gen(s)).tolist()) for s in range(5)}
    assert len(masks) > 1
    g = gen(3)
    assert not torch.equal(random_spans_noise_mask(100, generator=g), random_spans_noise_mask(100, generator=g))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        random_spans_noise_mask(1, generator=gen(0))


# ---------------------------------------------------------------- span_corruption_batch
def test_span_corruption_batch_layout():
    L, eos, pad = 20, 50, 0
    sentinels = t5_sentinel_ids(100, 10)  # 99, 98, ...
    windows = torch.stack([torch.arange(1, L + 1), torch.arange(21, 21 + L)])
    batch = span_corruption_batch(windows, sentinels, eos, generator=gen(7), pad_id=pad)

    # Same generator state -> the same masks, drawn row after row.
    g = gen(7)
    masks = [random_spans_noise_mask(L, generator=g).tolist() for _ in range(2)]
    # 20 tokens: 3 noise tokens in one span, so each row is 17 kept + S0 + EOS + S0 + 3 + EOS = 24 tokens.
    assert batch.inputs.shape == batch.targets.shape == (2, 23)
    for r, mask in enumerate(masks):
        tokens = windows[r].tolist()
        s = mask.index(True)
        assert mask[s:s + 3] == [True] * 3 and sum(mask) == 3
        row = tokens[:s] + [99] + tokens[s + 3:] + [eos] + [99] + tokens[s:s + 3] + [eos]
        assert len(row) == 24
        assert batch.inputs[r].tolist() == row[:-1]
        # Only predictions of the target part are scored: position p predicts row[p + 1]; the EOS
        # closing the inputs (position 18) predicts S0, the last input position predicts the final EOS.
        first_eos = 17 + 1  # the EOS follows the 17 kept tokens and S0
        assert row[first_eos] == eos
        expected = [IGNORE_INDEX] * first_eos + row[first_eos + 1:]
        assert batch.targets[r].tolist() == expected
        assert int((batch.targets[r] != IGNORE_INDEX).sum()) == 1 + 3 + 1  # S0, the span, EOS
    # Reproducible.
    again = span_corruption_batch(windows, sentinels, eos, generator=gen(7), pad_id=pad)
    assert torch.equal(again.inputs, batch.inputs) and torch.equal(again.targets, batch.targets)


def test_span_corruption_batch_several_spans():
    L = 64  # round(9.6) = 10 noise tokens in round(10 / 3) = 3 spans: rows of 64 + 2*3 + 2 = 72
    windows = torch.arange(1, 1 + 3 * L).reshape(3, L)
    sentinels = t5_sentinel_ids(1000, 5)
    batch = span_corruption_batch(windows, sentinels, 500, generator=gen(1))
    assert batch.inputs.shape == (3, 71)
    g = gen(1)
    for r in range(3):
        mask = random_spans_noise_mask(L, generator=g).tolist()
        inp, tgt = span_corruption(windows[r].tolist(), mask, sentinels)
        assert inp.count(999) == 1 and inp.count(998) == 1 and inp.count(997) == 1 and 996 not in inp
        row = inp + [500] + tgt + [500]
        assert batch.inputs[r].tolist() == row[:-1]
        start = len(inp)
        assert batch.targets[r, :start].eq(IGNORE_INDEX).all()
        assert batch.targets[r, start:].tolist() == row[start + 1:]
        # The kept tokens and the spans together are the window, in order.
        assert sorted(t for t in inp + tgt if t < 500) == windows[r].tolist()


# ------------------------------------------------------------------------ window length
@FEW
@given(block_size=st.integers(5, 2048))
def test_window_length_for_keeps_rows_within_block_size(block_size):
    assert window_length_for("next-token", block_size) == block_size + 1
    L = window_length_for("span-corruption", block_size)
    assert 2 <= L < block_size
    assert span_corruption_length(L) - 1 <= block_size  # the model's inputs: the row less its last token
    # ... and it is the longest window that fits.
    assert all(span_corruption_length(n) - 1 > block_size for n in range(L + 1, block_size + 1))


@pytest.mark.parametrize("block_size", [5, 16, 100])
def test_window_length_for_real_batch(block_size):
    L = window_length_for("span-corruption", block_size)
    windows = torch.arange(1, 1 + 2 * L).reshape(2, L)
    batch = span_corruption_batch(windows, t5_sentinel_ids(10_000), 0, generator=gen(0))
    assert batch.inputs.shape[1] <= block_size
    assert batch.inputs.shape[1] == span_corruption_length(L) - 1


def test_window_length_for_too_short_a_context():
    assert window_length_for("span-corruption", 5) == 2
    for block_size in (1, 2, 4):
        with pytest.raises(InvalidArgument, match="at least 5 tokens, got"):
            window_length_for("span-corruption", block_size)


# ------------------------------------------------------------------------- next token
def test_next_token_batch():
    windows = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = next_token_batch(windows)
    assert b.inputs.tolist() == [[1, 2, 3], [5, 6, 7]]
    assert b.targets.tolist() == [[2, 3, 4], [6, 7, 8]]


def test_next_token_loss_by_hand():
    rows = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 0.5, 0.0]]
    logits = torch.tensor([rows])  # (1, 3, 4)
    targets = torch.tensor([[2, IGNORE_INDEX, 0]])

    def nll(row, t):
        return -(row[t] - math.log(sum(math.exp(x) for x in row)))

    expected = (nll(rows[0], 2) + nll(rows[2], 0)) / 2  # the ignored position does not count
    assert nll(rows[0], 2) == pytest.approx(1.4401896985611957)
    loss = next_token_loss(logits, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Batch of two rows: the mean is over every scored position.
    logits2 = torch.tensor([rows[:2], [rows[2], rows[0]]])
    targets2 = torch.tensor([[3, 1], [IGNORE_INDEX, 0]])
    expected2 = (nll(rows[0], 3) + nll(rows[1], 1) + nll(rows[0], 0)) / 3
    assert next_token_loss(logits2, targets2).item() == pytest.approx(expected2, rel=1e-6)
    # bf16 logits: the loss is still computed (and returned) in fp32.
    assert next_token_loss(logits.bfloat16(), targets).dtype == torch.float32


# ----------------------------------------------------------------------------- schedules
def lr_at(step, schedule, **kw):
    args = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110) | kw
    return learning_rate(step, schedule=schedule, **args)


def test_cosine_schedule():
    # Warmup is linear, (step + 1) / warmup of the peak.
    assert [lr_at(s, "cosine") for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, "cosine") == pytest.approx(1.0)
    assert lr_at(60, "cosine") == pytest.approx((1.0 + 0.1) / 2)  # halfway through the decay
    assert lr_at(35, "cosine") == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, "cosine") == pytest.approx(0.1)
    assert lr_at(500, "cosine") == pytest.approx(0.1)  # stays at min_lr
    after = [lr_at(s, "cosine") for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_at(0, "cosine", warmup_steps=0) == pytest.approx(1.0)


def test_wsd_schedule():
    kw = dict(warmup_steps=5, max_steps=100, decay_fraction=0.2)  # decay over steps 80..99
    assert lr_at(0, "wsd", **kw) == pytest.approx(0.2)
    assert lr_at(4, "wsd", **kw) == pytest.approx(1.0)
    assert all(lr_at(s, "wsd", **kw) == 1.0 for s in range(5, 80))
    decay = [lr_at(s, "wsd", **kw) for s in range(80, 100)]
    assert decay[0] == pytest.approx(1.0 - 0.9 / 20)
    assert decay[9] == pytest.approx(0.55)
    assert decay[-1] == pytest.approx(0.1)  # min_lr at the last step
    assert [a - b for a, b in zip(decay, decay[1:])] == pytest.approx([0.9 / 20] * 19)  # linear
    assert lr_at(150, "wsd", **kw) == pytest.approx(0.1)


def test_constant_schedule_and_unknown():
    assert [lr_at(s, "constant", warmup_steps=4) for s in (0, 1, 3, 4, 100, 10_000)] == pytest.approx(
        [0.25, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert lr_at(0, "constant", warmup_steps=0) == 1.0
    with pytest.raises(InvalidArgument, match="unknown schedule 'linear'"):
        lr_at(20, "linear")


# ------------------------------------------------------------------- parameter groups
def test_parameter_groups_with_tied_embeddings():
    config = Config.from_name("tiny-gpt2")
    model = Transformer(config)
    assert config.tie_embeddings and model.lm_head.weight is model.tok_embeddings.weight
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # tied weight listed once
    decay_names = sorted(names[id(p)] for p in decay["params"])
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    per_layer = ["attn.o_proj.weight", "attn.qkv_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"]
    assert decay_names == sorted(["pos_embeddings.weight", "tok_embeddings.weight"]
                                 + [f"layers.{i}.{n}" for i in range(2) for n in per_layer])
    per_layer_1d = ["attn.o_proj.bias", "attn.qkv_proj.bias", "attn_norm.bias", "attn_norm.weight",
                    "mlp.down_proj.bias", "mlp.up_proj.bias", "mlp_norm.bias", "mlp_norm.weight"]
    assert no_decay_names == sorted(["norm.bias", "norm.weight"]
                                    + [f"layers.{i}.{n}" for i in range(2) for n in per_layer_1d])
    all_params = decay["params"] + no_decay["params"]
    assert len({id(p) for p in all_params}) == len(all_params) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # Frozen parameters are left out; the optimizer gets the same two groups.
    model.pos_embeddings.weight.requires_grad_(False)
    assert len(parameter_groups(model, 0.1)[0]["params"]) == len(decay["params"]) - 1
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(decay["params"]) - 1, len(no_decay["params"])]


# ------------------------------------------------------------------ initialize_weights
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_initialize_weights(name):
    config = Config.from_name(name, n_layer=4, n_embd=128, **({"intermediate_size": 256} if name == "tiny-llama"
                                                               else {}))
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(5.0)  # so that every value checked below was set by initialize_weights
    initialize_weights(model, generator=gen(0))
    residual = 0.02 / math.sqrt(2 * 4)
    checked = 0
    for n, p in model.named_parameters():
        if p.dim() == 2:
            want = residual if n.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            assert p.std().item() == pytest.approx(want, rel=0.05), n
            assert abs(p.mean().item()) < 4 * want / math.sqrt(p.numel()), n
            checked += 1
        elif n.endswith("bias"):
            assert torch.all(p == 0), n
        else:
            assert torch.all(p == 1), n  # norm gains
    assert checked == (2 if config.position == "learned" else 1) + 4 * 4 + (0 if config.tie_embeddings else 1)
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert attn.o_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    # The same generator seed gives the same weights.
    other = Transformer(config)
    initialize_weights(other, generator=gen(0))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
