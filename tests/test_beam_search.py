"""Beam search against transformers' `generate(num_beams=...)`.

A grid of num_beams, length_penalty, early_stopping, no_repeat_ngram_size and
num_return_sequences on tiny random GPT-2 and LLaMA models: the same sequences (end token
included in transformers' output, dropped from ours) and the same sequence scores. An
extra end id, taken from the model's own greedy output, makes hypotheses finish early so
that the finished-hypothesis bookkeeping and the stopping rules are exercised; both prompts
run in one batched call on our side and alone on transformers'.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import emergence
from emergence.decode import DecodeBatch
from emergence.kv_cache import PagedKVCache
from emergence.errors import InvalidArgument
from emergence.sampling import SamplingParams

from conftest import make_hf_model

PROMPTS = [[1, 5, 9, 17], [1, 40, 3, 3, 71, 22, 8]]
MAX_NEW = 12
GRID = list(itertools.product([2, 4], [1.0, 0.0, 2.0, -0.5], [True, False, "never"]))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"beam-{request.param}")
    hf = make_hf_model(request.param, folder)
    lm = emergence.load(str(folder), device="cpu")
    greedy = hf.generate(torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=6, eos_token_id=2,
                         pad_token_id=0)[0, len(PROMPTS[0]):].tolist()
    extra_end = next(t for t in greedy[2:] if t != 2)  # a token the model likes: hypotheses end early
    return hf, lm, extra_end


def reference(hf, prompt, extra_end, **kw):
    """transformers' hypotheses for one prompt: (generated ids without the end token, score)."""
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=[2, extra_end],
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True, **kw)
    found = []
    for seq, score, steps in zip(out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist(),
                                 out.beam_indices.tolist()):
        seq = seq[:sum(i >= 0 for i in steps)]  # its length: the steps that chose one of its tokens
        if seq and seq[-1] in (2, extra_end):  # a finished hypothesis ends with its end token
            seq.pop()
        found.append((seq, score))
    return found


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", GRID)
def test_beam_search_matches_transformers(pair, num_beams, length_penalty, early_stopping):
    hf, lm, extra_end = pair
    ngram = 2 if length_penalty == 1.0 else 0
    returned = num_beams if early_stopping is not True else 1
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=returned)
    ours = lm.generate_batch(PROMPTS, temperature=0, max_new_tokens=MAX_NEW, stop_token_ids=[extra_end],
                             no_repeat_ngram_size=ngram, **kw)
    assert len(ours) == returned * len(PROMPTS)
    for p, prompt in enumerate(PROMPTS):
        expected = reference(hf, prompt, extra_end, no_repeat_ngram_size=ngram or None, **kw)
        got = ours[p * returned:(p + 1) * returned]
        assert [c.token_ids for c in got] == [ids for ids, _ in expected]
        for c, (_, score) in zip(got, expected):
            assert c.score == pytest.approx(score, rel=1e-6, abs=1e-4)
            assert c.prompt_tokens == len(prompt)


def test_some_hypotheses_end_on_their_end_token(pair):
    """The grid would prove little if nothing ever ended early: here some hypotheses do (with
    length_penalty 0, the grid's second column, an early end outranks longer hypotheses)."""
    hf, lm, extra_end = pair
    out = lm.generate_batch(PROMPTS, num_beams=4, num_return_sequences=4, max_new_tokens=MAX_NEW,
                            length_penalty=0.0, stop_token_ids=[extra_end])
    assert "stop" in {c.finish_reason for c in out}
    assert any(len(c.token_ids) < MAX_NEW - 1 for c in out if c.finish_reason == "stop")


def test_beams_batched_equal_beams_alone(pair):
    _, lm, _ = pair
    both = lm.generate_batch(PROMPTS, num_beams=3, num_return_sequences=2, max_new_tokens=10)
    alone = [c for p in PROMPTS for c in lm.generate_batch([p], num_beams=3, num_return_sequences=2,
                                                           max_new_tokens=10)]
    assert [(c.token_ids, c.score) for c in both] == [(c.token_ids, c.score) for c in alone]


def test_eager_and_native_backends_agree(pair):
    _, lm, _ = pair
    results = []
    for backend in ("eager", "auto"):
        out = emergence.generate(lm.model, lm.tokenizer, PROMPTS, SamplingParams(num_beams=4, max_new_tokens=10),
                                 backend=backend)
        results.append([c.token_ids for c in out])
    assert results[0] == results[1]


def test_stop_string_ends_a_hypothesis(pair):
    """A candidate whose text reaches a stop string is a finished hypothesis, its text cut
    before the stop string (length_penalty 0 ranks by log-probability alone, so a hypothesis
    that stopped early outranks the longer ones)."""
    _, lm, _ = pair
    free = lm.generate_batch([PROMPTS[0]], num_beams=2, max_new_tokens=MAX_NEW)[0]
    word = free.text.split()[3]  # a word the best hypothesis reaches after a few tokens
    out = lm.generate_batch([PROMPTS[0]], num_beams=2, num_return_sequences=2, max_new_tokens=MAX_NEW,
                            length_penalty=0.0, stop=[word])
    assert "stop" in {c.finish_reason for c in out}
    for c in out:
        assert word not in c.text
        if c.finish_reason == "stop":
            assert lm.tokenizer.decode(c.token_ids).startswith(c.text) and len(c.token_ids) <= 4


def test_reorder_copies_only_a_shared_last_block(pair):
    """Beam search's reorder: a child continuing its own parent's sequence keeps its blocks;
    two children of one parent share its blocks, and only its partly filled last block is
    copied, once, when they write into it."""
    _, lm, _ = pair
    cache = PagedKVCache(lm.config, 16, block_size=4)
    batch = DecodeBatch(lm.model, lm.tokenizer, cache)
    rows = [batch.new_row([1, 5, 9, 17, 3, 3], SamplingParams(max_new_tokens=8)) for _ in range(3)]
    batch.admit(rows)  # 6 tokens each: one full block and a partly filled one
    kept = [list(r.blocks) for r in rows]
    children = [batch.child(rows[0]), batch.child(rows[0]), batch.child(rows[2])]
    batch.reorder([rows[0], rows[0], rows[2]], children)
    assert cache.copies == 0 and cache.num_used == 4  # rows[1]'s blocks are freed, the others shared
    batch.advance([7, 8, 9])
    assert cache.copies == 1
    assert children[0].blocks[0] == children[1].blocks[0] == kept[0][0]  # the full block stays shared
    assert kept[0][1] in (children[0].blocks[1], children[1].blocks[1])  # one child writes in place
    assert children[0].blocks[1] != children[1].blocks[1]
    assert children[2].blocks == kept[2]  # an only child keeps its parent's blocks


@pytest.mark.parametrize("kw,message", [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences (3) must be <= num_beams (2)"),
    (dict(num_beams=2, top_p=0.9), "top_p does not combine with beam search"),
    (dict(num_beams=2, temperature=0.7), "temperature 0.7 does not combine with beam search"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be true, false or \"never\""),
])
def test_bad_beam_settings_are_one_clear_line(pair, kw, message):
    _, lm, _ = pair
    with pytest.raises(InvalidArgument) as e:
        lm.generate_batch([PROMPTS[0]], max_new_tokens=4, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_server_beam_search_equals_generate():
    """`num_beams` as an extra body field: the n best beams, whole, as the choices; settings
    that do not combine are a 400 with one line."""
    from emergence.serve.app import Server, serve_in_thread

    from test_serve_http import post

    lm = emergence.load()
    app = Server(lm, "m", slots=2)
    server, _ = serve_in_thread(app)
    try:
        port = server.server_address[1]
        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 16, "num_beams": 3, "n": 2,
                "length_penalty": 0.5, "early_stopping": "never"}
        status, _, out = post(port, "/v1/completions", body)
        assert status == 200, out
        expected = lm.generate_batch(["Once upon a time"], max_new_tokens=16, num_beams=3, num_return_sequences=2,
                                     length_penalty=0.5, early_stopping="never")
        assert [c["text"] for c in out["choices"]] == [c.text for c in expected]
        assert out["usage"]["completion_tokens"] == sum(len(c.token_ids) for c in expected)
        for bad, message in (({"top_p": 0.5}, "top_p does not combine with beam search"),
                             ({"n": 4}, "num_return_sequences (4) must be <= num_beams (3)")):
            status, _, out = post(port, "/v1/completions", {**body, **bad})
            assert status == 400 and message in out["error"]["message"], out
    finally:
        server.shutdown()
        app.close()
