"""Prefix caching (kv_cache.py, decode.py, serve/engine.py): blocks registered by their content
and their whole prefix, reused by later rows, evicted least recently used first, kept apart per
adapter; and a warm run's tokens and logits equal a cold run's, on both backends, after
preemption, and through the server (its usage reports the cached tokens, /metrics counts them).

Reference: the same rows decoded with prefix caching off (every token computed), and the
model's full forward pass over the sequence.
"""

from __future__ import annotations

import dataclasses
import http.client
import json

import pytest
import torch

import emergence
from emergence.config import Config
from emergence.decode import DecodeBatch
from emergence.kv_cache import PagedKVCache
from emergence.sampling import SamplingParams

STORY = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day she saw a big red ball under a tree.")


@pytest.fixture(scope="module")
def lm():
    return emergence.load(device="cpu")


# ------------------------------------------------------------------------ the block index
def test_blocks_are_found_by_their_whole_prefix_and_evicted_least_recent_first():
    cache = PagedKVCache(Config.from_name("tiny-llama"), 4, block_size=2)
    cache.prefix_caching = True
    a: list[int] = []
    cache.grow(a, 0, 4)  # tokens 1 2 | 3 4
    s0 = cache.register(a[0], 0, [1, 2])
    s1 = cache.register(a[1], s0, [3, 4])
    assert 0 < s0 < s1 and cache.num_cached == 2
    assert cache.match([1, 2, 3, 4, 5]) == (a, [s0, s1])
    assert cache.match([1, 2, 3, 4], limit=3) == (a[:1], [s0])  # whole blocks within the limit only
    assert cache.match([9, 9, 3, 4]) == ([], [])  # block 3 4 after another prefix is another block
    assert cache.match([1, 2, 3, 4], namespace="adapter") == ([], [])  # computed through another adapter
    assert cache.register(a[1] + 1, s0, [3, 4]) == s1  # the same content again: the cached serial
    cache.release(a)  # nobody holds them: still cached, and counted free
    assert (cache.num_free, cache.num_used, cache.num_cached) == (4, 0, 2)
    cache.k[:, 0] = 5.0
    b = cache.acquire(cache.match([1, 2, 3, 4, 5])[0])
    assert b == [0, 1] and cache.num_free == 2 and torch.equal(cache.k[:, 0], torch.full_like(cache.k[:, 0], 5.0))
    cache.release(b[1:])  # block 1 is released now, block 0 later: block 1 is the older
    cache.release(b[:1])
    c: list[int] = []
    cache.grow(c, 0, 6)  # three blocks: the two never cached, then the least recently released (1)
    assert sorted(c) == [1, 2, 3] and cache.num_cached == 1
    assert cache.match([1, 2, 3, 4]) == ([0], [s0])  # 3 4 was evicted; its parent stays
    assert torch.equal(cache.k[:, 1], torch.zeros_like(cache.k[:, 1]))  # an evicted block comes zeroed
    cache.clear_prefixes()
    assert cache.match([1, 2, 3, 4]) == ([], []) and cache.num_free == 1


def test_off_by_default_and_nothing_is_registered():
    cache = PagedKVCache(Config.from_name("tiny-llama"), 4, block_size=2)
    a: list[int] = []
    cache.grow(a, 0, 4)
    assert cache.register(a[0], 0, [1, 2]) == 0
    cache.release(a)
    assert cache.match([1, 2, 3]) == ([], []) and cache.num_cached == 0


# ------------------------------------------------------------------------- the decode batch
def decode(lm, prompts: list[list[int]], params: SamplingParams, *, caching: bool, backend: str = "auto",
           blocks: int = 64, block_size: int = 8):
    """Each prompt decoded alone, one after the other, over one cache; per prompt: (tokens,
    cached prompt tokens, first logits)."""
    cache = PagedKVCache(lm.config, blocks, block_size=block_size)
    cache.prefix_caching = caching
    batch = DecodeBatch(lm.model, lm.tokenizer, cache, backend=backend)
    out = []
    for prompt in prompts:
        row = batch.new_row(prompt, dataclasses.replace(params))
        batch.admit([row])
        first = batch.logits[0].clone()
        while batch.rows:
            batch.step()
        out.append((row.token_ids, row.cached, first))
    assert cache.num_used == 0
    return out


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_a_warm_prefix_gives_the_cold_tokens_and_logits(lm, backend):
    story = lm.tokenizer.encode(STORY)
    prompts = [story + lm.tokenizer.encode(" Lily"), story + lm.tokenizer.encode(" Then the dog"), story]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    cold = decode(lm, prompts, params, caching=False, backend=backend)
    warm = decode(lm, prompts, params, caching=True, backend=backend)
    assert [c for _, c, _ in cold] == [0, 0, 0]
    # the first prompt is computed; the others share the story's whole blocks (the last token of
    # a prompt is always computed, for its logits)
    assert warm[0][1] == 0
    assert warm[1][1] == warm[2][1] == (len(story) - 1) // 8 * 8 > 0
    for (tokens, _, logits), (cold_tokens, _, cold_logits) in zip(warm, cold):
        assert tokens == cold_tokens
        assert (logits - cold_logits).abs().max().item() <= 1e-4
    # and against the model's own forward pass without any cache
    reference = lm.model(torch.tensor([prompts[1]]))[0, -1].float()
    assert (warm[1][2] - reference).abs().max().item() <= 1e-4


def test_generated_tokens_are_cached_for_the_next_turn(lm):
    # A chat's next turn starts with the previous prompt and the reply: both are reused.
    prompt = lm.tokenizer.encode(STORY)
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    (reply, _, _), = decode(lm, [prompt], params, caching=False)
    turn = prompt + reply + lm.tokenizer.encode(" The end.")
    cold = decode(lm, [prompt, turn], params, caching=False)
    warm = decode(lm, [prompt, turn], params, caching=True)
    assert warm[1][1] == (len(prompt) + len(reply) - 1) // 8 * 8 > len(prompt)  # reply blocks too
    assert [t for t, _, _ in warm] == [t for t, _, _ in cold]


def test_sampled_rows_with_seeds_are_reproducible_warm(lm):
    prompt = lm.tokenizer.encode(STORY)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_new_tokens=30, ignore_eos=True)
    cold = decode(lm, [prompt, prompt], params, caching=False)
    warm = decode(lm, [prompt, prompt], params, caching=True)
    assert warm[1][1] > 0 and warm[1][0] == cold[1][0] == cold[0][0]


def test_an_evicted_prefix_is_computed_again(lm):
    # A pool of 10 blocks of 8 tokens: a second, different story of 50 + 30 tokens takes every
    # block, evicting the first story's; the first story then runs cold again, with the right tokens.
    story = lm.tokenizer.encode(STORY)[:30]
    other = lm.tokenizer.encode("The sun was hot and the sky was blue. Tom and his dog ran to the river to "
                                "swim and play in the cool water all day long until the sun went down " * 2)[:50]
    assert len(other) == 50
    params = SamplingParams(temperature=0, max_new_tokens=30, ignore_eos=True)
    warm = decode(lm, [story, other, story, story], params, caching=True, blocks=10)
    cold = decode(lm, [story, other, story, story], params, caching=False, blocks=10)
    assert [c for _, c, _ in warm] == [0, 0, 0, 24]
    assert [t for t, _, _ in warm] == [t for t, _, _ in cold]


def test_preempted_rows_take_their_own_blocks_back_from_the_cache(lm):
    # Two rows of ~105 tokens in 10 blocks of 16: the second is preempted when both hold 5
    # blocks; the first then evicts only what it needs (the second's last blocks, released
    # first), and the second, admitted again, takes its surviving blocks back from the cache.
    prompts = ["Once upon a time", "Lily saw a big dog"]
    params = SamplingParams(temperature=0, max_new_tokens=100, ignore_eos=True)
    expected = [lm.complete(p, **dataclasses.asdict(params)).token_ids for p in prompts]
    cache = PagedKVCache(lm.config, 10, block_size=16)
    cache.prefix_caching = True
    batch = DecodeBatch(lm.model, lm.tokenizer, cache)
    rows = [batch.new_row(lm.tokenizer.encode(p), dataclasses.replace(params), i) for i, p in enumerate(prompts)]
    batch.admit(rows)
    waiting, reused = [], []
    while batch.rows or waiting:
        if waiting and cache.num_free >= cache.blocks_for(len(waiting[0].history)) + len(batch.rows) + 1:
            batch.admit([row := waiting.pop(0)])
            reused.append(row.cached)
        batch.step()
        waiting += batch.preempted
        batch.preempted.clear()
    assert len(reused) == 1 and reused[0] >= 32  # at least two of its blocks came back
    assert [r.token_ids for r in rows] == expected


def test_rows_through_an_adapter_do_not_share_the_base_models_blocks(lm):
    import copy

    from emergence.adapters.lora import LoraSpec, add_adapter, set_active

    model = copy.deepcopy(lm.model)
    add_adapter(model, LoraSpec(r=4, alpha=8, targets=["q", "v"]), "x")
    with torch.no_grad():  # a trained adapter: B nonzero
        generator = torch.Generator().manual_seed(1)
        for p in (p for name, p in model.named_parameters() if "lora_B" in name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    set_active(model, None)
    prompt = lm.tokenizer.encode(STORY)
    cache = PagedKVCache(lm.config, 32, block_size=8)
    cache.prefix_caching = True
    batch = DecodeBatch(model, lm.tokenizer, cache, backend="eager")
    rows = []
    for adapter in (None, "x", "x", None):
        row = batch.new_row(prompt, SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
        row.adapter = adapter
        batch.admit([row])
        rows.append(row)
    full = (len(prompt) - 1) // 8 * 8
    assert [r.cached for r in rows] == [0, 0, full, full]
    assert (batch.logits[0] - batch.logits[1]).abs().max().item() > 1e-3  # (the adapter changes the logits)
    assert (batch.logits[1] - batch.logits[2]).abs().max().item() <= 1e-5
    assert (batch.logits[0] - batch.logits[3]).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------ the server
def _post(port: int, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return json.loads(resp.read())


def _two_turns(lm, caching: bool) -> tuple[list[dict], str]:
    """A two-turn chat with a server (prefix caching on or off): both responses and /metrics."""
    from emergence.serve.app import Server, serve_in_thread

    app = Server(lm, "m", slots=4, prefix_caching=caching)
    server, thread = serve_in_thread(app, port=0)
    port = server.server_address[1]
    try:
        def turn(messages: list[dict]) -> dict:
            return _post(port, "/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 20,
                                                        "temperature": 0})

        history = [{"role": "user", "content": STORY * 3}]
        first = turn(history)
        responses = [first, turn(history + [first["choices"][0]["message"], {"role": "user", "content": "And then?"}])]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/metrics")
        return responses, conn.getresponse().read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        app.close()


def test_the_server_reports_cached_prompt_tokens_and_answers_as_cold(lm):
    warm, metrics = _two_turns(lm, caching=True)
    cold, cold_metrics = _two_turns(lm, caching=False)
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in warm]
    first_prompt = warm[0]["usage"]["prompt_tokens"]
    # the second turn reuses at least the first prompt's whole 64-token blocks
    assert cached[0] == 0 and cached[1] % 64 == 0 and cached[1] >= (first_prompt - 1) // 64 * 64 > 0
    assert [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in cold] == [0, 0]
    assert [r["choices"][0]["message"]["content"] for r in warm] == [r["choices"][0]["message"]["content"]
                                                                      for r in cold]
    assert f"emergence_prefix_cache_hit_tokens_total {float(cached[1])}" in metrics
    assert "emergence_prefix_cache_hit_tokens_total 0.0" in cold_metrics
    prompts = sum(r["usage"]["prompt_tokens"] for r in warm)
    assert f"emergence_prefill_prompt_tokens_total {float(prompts)}" in metrics


def test_the_committed_benchmark_and_the_readmes_figures_agree():
    import statistics
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_prefix import render_line

    result = json.loads((root / "bench" / "results" / "prefix_cache.json").read_text())
    rounds = result["rounds"]
    assert len(rounds) >= 5 and all(r["history_tokens"] >= 1000 for r in rounds)
    assert all(r["cold_cached_tokens"] == 0 for r in rounds)  # a conversation never seen: nothing cached
    # warm: every whole 64-token block of the history came from the cache
    assert all(r["warm_cached_tokens"] >= r["history_tokens"] // 64 * 64 - 64 for r in rounds)
    assert result["speedup_median"] == pytest.approx(statistics.median(r["cold_s"] / r["warm_s"] for r in rounds))
    assert result["speedup_median"] >= 5  # the target
    readme = (root / "README.md").read_text()
    assert render_line(result) in readme
    assert f"first token {result['speedup_median']:.1f}x sooner warm than cold" in readme  # the feature row
