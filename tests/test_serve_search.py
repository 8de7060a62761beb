"""The server's `search` field (issue 19): a chat completion answered by test-time search.

The served model is the shipped stories260K, the verifier a tiny random reward model saved in
a folder and loaded the way `emergence serve --verifier NAME=DIR` loads it. Every expected
value comes from calling the strategy directly in Python (emergence.search) with the same
seed and settings, never from the server itself."""

from __future__ import annotations

import http.client
import json

import openai
import pytest
import torch

from conftest import in_threads
from emergence.align.reward import RewardModel, save_reward_model
from emergence.cli import main
from emergence.config import Config
from emergence.model import Transformer
from emergence.search import LocalPolicy, SearchConfig, load_verifier
from emergence.search.run import solve_problem
from emergence.search.strategies import beam_search, best_of_n, majority, self_correct
from emergence.serve.app import app_for, serve_in_thread

MODEL = "stories260K"
Q = "A car drives 50 miles per hour for 3 hours. How far does it travel?"
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    from emergence.api import load

    lm = load(MODEL, device="cpu")
    config = Config(**{**lm.config.__dict__, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2,
                       "head_dim": 16, "intermediate_size": 64})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("serve-search") / "prm"
    save_reward_model(RewardModel(Transformer(config), pad_token_id=0).eval(), folder)
    lm.tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def served(prm_dir):
    """(app, port): the shipped model with the verifiers "default" (a PRM) and "orm" loaded at start."""
    app = app_for(None, slots=4, device="cpu", verifiers={"default": str(prm_dir), "orm": str(prm_dir)},
                  verifier_kind="prm")
    app.verifiers["orm"].kind = "orm"
    server, thread = serve_in_thread(app)
    yield app, server.server_address[1]
    server.shutdown()
    thread.join(timeout=5)
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[1]}/v1", api_key="x", max_retries=0, timeout=120)


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def chat(search: dict, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": Q}], "search": search, **SAMPLING, **fields}


def direct(app, strategy, fn, verifier, cfg: SearchConfig, seed: int):
    """The strategy called in Python: its outcome, and run.py's record of what it cost."""
    out = fn(Q, LocalPolicy(app.lm, seed=seed), verifier, cfg)
    record = solve_problem({"question": Q, "answer": None}, strategy, LocalPolicy(app.lm, seed=seed), verifier, cfg)
    assert record["text"] == out.text  # the same seed: the same samples
    return out, record


def test_best_of_n_equals_the_strategy_called_directly(served, client, prm_dir):
    app, _ = served
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": Q}], seed=7,
                                           extra_body={"search": {"strategy": "best_of_n", "n": 4,
                                                                  "verifier": "default"}}, **SAMPLING)
    verifier = load_verifier(str(prm_dir), kind="prm", device="cpu")
    out, record = direct(app, "best_of_n", best_of_n, verifier, SearchConfig(n=4, **SAMPLING), seed=7)
    assert len(out.candidates) == 4 and len({c.text for c in out.candidates}) > 1  # a real choice was made
    assert reply.choices[0].message.content == out.text and reply.choices[0].finish_reason == "stop"
    search = reply.model_extra["search"]
    assert search["answer"] == out.answer and search["strategy"] == "best_of_n" and search["n"] == 4
    assert search["verifier"] == "default" and search["seed"] == 7 and search["candidates"] == 4
    # usage: the prompt prefilled once, every token of every candidate
    assert reply.usage.completion_tokens == sum(c.tokens for c in out.candidates) == record["generated_tokens"]
    assert reply.usage.prompt_tokens == record["prompt_tokens"] > 0
    for key in ("verifier_tokens", "policy_flops", "verifier_flops", "flops"):
        assert search[key] == record[key], key
    assert search["flops"] == search["policy_flops"] + search["verifier_flops"] > 0
    # the same seed again: the same answer; an ORM verifier is another verifier
    again = post(served[1], "/v1/chat/completions", chat({"strategy": "best_of_n", "n": 4, "verifier": "default"},
                                                         seed=7))[1]
    assert again["choices"][0]["message"]["content"] == out.text
    orm = post(served[1], "/v1/chat/completions", chat({"strategy": "best_of_n", "n": 4, "verifier": "orm"},
                                                       seed=7))[1]
    want = best_of_n(Q, LocalPolicy(app.lm, seed=7), load_verifier(str(prm_dir), kind="orm", device="cpu"),
                     SearchConfig(n=4, **SAMPLING))
    assert orm["choices"][0]["message"]["content"] == want.text and orm["search"]["answer"] == want.answer


def test_majority_needs_no_verifier(served):
    app, port = served
    status, body = post(port, "/v1/chat/completions", chat({"strategy": "majority", "n": 5}, seed=3))
    assert status == 200, body
    out, record = direct(app, "majority", majority, None, SearchConfig(n=5, **SAMPLING), seed=3)
    assert body["choices"][0]["message"]["content"] == out.text
    assert body["search"]["answer"] == out.answer and body["search"]["verifier"] is None
    assert body["search"]["verifier_tokens"] == 0 and body["search"]["verifier_flops"] == 0
    assert body["usage"]["completion_tokens"] == record["generated_tokens"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL


def test_beam_search_equals_the_strategy_called_directly(served, prm_dir):
    app, port = served
    spec = {"strategy": "beam_search", "n": 4, "beam_width": 2, "verifier": "default", "step_tokens": 8,
            "max_steps": 3}
    status, body = post(port, "/v1/chat/completions", chat(spec, seed=11))
    assert status == 200, body
    cfg = SearchConfig(n=4, width=2, step_tokens=8, max_steps=3, **SAMPLING)
    out, record = direct(app, "beam_search", beam_search, load_verifier(str(prm_dir), device="cpu"), cfg, seed=11)
    assert body["choices"][0]["message"]["content"] == out.text and body["search"]["answer"] == out.answer
    assert body["search"]["beam_width"] == 2 and body["search"]["rounds"] == record["rounds"]
    assert body["usage"]["completion_tokens"] == record["generated_tokens"]


def test_self_correct_equals_the_strategy_called_directly(served, prm_dir):
    app, port = served
    status, body = post(port, "/v1/chat/completions",
                        chat({"strategy": "self_correct", "verifier": "default", "budget": 2, "threshold": 0.6},
                             seed=5))
    assert status == 200, body
    cfg = SearchConfig(budget=2, threshold=0.6, **SAMPLING)
    out, record = direct(app, "self_correct", self_correct, load_verifier(str(prm_dir), device="cpu"), cfg, seed=5)
    assert body["choices"][0]["message"]["content"] == out.text and body["search"]["answer"] == out.answer
    assert body["usage"]["completion_tokens"] == record["generated_tokens"] > 0


@pytest.mark.parametrize("body, param, message", [
    (chat({"strategy": "nope", "n": 4}), "search", "'search.strategy': unknown search strategy 'nope' (use majority"),
    (chat({"strategy": "compute_optimal"}), "search", "compute_optimal is not served"),
    (chat({"strategy": "best_of_n", "n": 4}), "search",
     "'search': best_of_n needs a verifier: name one the server loaded in 'search.verifier'"),
    (chat({"strategy": "best_of_n", "verifier": "/etc/passwd"}), "search",
     "'search.verifier': no verifier '/etc/passwd'; this server loaded 'default', 'orm'"),
    (chat({"strategy": "majority", "n": 0}), "search", "'search.n': Input should be greater than or equal to 1"),
    (chat({"strategy": "majority", "n": 100000}), "search", "'search.n': Input should be less than or equal to 64"),
    (chat({"strategy": "majority", "n": "4"}), "search", "'search.n': Input should be a valid integer"),
    (chat({"strategy": "beam_search", "n": 6, "beam_width": 4, "verifier": "default"}), "search",
     "beam_search needs 'n' (6) to be a multiple of 'beam_width' (4)"),
    (chat({"strategy": "majority", "beams": 2}), "search", "'search.beams': Extra inputs are not permitted"),
    (chat({"strategy": "self_correct", "verifier": "default", "threshold": 2}), "search",
     "'search.threshold': Input should be less than or equal to 1"),
    (chat({"strategy": "majority"}, stream=True), "stream", "'search' does not stream"),
    (chat({"strategy": "majority"}, n=2), "n", "'n' must be 1 with 'search'"),
    (chat({"strategy": "majority"}, stop=["\n"]), "stop", "'stop' does not combine with 'search'"),
    (chat({"strategy": "majority"}, logprobs=True), "logprobs", "'logprobs' does not combine with 'search'"),
    (chat({"strategy": "majority"}, max_tokens=100000), "messages", "exceeds the context"),
    ({**chat({"strategy": "majority"}), "messages": [{"role": "user", "content": Q},
                                                      {"role": "assistant", "content": "Step 1:"}]},
     "messages", "the last message, which must be the user's question"),
    ({"model": MODEL, "prompt": Q, "search": {"strategy": "majority"}}, "search",
     "test-time search is served on /v1/chat/completions"),
])
def test_bad_search_requests_get_one_clear_400(served, body, param, message):
    port = served[1]
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    status, answer = post(port, path, body)
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert message in error["message"], error["message"]


def test_searches_and_plain_requests_at_once_each_get_their_own_answer(served, prm_dir):
    """A search runs whole in the engine's thread between two steps: plain requests decoded
    meanwhile still equal their single-user output, and every slot and KV block comes back."""
    app, port = served
    verifier = load_verifier(str(prm_dir), device="cpu")
    want = {seed: best_of_n(Q, LocalPolicy(app.lm, seed=seed), verifier, SearchConfig(n=4, **SAMPLING)).text
            for seed in (21, 22)}
    plain = app.lm.complete("Once upon a time", temperature=0, max_new_tokens=32)
    got: dict = {}

    def work(k: int) -> None:
        if k < 2:
            status, body = post(port, "/v1/chat/completions",
                                chat({"strategy": "best_of_n", "n": 4, "verifier": "default"}, seed=21 + k))
            got[k] = body["choices"][0]["message"]["content"]
        else:
            status, body = post(port, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time",
                                                          "max_tokens": 32, "temperature": 0})
            got[k] = body["choices"][0]["text"]
        assert status == 200, body

    in_threads(work, 6)
    assert [got[0], got[1]] == [want[21], want[22]]
    assert all(got[k] == plain.text for k in range(2, 6))
    assert app.engine.active == 0 and app.engine.cache.num_used == 0 and app.engine.waiting == 0


def test_engine_call_jobs_run_in_turn_and_a_cancelled_one_is_skipped(served):
    engine = served[0].engine
    ran = []
    job = engine.submit_call(lambda: ran.append(1) or "done")
    assert job.sink.get(timeout=30) == (0, "done") and ran == [1]
    job = engine.submit_call(lambda: 1 / 0)
    tag, error = job.sink.get(timeout=30)
    assert isinstance(error, ZeroDivisionError)
    with engine._lock:  # queued while the engine waits for the lock: cancelled before its turn
        job = engine.submit_call(lambda: ran.append(2))
        job.cancel()
    assert job.sink.get(timeout=30) == (0, None) and ran == [1]


def test_openapi_lists_the_search_field(served):
    conn = http.client.HTTPConnection("127.0.0.1", served[1], timeout=30)
    conn.request("GET", "/openapi.json")
    schema = json.loads(conn.getresponse().read())
    conn.close()
    parts = schema["components"]["schemas"]
    assert "search" in parts["ChatCompletionRequest"]["properties"]
    options = parts["SearchOptions"]["properties"]
    assert {"strategy", "n", "beam_width", "verifier", "aggregation"} <= set(options)
    assert "best_of_n" in options["strategy"]["enum"] and "compute_optimal" not in options["strategy"]["enum"]
    assert options["n"]["minimum"] == 1 and options["n"]["maximum"] == 64
    assert "search" in parts["ChatCompletion"]["properties"] and "answer" in parts["SearchResult"]["properties"]
    assert "search" not in parts["CompletionRequest"]["properties"]


def test_serve_verifier_flag_bad_input(capsys):
    assert main(["serve", "--verifier", "a=x", "--verifier", "a=y"]) != 0
    assert "--verifier a is given twice" in capsys.readouterr().err
    assert main(["serve", "--verifier", "=x"]) != 0
    assert "--verifier takes NAME=DIR or DIR" in capsys.readouterr().err
