"""emergence.generate: the decode loop, checked on real values.

Most checks use the packaged default model (llama2.c's stories260K, SentencePiece-style
tokenizer with byte fallback), whose greedy output is known (see EXPECTED.md); the
penalty checks use the tiny transformers models of conftest, against transformers'
own `generate` or an independent step-by-step re-implementation of the loop.
"""

from __future__ import annotations

import pytest
import torch

import emergence
from emergence.errors import InvalidArgument
from emergence.generate import Chunk, Completion, generate, stream
from emergence.sampling import SamplingParams

PROMPT = "Once upon a time"
# Greedy continuation of PROMPT (40 tokens), as computed by the model; the tests re-derive it.
GREEDY_40 = (", there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball.")
# The model's greedy story from an empty prompt, up to the point where it emits an end token
# (token id 1, one of the model's eos_token_ids) after 345 tokens.
STORY = (
    'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, '
    'she saw a big, red ball. She wanted to play with it, but it was too high.\nLily\'s mom said, "Lily, '
    'let\'s go to the park." Lily was sad and didn\'t know what to do. She said, "I want to play with your '
    'ball, but I can\'t find it."\nLily was sad and didn\'t know what to do. She said, "I\'m sorry, Lily. I '
    'didn\'t know what to do."\nLily didn\'t want to help her mom, so she said, "I\'m sorry, mom. I didn\'t '
    'know what to do." Her mom said, "Don\'t worry, Lily. We can help you."\nLily and her mom went to the '
    'park to play. They played together and had fun. After a while, Lily\'s mom came into the room and saw '
    'the park. She was so happy and said, "Thank you, Lily! You are a good friend."'
)
STORY_END = 'You are a good friend."'  # what the model still writes when the prompt stops before it
STORY_PROMPT = STORY[: -len(STORY_END)]


def byte_id(b: int) -> int:
    """Id of the byte-fallback piece <0xNN> in the stories tokenizer (<0x00> is id 3)."""
    return 3 + b


@pytest.fixture(scope="module")
def lm():
    return emergence.load()


@pytest.fixture(scope="module")
def greedy(lm):
    """Greedy completion of PROMPT, 40 tokens."""
    return generate(lm.model, lm.tokenizer, [PROMPT], SamplingParams(temperature=0, max_new_tokens=40))[0]


def run(lm, prompt, **kw) -> Completion:
    return generate(lm.model, lm.tokenizer, [prompt], SamplingParams(**kw))[0]


def chunks_of(lm, prompt, **kw) -> list[Chunk]:
    return list(stream(lm.model, lm.tokenizer, prompt, SamplingParams(**kw)))


def assert_no_leak(chunks: list[Chunk], final_text: str, stop: str) -> None:
    """Everything streamed is final: at every step the text so far is a prefix of the final
    text (nothing that turns out to start a stop string was handed out), and no chunk holds
    the stop string."""
    so_far = ""
    for ch in chunks:
        assert stop not in ch.text
        so_far += ch.text
        assert final_text.startswith(so_far), (so_far, final_text)
    assert so_far == final_text


# ------------------------------------------------------------------------- the reference
def test_greedy_reference(lm, greedy):
    assert greedy.text == GREEDY_40
    assert greedy.finish_reason == "length"
    assert len(greedy.token_ids) == 40
    assert greedy.prompt_tokens == len(lm.tokenizer.encode(PROMPT))
    assert lm.tokenizer.decode(greedy.token_ids) == greedy.text


# ------------------------------------------------------------------------- stop strings
@pytest.mark.parametrize("stop", ["park", "girl named", "ed Lil", "ball"])
def test_stop_string_cuts_before_first_occurrence(lm, greedy, stop):
    # "girl named" spans the pieces "▁g" "ir" "l" "▁named"; "ed Lil" starts inside "▁named".
    assert stop in greedy.text
    expected = greedy.text[: greedy.text.index(stop)]
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert c.text == expected
    assert c.finish_reason == "stop"
    # Generation ends at the token that completed the stop string.
    n = len(c.token_ids)
    assert c.token_ids == greedy.token_ids[:n]
    assert stop in lm.tokenizer.decode(greedy.token_ids[:n])
    assert stop not in lm.tokenizer.decode(greedy.token_ids[: n - 1])


def test_stop_string_spans_several_tokens(lm, greedy):
    stop = "girl named Lily"
    pieces = [lm.tokenizer.id_to_piece(t) for t in greedy.token_ids]
    assert pieces[5:10] == ["▁g", "ir", "l", "▁named", "▁Lily"]  # the stop string covers 5 tokens
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert c.text == ", there was a little "
    assert c.token_ids == greedy.token_ids[:10]
    assert c.finish_reason == "stop"


def test_earliest_of_several_stop_strings_wins(lm, greedy):
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, stop=["ball", "Lily", "park"])
    assert c.text == ", there was a little girl named "
    assert c.finish_reason == "stop"


@pytest.mark.parametrize("stop", ["park", "girl named", "ed Lil", "girl named Lily"])
def test_stop_string_streaming_never_leaks(lm, greedy, stop):
    expected = greedy.text[: greedy.text.index(stop)]
    chunks = chunks_of(lm, PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert_no_leak(chunks, expected, stop)
    assert chunks[-1].finish_reason == "stop"
    assert all(ch.finish_reason is None for ch in chunks[:-1])
    # The streamed text and tokens are the non-streamed ones.
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert "".join(ch.text for ch in chunks) == c.text
    assert [t for ch in chunks for t in ch.token_ids] == c.token_ids


def test_held_back_stop_prefix_is_released_when_it_diverges(lm, greedy):
    # "girl named Tom" never occurs, but "girl named " does: the held-back text must come out.
    stop = "girl named Tom"
    chunks = chunks_of(lm, PROMPT, temperature=0, max_new_tokens=40, stop=[stop])
    assert_no_leak(chunks, greedy.text, stop)
    assert chunks[-1].finish_reason == "length"
    # While "...girl named" was a possible start it was held back: after the step that produced
    # "▁named" (token 9), the streamed text ends before "girl".
    so_far = "".join(ch.text for ch in chunks[:9])
    assert so_far == ", there was a little "


def test_held_back_stop_prefix_is_flushed_at_the_length_limit(lm, greedy):
    # Generation ends (max_new_tokens) while the text ends in a possible stop-string start.
    stop = "park. Once"
    pieces = [lm.tokenizer.id_to_piece(t) for t in greedy.token_ids]
    n = pieces.index("▁p") + 3
    assert pieces[n - 3:n] == ["▁p", "ar", "k"]
    text = lm.tokenizer.decode(greedy.token_ids[:n])
    assert text.endswith(" in the park")
    chunks = chunks_of(lm, PROMPT, temperature=0, max_new_tokens=n, stop=[stop])
    assert len(chunks) == n
    # "p", "par", "park" were held back as they appeared; the last step hands them out.
    assert "".join(ch.text for ch in chunks[:-1]) == text[: -len("park")]
    assert chunks[-1].text == "park"
    assert chunks[-1].finish_reason == "length"
    assert run(lm, PROMPT, temperature=0, max_new_tokens=n, stop=[stop]).text == text


# ------------------------------------------------------------------ stop tokens and EOS
def test_stop_token_id(lm, greedy):
    lily = greedy.token_ids[9]
    assert lm.tokenizer.id_to_piece(lily) == "▁Lily"
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, stop_token_ids=[lily])
    assert c.token_ids == greedy.token_ids[:9]  # the stop token itself is not part of the output
    assert c.text == ", there was a little girl named"
    assert c.finish_reason == "stop"
    chunks = chunks_of(lm, PROMPT, temperature=0, max_new_tokens=40, stop_token_ids=[lily])
    assert "".join(ch.text for ch in chunks) == c.text
    assert chunks[-1].token_ids == [] and chunks[-1].finish_reason == "stop"


def test_eos_ends_generation(lm):
    assert set(lm.config.eos_token_ids) == {1, 2}
    c = run(lm, STORY_PROMPT, temperature=0, max_new_tokens=40)
    assert c.text == STORY_END
    assert c.finish_reason == "stop"
    assert len(c.token_ids) == 11
    assert not set(c.token_ids) & {1, 2}


def test_ignore_eos(lm):
    stopped = run(lm, STORY_PROMPT, temperature=0, max_new_tokens=40)
    c = run(lm, STORY_PROMPT, temperature=0, max_new_tokens=20, ignore_eos=True)
    assert c.finish_reason == "length"
    assert len(c.token_ids) == 20
    n = len(stopped.token_ids)
    assert c.token_ids[:n] == stopped.token_ids
    assert c.token_ids[n] == 1  # the end token is now kept in the ids (its text is empty)...
    # ...and the model starts a new story after it.
    assert c.text.startswith(STORY_END + " Once upon a time")
    assert c.text == lm.tokenizer.decode(c.token_ids)


@pytest.mark.parametrize("n", [1, 7, 25])
def test_max_new_tokens_is_exact(lm, greedy, n):
    c = run(lm, PROMPT, temperature=0, max_new_tokens=n)
    assert c.token_ids == greedy.token_ids[:n]
    assert c.text == lm.tokenizer.decode(greedy.token_ids[:n])
    assert c.finish_reason == "length"
    sampled = run(lm, PROMPT, temperature=1.0, seed=3, max_new_tokens=n, ignore_eos=True)
    assert len(sampled.token_ids) == n
    assert sampled.finish_reason == "length"


def test_max_new_tokens_zero(lm):
    c = run(lm, PROMPT, temperature=0, max_new_tokens=0, logprobs=2)
    assert (c.text, c.token_ids, c.finish_reason, c.logprobs) == ("", [], "length", [])
    assert c.prompt_tokens == len(lm.tokenizer.encode(PROMPT))
    assert list(lm.stream(PROMPT, max_new_tokens=0)) == []


# ----------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("params", [
    dict(temperature=0, max_new_tokens=40),
    dict(temperature=1.0, seed=11, max_new_tokens=40),
    dict(temperature=0.8, top_p=0.9, top_k=40, seed=5, max_new_tokens=40),
], ids=["greedy", "sampled", "sampled-filtered"])
def test_stream_concatenates_to_generate(lm, params):
    c = run(lm, PROMPT, logprobs=1, **params)
    chunks = chunks_of(lm, PROMPT, logprobs=1, **params)
    assert "".join(ch.text for ch in chunks) == c.text
    assert [t for ch in chunks for t in ch.token_ids] == c.token_ids
    assert [lp.logprob for ch in chunks for lp in ch.logprobs] == [lp.logprob for lp in c.logprobs]
    assert chunks[-1].finish_reason == c.finish_reason
    assert all(ch.finish_reason is None for ch in chunks[:-1])
    assert all(len(ch.token_ids) <= 1 for ch in chunks)
    assert c.text == lm.tokenizer.decode(c.token_ids)
    # LanguageModel.stream: only the non-empty texts.
    pieces = list(lm.stream(PROMPT, **params))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == c.text


def test_seeded_sampling_is_reproducible_and_seed_dependent(lm):
    a = run(lm, PROMPT, temperature=1.0, seed=1, max_new_tokens=30)
    b = run(lm, PROMPT, temperature=1.0, seed=1, max_new_tokens=30)
    c = run(lm, PROMPT, temperature=1.0, seed=2, max_new_tokens=30)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


# Byte-fallback pieces forced with logit_bias. Under greedy decoding the two biased byte pieces
# beat every other token, and which of the two wins at a step is decided by the model's logits
# plus the bias difference; these biases (found by inspecting the model's logits after the
# prompt) make it write exactly one lead byte followed by continuation bytes.
MULTIBYTE = [
    ("Lily said", 0xEB, 0x80, 94.35, "\ub000", [0xEB, 0x80, 0x80]),  # U+B000, 3 bytes
    ("Lily said", 0xC3, 0xB4, 99.23, "\u00f4", [0xC3, 0xB4]),  # "ô", 2 bytes
]


@pytest.mark.parametrize("prompt,lead,cont,cont_bias,char,raw", MULTIBYTE, ids=["3-byte", "2-byte"])
def test_stream_multibyte_character_is_never_split(lm, prompt, lead, cont, cont_bias, char, raw):
    assert char.encode("utf-8") == bytes(raw)
    bias = {byte_id(lead): 100.0, byte_id(cont): cont_bias}
    n = len(raw)
    chunks = chunks_of(lm, prompt, temperature=0, max_new_tokens=n, logit_bias=bias)
    ids = [t for ch in chunks for t in ch.token_ids]
    assert ids == [byte_id(b) for b in raw]
    assert [lm.tokenizer.id_to_piece(t) for t in ids] == [f"<0x{b:02X}>" for b in raw]
    for ch in chunks:
        assert "\ufffd" not in ch.text
    assert [ch.text for ch in chunks] == [""] * (n - 1) + [char]
    assert run(lm, prompt, temperature=0, max_new_tokens=n, logit_bias=bias).text == char
    assert lm.tokenizer.decode(ids) == char
    assert list(lm.stream(prompt, temperature=0, max_new_tokens=n, logit_bias=bias)) == [char]


def test_stream_multibyte_character_is_released_as_soon_as_complete(lm):
    # One more step: the character is complete after 3 tokens and must come out with the third
    # chunk, not be kept until the end of the sequence.
    prompt, lead, cont, cont_bias, char, raw = MULTIBYTE[0]
    bias = {byte_id(lead): 100.0, byte_id(cont): cont_bias}
    chunks = chunks_of(lm, prompt, temperature=0, max_new_tokens=4, logit_bias=bias)
    assert [(ch.text, ch.finish_reason) for ch in chunks[:3]] == [("", None), ("", None), (char, None)]


# ----------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("params", [
    dict(temperature=0),
    dict(temperature=0.7, top_k=5, seed=4),  # logprobs are under the raw distribution, not the filtered one
], ids=["greedy", "sampled"])
def test_logprobs_match_a_full_forward_pass(lm, params):
    c = run(lm, PROMPT, max_new_tokens=25, logprobs=3, **params)
    assert len(c.logprobs) == len(c.token_ids) == 25
    prompt_ids = lm.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([prompt_ids + c.token_ids]))[0].float()
    lp = logits[len(prompt_ids) - 1: -1].log_softmax(-1)  # (25, V): the distribution each token was drawn from
    for step, (token, tl) in enumerate(zip(c.token_ids, c.logprobs)):
        assert tl.token_id == token
        assert tl.logprob == pytest.approx(lp[step, token].item(), abs=1e-4)
        assert tl.logprob <= 0
        assert len(tl.top) == 3
        values = [v for _, v in tl.top]
        assert values == sorted(values, reverse=True)
        assert tl.top[0][0] == int(lp[step].argmax())
        for t, v in tl.top:
            assert v == pytest.approx(lp[step, t].item(), abs=1e-4)
        assert values[-1] >= torch.topk(lp[step], 3).values[-1].item() - 1e-4
        if params["temperature"] == 0:
            assert tl.top[0] == (token, tl.logprob)


def test_logprobs_zero_gives_chosen_token_only(lm, greedy):
    c = run(lm, PROMPT, temperature=0, max_new_tokens=5, logprobs=0)
    assert [lp.top for lp in c.logprobs] == [[]] * 5
    assert [lp.token_id for lp in c.logprobs] == greedy.token_ids[:5]
    assert run(lm, PROMPT, temperature=0, max_new_tokens=5).logprobs is None


# ----------------------------------------------------------------- penalties and bias
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_logit_bias_forces_a_token(lm, temperature):
    token = 400
    assert token not in lm.config.eos_token_ids
    c = run(lm, PROMPT, temperature=temperature, seed=0, max_new_tokens=12, logit_bias={token: 100})
    assert c.token_ids == [token] * 12
    assert c.text == lm.tokenizer.decode([token] * 12)


def test_negative_logit_bias_bans_a_token(lm, greedy):
    lily = greedy.token_ids[9]
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, logit_bias={lily: -100})
    assert c.token_ids[:9] == greedy.token_ids[:9]
    assert c.token_ids[9] != lily and lily not in c.token_ids


def test_repetition_penalty_changes_greedy_output(lm, greedy):
    c = run(lm, PROMPT, temperature=0, max_new_tokens=40, repetition_penalty=2.0)
    assert c.token_ids != greedy.token_ids
    # "a" (in the prompt) is penalised, so the first repeated token differs.
    assert len(set(c.token_ids)) > len(set(greedy.token_ids))


def _hf_greedy(model, prompt: list[int], n: int, eos: set[int], **kw) -> list[int]:
    """transformers' greedy generate, cut at its first end token."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)[0, len(prompt):].tolist()
    for i, t in enumerate(out):
        if t in eos:
            return out[:i]
    return out


def test_repetition_penalty_matches_transformers(hf_model):
    family, hf, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    prompt = [1, 5, 9, 14, 5]
    eos = set(lm.config.eos_token_ids)
    plain = run(lm, prompt, temperature=0, max_new_tokens=30)
    c = run(lm, prompt, temperature=0, max_new_tokens=30, repetition_penalty=3.0)
    assert c.token_ids != plain.token_ids
    with torch.inference_mode():
        expected = _hf_greedy(hf, prompt, 30, eos, repetition_penalty=3.0)
        assert plain.token_ids == _hf_greedy(hf, prompt, 30, eos)
    assert c.token_ids == expected
    assert c.finish_reason == ("length" if len(expected) == 30 else "stop")


def _reference_penalised_greedy(logits_fn, prompt: list[int], n: int, eos: set[int], V: int,
                                presence: float, frequency: float) -> list[int]:
    """Greedy decoding written out: full forward pass each step, OpenAI's penalties on counts of
    the generated tokens (not the prompt's): logit -= frequency * count + presence * (count > 0)."""
    ids, out = list(prompt), []
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(n):
        logits = logits_fn(ids).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
        counts[token] += 1
        ids.append(token)
    return out


@pytest.mark.parametrize("presence,frequency", [(1.5, 0.0), (0.0, 1.0), (0.8, 0.6), (-2.0, 0.0)])
def test_presence_frequency_penalties_match_reference_loop(hf_model, presence, frequency):
    family, hf, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    prompt = [1, 5, 9, 14, 5]
    eos = set(lm.config.eos_token_ids)

    def hf_logits(ids):  # transformers' model: independent of emergence's forward pass too
        with torch.inference_mode():
            return hf(torch.tensor([ids])).logits[0, -1]

    expected = _reference_penalised_greedy(hf_logits, prompt, 20, eos, lm.config.vocab_size, presence, frequency)
    c = run(lm, prompt, temperature=0, max_new_tokens=20, presence_penalty=presence, frequency_penalty=frequency)
    assert c.token_ids == expected
    plain = _reference_penalised_greedy(hf_logits, prompt, 20, eos, lm.config.vocab_size, 0.0, 0.0)
    if presence > 0 or frequency > 0:
        assert expected != plain, "the penalty should change this greedy run"


# --------------------------------------------------------------------------- prompt length
def _long_prompt(lm, n: int) -> list[int]:
    ids = lm.tokenizer.encode(STORY)
    while len(ids) < n:
        ids = ids + ids[1:]
    return ids[:n]


def test_prompt_longer_than_context_is_rejected(lm):
    ids = _long_prompt(lm, 600)
    assert lm.config.block_size == 512
    with pytest.raises(InvalidArgument):
        run(lm, ids, temperature=0, max_new_tokens=5)
    with pytest.raises(InvalidArgument):
        list(stream(lm.model, lm.tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=5)))
    text = lm.tokenizer.decode(ids)
    assert len(lm.tokenizer.encode(text)) > 512
    with pytest.raises(InvalidArgument):
        lm.generate(text, temperature=0, max_new_tokens=5)


def test_truncate_keeps_the_end_of_the_prompt(lm):
    ids = _long_prompt(lm, 600)
    c = generate(lm.model, lm.tokenizer, [ids], SamplingParams(temperature=0, max_new_tokens=20), truncate=True)[0]
    assert c.prompt_tokens < 600
    assert c.prompt_tokens + 20 <= lm.config.block_size
    assert c.finish_reason == "length" and len(c.token_ids) == 20
    # The same as giving the kept end of the prompt directly.
    kept = run(lm, ids[-c.prompt_tokens:], temperature=0, max_new_tokens=20)
    assert c.token_ids == kept.token_ids and c.text == kept.text
    # A different start of the prompt does not matter once it is cut away.
    other = [7] * 100 + ids[-c.prompt_tokens:]
    d = generate(lm.model, lm.tokenizer, [other], SamplingParams(temperature=0, max_new_tokens=20), truncate=True)[0]
    assert d.token_ids == c.token_ids
    # Streaming and LanguageModel.complete truncate the same way.
    chunks = list(stream(lm.model, lm.tokenizer, ids, SamplingParams(temperature=0, max_new_tokens=20), truncate=True))
    assert [t for ch in chunks for t in ch.token_ids] == c.token_ids
    assert lm.complete(ids, truncate=True, temperature=0, max_new_tokens=20).token_ids == c.token_ids


@pytest.mark.parametrize("n", [500, 511])
def test_generation_stops_at_the_context_window(lm, n):
    ids = _long_prompt(lm, n)
    c = run(lm, ids, temperature=0, max_new_tokens=100, ignore_eos=True)
    assert c.prompt_tokens == n
    assert len(c.token_ids) == 512 - n
    assert c.finish_reason == "length"
    # The tokens are the ones the model predicts (full forward pass over the whole window).
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids + c.token_ids[:-1]]))[0]
    assert logits[n - 1:].argmax(-1).tolist() == c.token_ids


# ------------------------------------------------------------------------------- batching
def test_batch_equals_one_by_one(lm):
    prompts = [PROMPT, "Tom", STORY_PROMPT, "The little dog was sad because he lost his red ball in the park"]
    params = [
        SamplingParams(temperature=0, max_new_tokens=40, stop=["ball"]),  # stops on a stop string (step 38)
        SamplingParams(temperature=0, max_new_tokens=7),  # stops on length early
        SamplingParams(temperature=0, max_new_tokens=40),  # stops on an end token (step 12)
        SamplingParams(temperature=0, max_new_tokens=30, logprobs=2),
    ]
    lengths = [len(lm.tokenizer.encode(p)) for p in prompts]
    assert len(set(lengths)) == 4
    batch = generate(lm.model, lm.tokenizer, prompts, params)
    alone = [generate(lm.model, lm.tokenizer, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [c.finish_reason for c in alone] == ["stop", "length", "stop", "length"]
    assert alone[0].text == GREEDY_40[: GREEDY_40.index("ball")]
    assert alone[2].text == STORY_END
    for b, a in zip(batch, alone):
        assert b.text == a.text
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason
        assert b.prompt_tokens == a.prompt_tokens
    assert [lp.logprob for lp in batch[3].logprobs] == pytest.approx([lp.logprob for lp in alone[3].logprobs], abs=1e-4)
    assert batch[0].logprobs is None


def test_batch_sampled_rows_equal_one_by_one(lm):
    prompts = [PROMPT, "Lily went to the park", "Tom"]
    params = [SamplingParams(temperature=1.0, seed=s, max_new_tokens=20 + 5 * s) for s in range(3)]
    out = generate(lm.model, lm.tokenizer, prompts, params)
    for p, sp, b in zip(prompts, params, out):
        assert b.token_ids == run(lm, p, **{f: getattr(sp, f) for f in ("temperature", "seed", "max_new_tokens")}).token_ids
    shared = lm.generate_batch(prompts, temperature=0, max_new_tokens=10)
    assert [c.token_ids for c in shared] == [run(lm, p, temperature=0, max_new_tokens=10).token_ids for p in prompts]


def test_rows_sampling_alike_are_drawn_together_and_get_what_each_gets_alone(lm):
    # DecodeBatch draws the seeded rows with the same temperature and filters in one pass (one
    # softmax and cumulative sum over their rows), each from its own generator: every row's
    # tokens are the ones it samples alone, next to rows that sample otherwise (a penalty, other
    # filters, greedy).
    prompts = [PROMPT, "Lily went to the park", "Tom", PROMPT, "The sun"]
    alike = dict(temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=24)
    params = [SamplingParams(seed=11, **alike), SamplingParams(seed=12, **alike), SamplingParams(seed=13, **alike),
              SamplingParams(seed=14, repetition_penalty=1.3, **alike),
              SamplingParams(temperature=0, max_new_tokens=24)]
    out = generate(lm.model, lm.tokenizer, prompts, params)
    alone = [generate(lm.model, lm.tokenizer, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert [c.token_ids for c in out] == [c.token_ids for c in alone]
    assert len({tuple(c.token_ids) for c in out[:3]}) == 3 and all(len(c.token_ids) > 5 for c in out)


def test_batch_short_prompt_next_to_a_long_one(lm):
    """A short prompt batched with one that nearly fills the context must still get its own
    max_new_tokens (alone it has room for them)."""
    long_ids = _long_prompt(lm, 500)
    prompts = [long_ids, PROMPT]
    params = [SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_new_tokens=30)]
    alone = [generate(lm.model, lm.tokenizer, [p], [sp])[0] for p, sp in zip(prompts, params)]
    assert len(alone[0].token_ids) == 12 and len(alone[1].token_ids) == 30
    batch = generate(lm.model, lm.tokenizer, prompts, params)
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in batch] == ["length", "length"]
