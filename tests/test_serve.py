"""The OpenAI-compatible server (emergence.serve): the official `openai` client against a live
server, continuous batching under 32 concurrent streaming clients, and bad input / faults.

Every expected value comes from emergence's own single-request generation (`lm.generate`,
`lm.complete`) or the model's hidden states, never from the server itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import struct
import threading
import time

import openai
import pytest
import torch

import emergence
from conftest import in_threads, until
from emergence.api import LanguageModel
from emergence.chat import encode_prompt, resolve_chat_template
from emergence.kv_cache import PagedKVCache
from emergence.model import Placed
from emergence.sampling import SamplingParams
from emergence.serve.app import Server, serve_in_thread

MODEL = "stories260K"
PROMPT = "Once upon a time"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def lm():
    return emergence.load()


def _start(app: Server):
    server, thread = serve_in_thread(app, port=0)
    return server, thread


def _stop(app: Server, server, thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    app.close()


@pytest.fixture(scope="module")
def served(lm):
    """(app, port) of the main server: the default model, 8 slots, no key."""
    app = Server(lm, MODEL, slots=8)
    server, thread = _start(app)
    yield app, server.server_address[1]
    _stop(app, server, thread)


@pytest.fixture(scope="module")
def keyed(lm):
    """(app, port) of a server with an API key and a small body limit."""
    app = Server(lm, MODEL, slots=2, api_key="sekret", max_body_bytes=2048)
    server, thread = _start(app)
    yield app, server.server_address[1]
    _stop(app, server, thread)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="x", max_retries=0, timeout=60)


# ------------------------------------------------------------------------------ helpers
def request(port: int, method: str, path: str, body=None, headers: dict | None = None, conn=None):
    """(status, parsed JSON or raw bytes) of one HTTP request; body: dict (sent as JSON) or bytes."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, data, hdrs)
    resp = conn.getresponse()
    raw = resp.read()
    if own:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


def sse(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[list[dict], bool]:
    """POST a streaming request; (the JSON events, whether "data: [DONE]" ended the stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert resp.getheader("Content-Type").split(";")[0] == "text/event-stream"
    events, done = [], False
    for line in resp:
        line = line.strip()
        if not line:
            continue
        assert line.startswith(b"data: "), line
        payload = line[len(b"data: "):]
        assert not done, "an event after [DONE]"
        if payload == b"[DONE]":
            done = True
        else:
            events.append(json.loads(payload))
    conn.close()
    return events, done


def assert_api_error(status: int, body, expected_status: int, param: str | None = "any") -> dict:
    """A 4xx in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    assert status == expected_status, (status, body)
    assert 400 <= status < 500
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    if param != "any":
        assert error["param"] == param, error
    return error


def still_serving(port: int, lm, headers: dict | None = None) -> None:
    """A normal request after a fault gets the normal answer."""
    status, body = request(port, "POST", "/v1/completions",
                           {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}, headers)
    assert status == 200, body
    assert body["choices"][0]["text"] == lm.generate(PROMPT, temperature=0, max_new_tokens=5)


def plain_prompt_ids(lm, messages) -> list[int]:
    template = resolve_chat_template(None, missing="plain")
    return encode_prompt(lm.tokenizer, template.render(messages, add_generation_prompt=True))


# ------------------------------------------------------------------------------ the openai client
def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "emergence"
    assert models.data[0].object == "model"


def test_completion_equals_library_and_stream_equals_whole(client, lm):
    expected = lm.complete(PROMPT, temperature=0, max_new_tokens=30)
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0)
    choice = whole.choices[0]
    assert choice.text == expected.text and choice.text.startswith(", there was")
    assert choice.finish_reason == "length" and choice.index == 0
    prompt_tokens = len(lm.tokenizer.encode(PROMPT))
    assert lm.tokenizer.encode(PROMPT)[0] == lm.tokenizer.bos_id  # BOS is counted
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == \
        (prompt_tokens, 30, prompt_tokens + 30)
    assert whole.model == MODEL and whole.object == "text_completion"

    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_completion_that_ends_with_eos(client, lm):
    prompt = "One day, a cat"
    expected = lm.complete(prompt, temperature=0, max_new_tokens=400)
    assert expected.finish_reason == "stop" and len(expected.token_ids) < 400  # the story ends by itself
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=400, temperature=0)
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == len(expected.token_ids)
    stream = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=400, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == expected.text
    assert stream[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_equal_library(client, lm):
    n = 10
    expected = lm.complete(PROMPT, temperature=0, max_new_tokens=n, logprobs=3)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=3)
    choice = got.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert "".join(lp.tokens) == choice.text == expected.text
    offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    assert lp.text_offset == offsets
    for i, (token, logprob, top, ref) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                                        expected.logprobs)):
        assert len(top) == 3
        best_token, best = next(iter(top.items()))
        assert best_token == token and best == pytest.approx(logprob, abs=0)  # greedy: the top entry is chosen
        assert max(top.values()) == best
        assert logprob == pytest.approx(ref.logprob, abs=1e-5)
        assert list(top.values()) == pytest.approx([v for _, v in ref.top], abs=1e-5)
        assert all(v <= 0 for v in top.values())
    # the first token: "," with logprob about -0.0317 (stories260K is very sure)
    assert lp.tokens[0] == "," and -0.05 < lp.token_logprobs[0] < 0

    # streamed, the same tokens and values arrive piece by piece
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=n, temperature=0, logprobs=3, stream=True) if c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert [o for s in streamed for o in s.text_offset] == offsets


CHAT = [{"role": "system", "content": "You are a story teller."},
        {"role": "user", "content": "Tell me about a cat."}]


def test_chat_equals_plain_template_generation(client, lm):
    ids = plain_prompt_ids(lm, CHAT)
    assert lm.tokenizer.decode(ids) == "You are a story teller.\n\nUser: Tell me about a cat.\nAssistant:"
    expected = lm.complete(ids, temperature=0, max_new_tokens=40, logprobs=2, stop=("\nUser:",))
    got = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
                                         logprobs=True, top_logprobs=2)
    choice = got.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text and choice.message.content.startswith("Can I play")
    assert choice.finish_reason == expected.finish_reason == "length"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 40
    assert got.object == "chat.completion"
    content = choice.logprobs.content
    assert len(content) == 40
    for entry, ref in zip(content, expected.logprobs):
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # temperature 0: the best one is taken
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob == pytest.approx(ref.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in ref.top], abs=1e-5)
        assert entry.bytes == list(entry.token.encode("utf-8"))

    stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text
    assert [c.choices[0].finish_reason for c in stream if c.choices[0].finish_reason] == ["length"]
    streamed = [e for c in stream if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)
    assert all(c.object == "chat.completion.chunk" and c.id == stream[0].id for c in stream)


class _Scripted(Placed, torch.nn.Module):
    """The real model, with each next token forced by the last one (`follow`: token -> next token):
    a base model that "speaks" a script, to see what the server does with text it produces. It
    offers what the eager decode backend calls: hidden_states (which notes each row's last
    token: the last of the row's new tokens, from the cache view), head, and (model.Placed) the
    dtype and device of its embedding."""

    def __init__(self, model, follow: dict[int, int]) -> None:
        super().__init__()
        self.inner, self.follow = model, follow
        self.config, self.tok_embeddings = model.config, model.tok_embeddings
        self._last: list[int] = []

    def hidden_states(self, input_ids, cache=None, **kwargs):
        counts = cache.counts if cache is not None else torch.full((input_ids.shape[0],), input_ids.shape[1])
        self._last = input_ids[torch.arange(input_ids.shape[0]), counts - 1].tolist()
        return self.inner.hidden_states(input_ids, cache, **kwargs)

    def head(self, h):  # h (B, D): each row's last hidden state
        logits = self.inner.head(h).clone()
        for b, last in enumerate(self._last):
            if last in self.follow:
                logits[b, self.follow[last]] += 1000.0
        return logits


def test_plain_template_stop_ends_the_reply(lm):
    """Neither packaged base model writes "\\nUser:" by itself, so a scripted one that answers
    "Hi." then starts the user's next turn shows the stop at work."""
    script = lm.tokenizer.encode("Hi.\nUser:", add_bos=False)  # ... "Hi" "." "\n" "U" "s" "er" ":"
    assert len(set(script)) == len(script)
    follow = dict(zip(script, script[1:] + script[:1]))  # ":" (the end of "Assistant:") -> "Hi" ...
    scripted = LanguageModel(_Scripted(lm.model, follow), lm.tokenizer, lm.config)
    messages = [{"role": "user", "content": "Hello!"}]
    ids = plain_prompt_ids(lm, messages)
    unstopped = scripted.generate(ids, temperature=0, max_new_tokens=30)
    assert "\nUser:" in unstopped and unstopped.startswith("Hi.\nUser: Hi.")

    app = Server(scripted, "scripted", slots=2)
    server, thread = _start(app)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="x", max_retries=0)
        got = c.chat.completions.create(model="scripted", messages=messages, max_tokens=30, temperature=0)
        assert got.choices[0].message.content == unstopped.split("\nUser:")[0] == "Hi."
        assert got.choices[0].finish_reason == "stop"
        stream = list(c.chat.completions.create(model="scripted", messages=messages, max_tokens=30, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == "Hi."
        assert stream[-1].choices[0].finish_reason == "stop"
        # a caller's own stop strings are kept besides the template's
        got = c.chat.completions.create(model="scripted", messages=messages, max_tokens=30, temperature=0, stop=".")
        assert got.choices[0].message.content == "Hi"
    finally:
        _stop(app, server, thread)


def test_n_with_seed_is_reproducible(client, lm):
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=1234, n=2)
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]  # two different samples
    # choice i samples with seed + i, exactly as the library does
    assert texts == [lm.generate(PROMPT, temperature=1.0, seed=1234 + i, max_new_tokens=30) for i in range(2)]
    assert first.usage.prompt_tokens == len(lm.tokenizer.encode(PROMPT))  # the prompt counts once
    assert first.usage.completion_tokens == 60
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert [streamed[0], streamed[1]] == texts

    chat = dict(model=MODEL, messages=CHAT, max_tokens=20, temperature=0.8, seed=99, n=2)
    a, b = client.chat.completions.create(**chat), client.chat.completions.create(**chat)
    ids = plain_prompt_ids(lm, CHAT)
    replies = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert replies == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert replies == [lm.generate(ids, temperature=0.8, seed=99 + i, max_new_tokens=20, stop=("\nUser:",))
                       for i in range(2)]
    assert a.usage.prompt_tokens == len(ids)  # once, as in the streamed usage and in /v1/completions
    assert a.usage.completion_tokens == 40


def test_stop_strings(client, lm):
    full = lm.generate(PROMPT, temperature=0, max_new_tokens=30)
    assert "Lily" in full
    expected = full[:full.index("Lily")]
    for stop in ("Lily", ["zebra", "Lily"]):
        got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop)
        assert got.choices[0].text == expected == ", there was a little girl named "
        assert got.choices[0].finish_reason == "stop"
        assert got.choices[0].text == lm.generate(PROMPT, temperature=0, max_new_tokens=30,
                                                  stop=(stop,) if isinstance(stop, str) else tuple(stop))
        chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                                stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
    # a stop string split across tokens (" named Lily" is "▁named" "▁Lily")
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop="med Li")
    assert got.choices[0].text == ", there was a little girl na"


def test_embeddings_are_mean_hidden_states(client, lm):
    texts = ["Once upon a time", "The cat sat on the mat."]
    with torch.inference_mode():
        expected = [lm.model.hidden_states(torch.tensor([lm.tokenizer.encode(t)]))[0].mean(dim=0) for t in texts]
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1]
    assert floats.usage.prompt_tokens == sum(len(lm.tokenizer.encode(t)) for t in texts)
    for d, ref in zip(floats.data, expected):
        assert len(d.embedding) == lm.config.n_embd
        assert torch.allclose(torch.tensor(d.embedding), ref, atol=1e-5, rtol=0)
    assert not torch.allclose(expected[0], expected[1], atol=1e-2)

    # the client's default asks for base64 and decodes it itself
    default = client.embeddings.create(model=MODEL, input=texts)
    for d, ref in zip(default.data, expected):
        assert torch.allclose(torch.tensor(d.embedding), ref, atol=1e-5, rtol=0)
    # the base64 bytes are little-endian float32
    status, body = request(client.base_url.port, "POST", "/v1/embeddings",
                           {"model": MODEL, "input": lm.tokenizer.encode(texts[0]), "encoding_format": "base64"})
    assert status == 200
    raw = base64.b64decode(body["data"][0]["embedding"])
    vector = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert torch.allclose(torch.tensor(vector), expected[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ continuous batching
def _load_prompts(lm) -> list[tuple[str, int]]:
    openings = ["Once upon a time", "One day", "Tom and Lily", "The little dog", "A big red ball",
                "In the park", "Mom said", "The sun was"]
    extras = ["", " there was a cat", " went to the store and saw", " played with a toy",
              " and the bird sang a song"]
    story = lm.generate("Once upon a time", temperature=0, max_new_tokens=180)
    prompts = []
    for i in range(96):
        text = f"{openings[i % 8]}{extras[(i // 8) % 5]}"
        if i % 11 == 0:  # now and then a long prompt (~180 tokens) joins: the others shift right
            text = "Once upon a time" + story + f" {openings[i % 8]}"
        prompts.append((text, 20 + (i * 7) % 41))  # max_tokens 20..60
    return prompts


def test_32_concurrent_streams_equal_single_user_generation(served, lm):
    app, port = served
    jobs = _load_prompts(lm)
    expected = [lm.complete(p, temperature=0, max_new_tokens=m) for p, m in jobs]
    steps_before = app.engine.steps
    results: dict[int, tuple] = {}

    def client_thread(k: int) -> None:
        for j in range(k, len(jobs), 32):  # 3 requests each, one after the other
            prompt, max_tokens = jobs[j]
            events, done = sse(port, "/v1/completions", {
                "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
            text = "".join(e["choices"][0]["text"] for e in events)
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]]
            results[j] = (text, finish, done)

    in_threads(client_thread, 32)
    assert sorted(results) == list(range(len(jobs)))
    for j, (text, finish, done) in results.items():
        assert done, f"request {j}: no [DONE]"
        assert finish == [expected[j].finish_reason], (j, finish)
        assert text == expected[j].text, (j, jobs[j], text, expected[j].text)
    generated = sum(len(e.token_ids) for e in expected)
    steps = app.engine.steps - steps_before
    assert steps < 0.5 * generated, (steps, generated)  # rows really decoded together
    assert app.engine.active == 0 and app.engine.cache.num_used == 0  # every block back in the pool


def test_a_small_kv_budget_preempts_and_every_stream_still_equals_single_user_generation(lm):
    """8 slots over a KV cache of 1.5 contexts (12 blocks of 64 tokens): rows that run out of
    blocks are preempted and resumed later, their prompt and tokens recomputed; every client
    still gets its single-user greedy text, and no block is left held."""
    app = Server(lm, MODEL, slots=8, kv_memory=12 * PagedKVCache.block_bytes(lm.config, 64))
    server, thread = _start(app)
    port = server.server_address[1]
    jobs = [(f"{PROMPT} {word}", 150) for word in ("Lily", "Tom", "the cat", "a dog", "Sue", "Ben", "the sun", "Max")]
    expected = [lm.complete(p, temperature=0, max_new_tokens=m, ignore_eos=True).text for p, m in jobs]
    results = {}

    def client_thread(j: int) -> None:
        prompt, max_tokens = jobs[j]
        results[j] = request(port, "POST", "/v1/completions", {
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})

    try:
        in_threads(client_thread, len(jobs))
        for j, (status, body) in results.items():
            assert status == 200, body
            assert body["choices"][0]["text"] == expected[j], j
        assert app.engine.preemptions > 0, "the cache never ran short: preemption went untested"
        assert app.engine.active == 0 and app.engine.cache.num_used == 0
    finally:
        _stop(app, server, thread)


def test_a_burst_of_connections_is_not_reset(served, lm):
    """64 clients connecting at the same moment (socketserver's default listen backlog of 5 made
    the kernel reset some of them)."""
    port = served[1]
    expected = lm.generate(PROMPT, temperature=0, max_new_tokens=8)
    barrier = threading.Barrier(64)
    texts: list[str] = []

    def one(k: int) -> None:
        barrier.wait(timeout=30)
        status, body = request(port, "POST", "/v1/completions",
                               {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert status == 200, body
        texts.append(body["choices"][0]["text"])

    in_threads(one, 64, timeout=60)
    assert texts == [expected] * 64


# ------------------------------------------------------------------------------ bad input and faults
OK_BODY = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
BAD = {  # name: (method, path, body, expected status, expected param or "any")
    "malformed json": ("POST", "/v1/completions", b'{"model": "stories260K", "prompt": ', 400, None),
    "json array": ("POST", "/v1/completions", b'[{"model": "stories260K"}]', 400, None),
    "json string": ("POST", "/v1/chat/completions", b'"hello"', 400, None),
    "unknown model": ("POST", "/v1/completions", {**OK_BODY, "model": "gpt-4"}, 404, "model"),
    "unknown model chat": ("POST", "/v1/chat/completions", {**CHAT_BODY, "model": "gpt-4"}, 404, "model"),
    "unknown model embeddings": ("POST", "/v1/embeddings", {"model": "gpt-4", "input": "x"}, 404, "model"),
    "model missing": ("POST", "/v1/completions", {"prompt": PROMPT}, 400, "model"),
    "temperature hot": ("POST", "/v1/completions", {**OK_BODY, "temperature": "hot"}, 400, "temperature"),
    "temperature 3": ("POST", "/v1/chat/completions", {**CHAT_BODY, "temperature": 3}, 400, "temperature"),
    "n string": ("POST", "/v1/completions", {**OK_BODY, "n": "2"}, 400, "n"),
    "n zero": ("POST", "/v1/chat/completions", {**CHAT_BODY, "n": 0}, 400, "n"),
    "stop number": ("POST", "/v1/completions", {**OK_BODY, "stop": 5}, 400, "stop"),
    "stop empty string": ("POST", "/v1/completions", {**OK_BODY, "stop": [""]}, 400, "stop"),
    "stream string": ("POST", "/v1/completions", {**OK_BODY, "stream": "yes"}, 400, "stream"),
    "messages not a list": ("POST", "/v1/chat/completions", {**CHAT_BODY, "messages": "Hi"}, 400, "messages"),
    "messages empty": ("POST", "/v1/chat/completions", {**CHAT_BODY, "messages": []}, 400, "messages"),
    "message not an object": ("POST", "/v1/chat/completions", {**CHAT_BODY, "messages": [5]}, 400, "messages"),
    "message without content": ("POST", "/v1/chat/completions", {**CHAT_BODY, "messages": [{"role": "user"}]},
                                400, "messages"),
    "message with an unknown role": ("POST", "/v1/chat/completions",
                                     {**CHAT_BODY, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages"),
    "prompt missing": ("POST", "/v1/completions", {"model": MODEL}, 400, "prompt"),
    "prompt object": ("POST", "/v1/completions", {**OK_BODY, "prompt": {"text": "x"}}, 400, "prompt"),
    "prompt token out of vocabulary": ("POST", "/v1/completions", {**OK_BODY, "prompt": [1, 512]}, 400, "prompt"),
    "max_tokens 0": ("POST", "/v1/completions", {**OK_BODY, "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens negative": ("POST", "/v1/completions", {**OK_BODY, "max_tokens": -3}, 400, "max_tokens"),
    "max_tokens float": ("POST", "/v1/completions", {**OK_BODY, "max_tokens": 4.0}, 400, "max_tokens"),
    "max_tokens beyond context": ("POST", "/v1/completions", {**OK_BODY, "max_tokens": 600}, 400, "max_tokens"),
    "max_tokens + prompt beyond context": ("POST", "/v1/completions", {**OK_BODY, "max_tokens": 508}, 400,
                                           "max_tokens"),
    "chat max_tokens 0": ("POST", "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 0}, 400, "max_tokens"),
    "chat max_tokens = context": ("POST", "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 512}, 400,
                                  "max_tokens"),
    "chat max_tokens leaves no room": ("POST", "/v1/chat/completions", {**CHAT_BODY, "max_tokens": 505}, 400,
                                       "messages"),
    "prompt beyond context": ("POST", "/v1/completions", {**OK_BODY, "prompt": "Once upon a time " * 200}, 400,
                              "prompt"),
    "prompt ids beyond context": ("POST", "/v1/completions", {**OK_BODY, "prompt": [1] * 513}, 400, "prompt"),
    "chat message too long": ("POST", "/v1/chat/completions",
                                    {**CHAT_BODY, "messages": [{"role": "user", "content": "cat " * 600}]}, 400,
                                    "messages"),
    "embedding beyond context": ("POST", "/v1/embeddings", {"model": MODEL, "input": "cat " * 600}, 400, "input"),
    "embedding empty": ("POST", "/v1/embeddings", {"model": MODEL, "input": []}, 400, "input"),
    "embedding format": ("POST", "/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "int8"},
                         400, "encoding_format"),
    "logprobs 21": ("POST", "/v1/completions", {**OK_BODY, "logprobs": 21}, 400, "logprobs"),
    "top_logprobs without logprobs": ("POST", "/v1/chat/completions", {**CHAT_BODY, "top_logprobs": 2}, 400,
                                      "top_logprobs"),
    "logit_bias token outside vocabulary": ("POST", "/v1/completions", {**OK_BODY, "logit_bias": {"9999": 1}},
                                            400, "any"),
    "seed string": ("POST", "/v1/completions", {**OK_BODY, "seed": "7"}, 400, "seed"),
    "echo (not supported)": ("POST", "/v1/completions", {**OK_BODY, "echo": True}, 400, "echo"),
    "suffix (not supported)": ("POST", "/v1/completions", {**OK_BODY, "suffix": "end"}, 400, "suffix"),
    "best_of above n (not supported)": ("POST", "/v1/completions", {**OK_BODY, "best_of": 3}, 400, "best_of"),
    "temperature NaN": ("POST", "/v1/completions", b'{"model": "stories260K", "prompt": "x", "temperature": NaN}',
                        400, "temperature"),
    "invalid utf-8": ("POST", "/v1/completions", b'{"model": "stories260K", "prompt": "\xff\xfe\xc3("}', 400, None),
    "lone surrogate": ("POST", "/v1/completions", b'{"model": "stories260K", "prompt": "\\ud800"}', 400, None),
    "deeply nested": ("POST", "/v1/completions", b"[" * 100_000, 400, None),
    "unknown route": ("POST", "/v1/nothing", OK_BODY, 404, None),
    "unknown GET route": ("GET", "/v2/models", None, 404, None),
    "GET on a POST route": ("GET", "/v1/completions", None, 405, None),
    "POST on a GET route": ("POST", "/v1/models", OK_BODY, 405, None),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_openai_error_and_server_keeps_serving(served, lm, name):
    method, path, body, status, param = BAD[name]
    got_status, got = request(served[1], method, path, body)
    error = assert_api_error(got_status, got, status, param)
    if name.startswith("unknown model"):
        assert error["code"] == "model_not_found"
    if "beyond context" in name:
        assert error["code"] == "context_length_exceeded"
    if name == "chat message too long":
        assert "more than the context window of 512 tokens" in error["message"]
    if name == "message with an unknown role":
        assert error["message"] == "'messages[0].role': 'wizard' is not a role (system, developer, user, assistant, tool)"
    until(lambda: served[0].engine.incoming == 0, timeout=5)  # counted out (engine.arriving)
    still_serving(served[1], lm)


def test_openai_client_sees_typed_errors(client, lm):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=3)
    assert e.value.status_code == 404 and "gpt-4" in e.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=600)
    assert e.value.response.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, temperature="hot")
    with pytest.raises(openai.BadRequestError):  # the error comes before the stream starts
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, stream=True)
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text == \
        lm.generate(PROMPT, temperature=0, max_new_tokens=5)


def test_errors_before_the_body_keep_the_connection_usable(served, keyed, lm):
    """A 404 / 405 / 401 answered without reading the body must not leave the body on a kept-alive
    connection, where it would be read as the next request."""
    ok = {**OK_BODY, "temperature": 0, "max_tokens": 5}
    expected = lm.generate(PROMPT, temperature=0, max_new_tokens=5)
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=30)
    assert_api_error(*request(served[1], "POST", "/v1/nothing", ok, conn=conn), 404)
    assert_api_error(*request(served[1], "GET", "/v1/chat/completions", None, conn=conn), 405)
    status, body = request(served[1], "POST", "/v1/completions", ok, conn=conn)
    assert status == 200 and body["choices"][0]["text"] == expected
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", keyed[1], timeout=30)
    for _ in range(2):
        assert_api_error(*request(keyed[1], "POST", "/v1/completions", ok, {"Authorization": "Bearer nope"},
                                  conn=conn), 401)
    status, body = request(keyed[1], "POST", "/v1/completions", ok, {"Authorization": "Bearer sekret"}, conn=conn)
    assert status == 200 and body["choices"][0]["text"] == expected
    conn.close()


def test_api_key(keyed, lm):
    port = keyed[1]
    expected = lm.generate(PROMPT, temperature=0, max_new_tokens=5)
    body = {**OK_BODY, "temperature": 0, "max_tokens": 5}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                    {"Authorization": "Bearer sekret2"}):
        error = assert_api_error(*request(port, "POST", "/v1/completions", body, headers), 401)
        assert error["code"] == "invalid_api_key"
    assert_api_error(*request(port, "GET", "/v1/models", None), 401)
    status, got = request(port, "POST", "/v1/completions", body, {"Authorization": "Bearer sekret"})
    assert status == 200 and got["choices"][0]["text"] == expected

    base = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    right = openai.OpenAI(base_url=base, api_key="sekret", max_retries=0)
    assert [m.id for m in right.models.list().data] == [MODEL]
    stream = right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_body_over_the_limit_is_413(keyed, lm):
    port = keyed[1]
    auth = {"Authorization": "Bearer sekret"}
    big = {**OK_BODY, "prompt": "cat " * 1000}  # about 4 KB > 2048
    error = assert_api_error(*request(port, "POST", "/v1/completions", big, auth), 413)
    assert "2048" in error["message"]
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sekret", max_retries=0).completions.create(
            model=MODEL, prompt="cat " * 1000, max_tokens=3)
    assert e.value.status_code == 413
    # the limit is on the body, not on the prompt: a long prompt in a small body passes that check
    just_under = {**OK_BODY, "prompt": "cat " * 400}
    assert len(json.dumps(just_under)) < 2048
    status, got = request(port, "POST", "/v1/completions", just_under, auth)
    assert status == 400 and got["error"]["code"] == "context_length_exceeded"
    still_serving(port, lm, auth)


# -------------------------------------------------------- requests arriving at an idle engine
def _prefills(engine, monkeypatch) -> list[int]:
    """The sizes (rows) of the engine's prefills from now on."""
    from emergence.decode import DecodeBatch

    sizes, admit = [], DecodeBatch.admit

    def counted(batch, rows):
        if batch is engine.batch:
            sizes.append(len(rows))
        return admit(batch, rows)

    monkeypatch.setattr(DecodeBatch, "admit", counted)
    return sizes


def test_an_idle_engine_prefills_a_request_still_arriving_with_the_first(lm, monkeypatch):
    from emergence.serve.engine import BatchEngine

    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompts = [list(range(3, 12)), list(range(20, 26))]
    expected = [lm.complete(p, temperature=0, max_new_tokens=6, ignore_eos=True).token_ids for p in prompts]
    engine = BatchEngine(lm.model, lm.tokenizer, slots=4, admission_window=60.0)
    prefills = _prefills(engine, monkeypatch)
    try:
        arrived = engine.arriving()  # the HTTP layer is taking a second request in
        first = engine.submit(prompts[0], params)
        until(lambda: engine.holds == 1)
        time.sleep(0.05)  # (without the hold it would be prefilled at once: room to show it)
        assert (engine.active, engine.waiting, prefills) == (0, 1, [])  # held, not prefilled
        second = engine.submit(prompts[1], params)
        arrived()
        arrived()  # (a second call does nothing)
        assert engine.incoming == 0
        got = [[t for chunk in r for t in chunk.token_ids] for r in (first, second)]
        assert got == expected
        assert prefills == [2]  # one prefill for both
        alone = engine.submit(prompts[0], params)  # nothing arriving: no hold
        assert [t for chunk in alone for t in chunk.token_ids] == expected[0]
        assert (engine.holds, prefills) == (1, [2, 1])
    finally:
        engine.close()


def test_the_hold_ends_after_the_admission_window_and_a_busy_engine_never_holds(lm, monkeypatch):
    from emergence.serve import engine as engine_module
    from emergence.serve.engine import BatchEngine

    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    prompt = list(range(3, 12))
    expected = lm.complete(prompt, temperature=0, max_new_tokens=6, ignore_eos=True).token_ids
    wakes = []
    monkeypatch.setattr(engine_module, "wake_thread_team", lambda: wakes.append(time.monotonic()))
    engine = BatchEngine(lm.model, lm.tokenizer, slots=4, admission_window=0.2)
    prefills = _prefills(engine, monkeypatch)
    try:
        # an arrival that never completes (a client sending its body slowly): the first request
        # waits for it at most the admission window, and the team is woken only meanwhile
        slow = engine.arriving()
        started = time.monotonic()
        assert [t for chunk in engine.submit(prompt, params) for t in chunk.token_ids] == expected
        assert engine.holds == 1 and prefills == [1]
        until(lambda: time.monotonic() > started + 0.5)
        woken = len(wakes)
        assert woken >= 1 and max(wakes) < started + 0.2 + 0.1  # none once the window is over
        # busy: a long request decoding; a new one joins it at the next step, arrivals or not
        slow()
        engine.admission_window = 60.0
        long = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=400, ignore_eos=True))
        next(iter(long))
        engine.arriving()
        assert [t for chunk in engine.submit(prompt, params) for t in chunk.token_ids] == expected
        assert engine.holds == 1 and len(wakes) == woken
        long.cancel()
    finally:
        engine.close()


def test_every_request_the_http_layer_takes_in_is_counted_out(served, lm):
    # Guard counts each POST in (BatchEngine.arriving) and out when it is submitted or ends: the
    # good, the bad (validation, unknown model, bad JSON) and the streamed alike.
    app, port = served
    for body, expected in (({"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, 200),
                           ({"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True}, 200),
                           ({"model": MODEL, "prompt": PROMPT, "max_tokens": -1}, 400),
                           ({"model": "nope", "prompt": PROMPT}, 404),
                           ({"model": MODEL, "messages": "not a list"}, 400)):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, _ = request(port, "POST", path, body)
        assert status == expected, body
    status, _ = request(port, "POST", "/v1/completions", b"{not json")
    assert status == 400
    status, _ = request(port, "POST", "/v1/embeddings", {"model": MODEL, "input": PROMPT})
    assert status == 200
    until(lambda: app.engine.incoming == 0, timeout=5)
    still_serving(port, lm)


def test_client_gone_mid_stream_frees_its_slot(served, lm):
    app, port = served
    prompt = "Tom and Lily"
    full = lm.complete(prompt, temperature=0, max_new_tokens=400)
    assert full.finish_reason == "length"  # uninterrupted, it would run all 400 steps
    steps_before = app.engine.steps
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 400, "temperature": 0,
                       "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    received = b""
    while b"data: " not in received or b"\n\n" not in received.split(b"data: ", 1)[1]:  # the first event
        chunk = sock.recv(4096)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    first = json.loads(received.split(b"data: ", 1)[1].split(b"\n\n", 1)[0])
    assert full.text.startswith(first["choices"][0]["text"])
    sock.close()
    until(lambda: app.engine.active == 0, timeout=2.0)
    assert app.engine.steps - steps_before < 200  # stopped early, not run to its 400 tokens
    still_serving(port, lm)


def test_a_body_shorter_than_announced_gets_408_and_frees_the_thread(served, lm, monkeypatch):
    app, port = served
    monkeypatch.setattr(app, "body_timeout", 0.5)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")  # 11 of the 100 bytes, then silence
        started, received = time.monotonic(), b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        assert time.monotonic() - started < 5
    finally:
        sock.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), received
    error = json.loads(body)["error"]
    assert "100 bytes announced" in error["message"] and "0.5 s" in error["message"]
    still_serving(port, lm)


def test_a_client_gone_before_its_error_reply_leaves_no_traceback(served, lm, capfd):
    # It announces 500 bytes, sends 12 and disconnects: the 400 has nowhere to go. The server
    # drops it quietly (a traceback used to be printed) and keeps serving.
    port = served[1]
    capfd.readouterr()
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\": 1}")
        sock.shutdown(socket.SHUT_WR)
        sock.close()
    time.sleep(0.5)  # the handler threads answer after the client left
    still_serving(port, lm)
    _, err = capfd.readouterr()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_binds_localhost_by_default(served):
    app = served[0]
    background, thread = serve_in_thread(app)
    try:
        assert background.server_address[0] == "127.0.0.1"
    finally:
        background.shutdown()
        background.server_close()
        thread.join(timeout=5)
