"""emergence.sampling against transformers' logits processors, on the same logits.

Every processor is run side by side with its transformers counterpart on batches of random
logits (several seeds and scales, with ties and -inf entries) and must give the same
tensor: the same -inf positions and the same finite values (atol 1e-6; in practice they are
bit-identical). Hypothesis then varies the parameter values. The rest checks the parts that
have no transformers counterpart: presence/frequency penalties, `choose` and the validation
in `SamplingParams`.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from emergence.errors import EmergenceError, InvalidArgument
from emergence.sampling import (
    SamplingParams,
    argmax_ids,
    apply_logit_bias,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    choose,
    min_p_filter,
    process_logits,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

B = 3
V = 1000
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- helpers
def make_logits(seed: int, scale: float = 1.0, ties: bool = False, neg_inf: float = 0.0,
                vocab: int = V) -> torch.Tensor:
    """(B, vocab) float32 logits. ties: rounded to a coarse grid, so many values repeat.
    neg_inf: fraction of entries set to -inf (column `seed % vocab` of every row stays finite)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, vocab, generator=g) * scale
    if ties:
        logits = torch.round(logits * 2) / 2
    if neg_inf:
        mask = torch.rand(B, vocab, generator=g) < neg_inf
        mask[:, seed % vocab] = False
        logits = logits.masked_fill(mask, NEG_INF)
    return logits


def make_input_ids(seed: int, length: int = 40, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 10_000)
    return torch.randint(0, vocab, (B, length), generator=g)


def seen_mask(input_ids: torch.Tensor, vocab: int = V) -> torch.Tensor:
    return torch.zeros(input_ids.shape[0], vocab, dtype=torch.bool).scatter_(1, input_ids, True)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs)), "different -inf positions"
    assert not torch.isnan(ours).any() and not torch.isnan(theirs).any()
    finite = ~torch.isneginf(ours)
    torch.testing.assert_close(ours[finite], theirs[finite], atol=1e-6, rtol=0)


def hf(processor, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids if input_ids is not None else torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return processor(ids, logits.clone())


def kept(logits: torch.Tensor) -> torch.Tensor:
    """Number of tokens not filtered out, per row."""
    return (~torch.isneginf(logits)).sum(-1)


# Logit cases: (seed, scale, ties, fraction of -inf)
CASES = [
    (0, 1.0, False, 0.0),
    (1, 3.0, False, 0.0),
    (2, 0.3, False, 0.0),
    (3, 10.0, False, 0.0),
    (4, 2.0, True, 0.0),
    (5, 1.0, False, 0.2),
    (6, 3.0, True, 0.3),
]
case_ids = [f"seed{s}-scale{sc}{'-ties' if t else ''}{f'-inf{f}' if f else ''}" for s, sc, t, f in CASES]


# ----------------------------------------------------------------------------- one processor at a time
@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(case, penalty):
    logits = make_logits(*case)
    input_ids = make_input_ids(case[0])
    seen = seen_mask(input_ids)
    ours = apply_repetition_penalty(logits, seen, penalty)
    theirs = hf(RepetitionPenaltyLogitsProcessor(penalty), logits, input_ids)
    assert_same(ours, theirs)
    # only the seen tokens moved, and all of those that are finite and nonzero did
    moved = ours != logits
    assert not (moved & ~seen).any()
    assert torch.equal(moved, seen & torch.isfinite(logits) & (logits != 0))


def test_repetition_penalty_hand_example():
    logits = torch.tensor([[2.0, -2.0, 0.0, 4.0, NEG_INF]])
    seen = torch.tensor([[True, True, True, False, True]])
    expected = torch.tensor([[1.0, -4.0, 0.0, 4.0, NEG_INF]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.5, 4.0])
def test_temperature_matches_transformers(case, temperature):
    logits = make_logits(*case)
    ours = apply_temperature(logits, temperature)
    assert_same(ours, hf(TemperatureLogitsWarper(temperature), logits))
    finite = torch.isfinite(logits)
    torch.testing.assert_close(ours[finite] * temperature, logits[finite])


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("k", [1, 2, 10, 50, 999, 1000, 5000])
def test_top_k_matches_transformers(case, k):
    logits = make_logits(*case)
    ours = top_k_filter(logits, k)
    assert_same(ours, hf(TopKLogitsWarper(k), logits))
    finite_in = kept(logits)
    # at least k survivors (more only with ties at the k-th value), never more than were finite
    assert (kept(ours) >= torch.clamp(finite_in, max=k)).all()
    assert (kept(ours) <= finite_in).all()
    if not case[2] and k < int(finite_in.min()):
        assert (kept(ours) == k).all()


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, 1.0])
def test_top_p_matches_transformers(case, p):
    logits = make_logits(*case)
    ours = top_p_filter(logits, p)
    assert_same(ours, hf(TopPLogitsWarper(p), logits))
    assert (kept(ours) >= 1).all()
    # the kept mass reaches p (up to float32 rounding)
    kept_mass = logits.softmax(-1).masked_fill(torch.isneginf(ours), 0).sum(-1)
    assert (kept_mass >= p - 1e-4).all()


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_min_p_matches_transformers(case, p):
    logits = make_logits(*case)
    ours = min_p_filter(logits, p)
    assert_same(ours, hf(MinPLogitsWarper(p), logits))
    assert (kept(ours) >= 1).all()
    # the most likely token always survives
    assert torch.isfinite(ours.gather(-1, logits.argmax(-1, keepdim=True))).all()


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("p", [1e-3, 0.2, 0.5, 0.9, 0.99])
def test_typical_matches_transformers(case, p):
    logits = make_logits(*case)
    ours = typical_filter(logits, p)
    assert_same(ours, hf(TypicalLogitsWarper(mass=p), logits))
    assert (kept(ours) >= 1).all()


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_logit_bias_matches_sequence_bias(case):
    logits = make_logits(*case)
    bias = {0: 5.0, 7: -3.25, 123: 0.5, 999: -100.0, 500: 1e-3, case[0] % V: 2.0}
    ours = apply_logit_bias(logits, bias)
    theirs = hf(SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}), logits,
                make_input_ids(case[0]))
    assert_same(ours, theirs)
    for t, b in bias.items():
        if torch.isfinite(logits[:, t]).all():
            torch.testing.assert_close(ours[:, t], logits[:, t] + b)
    untouched = torch.ones(V, dtype=torch.bool)
    untouched[list(bias)] = False
    assert torch.equal(ours[:, untouched], logits[:, untouched])


def test_logit_bias_empty_is_identity():
    logits = make_logits(0)
    assert torch.equal(apply_logit_bias(logits, {}), logits)


# ----------------------------------------------------------------------------- all together
def transformers_list(params: SamplingParams) -> LogitsProcessorList:
    """The processors transformers' generate() builds for these values, in its order."""
    processors = LogitsProcessorList()
    if params.logit_bias:
        processors.append(SequenceBiasLogitsProcessor({(t,): float(b) for t, b in params.logit_bias.items()}))
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.greedy:
        return processors  # do_sample=False: no warpers
    if params.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k != 0:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    processors.append(MinPLogitsWarper(params.min_p))  # generate() adds it whenever min_p is set
    if params.typical_p < 1.0:
        processors.append(TypicalLogitsWarper(mass=params.typical_p))
    return processors


COMBOS = [
    dict(temperature=0.7, top_k=50, top_p=0.9, logit_bias={3: 2.0, 10: -1.5}, repetition_penalty=1.2),
    dict(temperature=1.3, top_k=200, top_p=0.95, min_p=0.05, typical_p=0.9, repetition_penalty=1.1,
         logit_bias={0: 10.0, 999: -5.0, 42: 0.25}),
    dict(temperature=0.5, min_p=0.1, typical_p=0.5, repetition_penalty=0.8),
    dict(temperature=2.0, top_k=5, top_p=0.5, min_p=0.2, typical_p=0.95, repetition_penalty=1.5,
         logit_bias={1: 3.0}),
    dict(top_p=0.8, typical_p=0.7),
    dict(temperature=0.9, top_k=1000),
    dict(temperature=0.0, repetition_penalty=1.3, logit_bias={5: 4.0}, top_k=3, top_p=0.1),
]


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("combo", COMBOS, ids=[f"combo{i}" for i in range(len(COMBOS))])
def test_process_logits_matches_logits_processor_list(case, combo):
    params = SamplingParams(**combo)
    logits = make_logits(*case)
    input_ids = make_input_ids(case[0])
    ours = process_logits(logits.clone(), params, seen=seen_mask(input_ids))
    theirs = transformers_list(params)(input_ids, logits.clone())
    assert_same(ours, theirs)
    if params.greedy:
        assert torch.equal(choose(ours, greedy=True), theirs.argmax(-1))


def test_process_logits_order_matters_and_is_transformers_order():
    """Bias before repetition penalty: a biased seen token is penalized after the bias is added."""
    logits = torch.tensor([[-1.0, 1.0, 0.5, 0.0]])
    seen = torch.tensor([[True, False, False, False]])
    params = SamplingParams(logit_bias={0: 3.0}, repetition_penalty=2.0, temperature=0.5)
    # (-1 + 3) / 2 = 1, then / 0.5 -> 2; the others are only divided by the temperature
    expected = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    assert torch.equal(process_logits(logits, params, seen=seen), expected)


def test_process_logits_defaults_are_identity():
    logits = make_logits(11, scale=2.0, neg_inf=0.1)
    counts = torch.zeros(B, V)
    ours = process_logits(logits, SamplingParams(), seen=torch.ones(B, V, dtype=torch.bool), counts=counts)
    assert torch.equal(ours, logits)


# ----------------------------------------------------------------------------- property-based
settings.register_profile("sampling", max_examples=25, deadline=None, derandomize=True)
HV = 257  # a smaller vocabulary keeps the property tests fast

logit_cases = st.tuples(
    st.integers(0, 2**16),
    st.sampled_from([0.1, 1.0, 3.0, 20.0]),
    st.booleans(),
    st.sampled_from([0.0, 0.25]),
)


def hyp_logits(case) -> torch.Tensor:
    seed, scale, ties, neg_inf = case
    return make_logits(seed, scale, ties, neg_inf, vocab=HV)


@settings(settings.get_profile("sampling"))
@given(case=logit_cases, penalty=st.floats(0.05, 5.0), temperature=st.floats(0.01, 10.0))
def test_property_repetition_and_temperature(case, penalty, temperature):
    logits = hyp_logits(case)
    input_ids = make_input_ids(case[0], length=30, vocab=HV)
    assert_same(apply_repetition_penalty(logits, seen_mask(input_ids, HV), penalty),
                hf(RepetitionPenaltyLogitsProcessor(penalty), logits, input_ids))
    assert_same(apply_temperature(logits, temperature), hf(TemperatureLogitsWarper(temperature), logits))


@settings(settings.get_profile("sampling"))
@given(case=logit_cases, k=st.integers(1, HV + 10),
       top_p=st.floats(0.0, 1.0, exclude_min=True),
       min_p=st.floats(0.0, 1.0),
       typical_p=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))
def test_property_filters(case, k, top_p, min_p, typical_p):
    logits = hyp_logits(case)
    assert_same(top_k_filter(logits, k), hf(TopKLogitsWarper(k), logits))
    assert_same(top_p_filter(logits, top_p), hf(TopPLogitsWarper(top_p), logits))
    assert_same(min_p_filter(logits, min_p), hf(MinPLogitsWarper(min_p), logits))
    assert_same(typical_filter(logits, typical_p), hf(TypicalLogitsWarper(mass=typical_p), logits))


@settings(settings.get_profile("sampling"))
@given(case=logit_cases,
       bias=st.dictionaries(st.integers(0, HV - 1), st.floats(-50.0, 50.0, allow_nan=False), min_size=1,
                            max_size=8))
def test_property_logit_bias(case, bias):
    logits = hyp_logits(case)
    theirs = hf(SequenceBiasLogitsProcessor({(t,): float(b) for t, b in bias.items()}), logits)
    assert_same(apply_logit_bias(logits, bias), theirs)


@settings(settings.get_profile("sampling"))
@given(case=logit_cases,
       temperature=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.05, 5.0)),
       top_k=st.one_of(st.just(0), st.integers(1, HV)),
       top_p=st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True)),
       min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
       typical_p=st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True)),
       repetition_penalty=st.one_of(st.just(1.0), st.floats(0.1, 3.0)),
       bias=st.dictionaries(st.integers(0, HV - 1), st.floats(-10.0, 10.0), max_size=4))
def test_property_process_logits(case, temperature, top_k, top_p, min_p, typical_p, repetition_penalty, bias):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            typical_p=typical_p, repetition_penalty=repetition_penalty, logit_bias=bias)
    logits = hyp_logits(case)
    input_ids = make_input_ids(case[0], length=20, vocab=HV)
    ours = process_logits(logits.clone(), params, seen=seen_mask(input_ids, HV))
    theirs = transformers_list(params)(input_ids, logits.clone())
    assert_same(ours, theirs)


# ----------------------------------------------------------------------------- presence / frequency
def test_presence_frequency_hand_example():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0],
                           [0.0, 0.0, 0.0, 0.0, NEG_INF]])
    counts = torch.tensor([[0, 1, 3, 0, 2],
                           [4, 0, 1, 2, 1]], dtype=torch.float32)
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    # logit - frequency * count - presence * [count > 0]
    expected = torch.tensor([[1.0, 2.0 - 0.25 - 0.5, -1.0 - 0.75 - 0.5, 0.5, 3.0 - 0.5 - 0.5],
                             [-1.0 - 0.5, 0.0, -0.25 - 0.5, -0.5 - 0.5, NEG_INF]])
    assert torch.equal(out, expected)
    # negative values reward repetition: -(-1) * 2 - (-0.5) * 1
    out = apply_presence_frequency(logits, counts, presence=-0.5, frequency=-1.0)
    assert out[0, 4].item() == 3.0 + 2.0 + 0.5
    assert out[0, 0].item() == 1.0 and out[0, 3].item() == 0.5


def test_process_logits_applies_presence_frequency_after_repetition():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, True]])
    counts = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # token 0: 2/2 - 0.25 - 0.5; token 1: -2*2; token 2 untouched; token 3: 0.5/2 - 0.5 - 0.5
    expected = torch.tensor([[0.25, -4.0, 1.0, -0.75]])
    assert torch.equal(process_logits(logits, params, seen=seen, counts=counts), expected)
    # without counts the presence/frequency step is skipped
    assert torch.equal(process_logits(logits, params, seen=seen), torch.tensor([[1.0, -4.0, 1.0, 0.25]]))


# ----------------------------------------------------------------------------- choose
@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_choose_greedy_is_argmax(case):
    logits = make_logits(*case)
    expected = torch.tensor([max(range(V), key=lambda i: (row[i], -i)) for row in logits.tolist()])
    assert torch.equal(choose(logits, greedy=True), expected)
    assert torch.equal(choose(logits, greedy=True, generator=torch.Generator().manual_seed(1)), expected)


def test_argmax_ids_is_torchs_argmax_with_its_ties_and_nans():
    # NumPy's argmax (the CPU float32 path) and torch's: the first of equal maxima, NaN the largest
    rows = torch.tensor([[1.0, 3.0, 3.0, -2.0], [float("-inf")] * 4, [0.0, float("nan"), 5.0, float("nan")],
                         [2.0, 2.0, 2.0, 2.0]])
    for logits in (rows, rows[:, :3], rows[1:], rows.double()):  # a column slice (strided rows); not float32
        assert argmax_ids(logits) == logits.argmax(-1).tolist()
    assert argmax_ids(rows) == [1, 0, 1, 0]


def test_choose_seeded_is_reproducible_and_leaves_global_rng_alone():
    logits = make_logits(3, scale=1.0, neg_inf=0.2)

    def draws(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        return [choose(logits, greedy=False, generator=g).tolist() for _ in range(50)]

    global_state = torch.get_rng_state()
    first = draws(1234)
    assert torch.equal(torch.get_rng_state(), global_state)  # the global generator was not touched
    assert draws(1234) == first
    assert draws(4321) != first
    # successive draws from one generator differ (it advances), and never pick a filtered token
    assert len({tuple(d) for d in first}) > 1
    flat = torch.tensor(first)  # (50, B)
    assert torch.isfinite(logits.gather(1, flat.T)).all()


def test_choose_empirical_frequencies_match_probabilities():
    probs = [0.1, 0.2, 0.3, 0.4]
    n = 20_000
    logits = torch.log(torch.tensor(probs + [0.0])).expand(n, -1)  # token 4 has logit -inf
    g = torch.Generator().manual_seed(2024)
    counts = Counter(choose(logits, greedy=False, generator=g).tolist())
    assert counts[4] == 0
    assert sum(counts.values()) == n
    for token, p in enumerate(probs):
        # The count of a token is Binomial(n, p): its frequency has standard deviation
        # sqrt(p(1-p)/n) <= 0.0035 at n = 20k. Five standard deviations leaves a false-failure
        # chance of ~6e-7 per token for a correct sampler, yet catches any bias above ~1.7
        # percentage points (e.g. an off-by-one token or a temperature mistake).
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(counts[token] / n - p) <= 5 * sigma, (token, counts[token] / n, p)


# ----------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", 2.0),
        ("min_p", -0.1),
        ("typical_p", 0.0),
        ("typical_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("max_new_tokens", -1),
        ("logprobs", 21),
        ("stop", ("ok", "")),
    ],
)
def test_sampling_params_rejects_invalid(field, value):
    with pytest.raises(InvalidArgument) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value)  # the message names the offending field
    assert isinstance(info.value, EmergenceError) and isinstance(info.value, ValueError)


def test_sampling_params_accepts_boundaries():
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams().greedy
    params = SamplingParams(top_p=1.0, min_p=1.0, typical_p=1.0, top_k=0, max_new_tokens=0,
                            presence_penalty=-2.0, frequency_penalty=2.0, logprobs=20, stop=("\n",))
    assert params.needs_history
    assert not SamplingParams().needs_history
    assert SamplingParams(repetition_penalty=1.1).needs_history
