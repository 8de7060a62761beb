"""The server's HTTP layer beyond OpenAI's API: Ollama's API through the official `ollama`
client, the security checks (Host, Origin and CORS, keys from the environment or a file,
binding beyond loopback, slow clients, template time limits, a generic 500 with a request id),
and what it reports (one log line per request, /health, /metrics, /docs).

Expected values come from emergence's own generation (`lm.generate`, the chat template
rendered by `emergence.chat`), never from the server itself."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import ollama
import pytest

import emergence
from conftest import until
from emergence.chat import encode_prompt, resolve_chat_template
from emergence.serve.app import Server, serve_in_thread

MODEL = "stories260K"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def lm():
    return emergence.load()


@pytest.fixture(scope="module")
def served(lm):
    app = Server(lm, MODEL, slots=4, allowed_origins=("https://tools.example",))
    server, thread = serve_in_thread(app)
    yield app, server.server_address[1]
    server.shutdown()
    app.close()


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes; everything the server answers until it closes the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received
    finally:
        sock.close()


def post(port: int, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else {}


def plain_chat_ids(lm, messages) -> list[int]:
    template = resolve_chat_template(None, missing="plain")
    return encode_prompt(lm.tokenizer, template.render(messages, add_generation_prompt=True))


# ---------------------------------------------------------------------------- Ollama's API
def test_ollama_client_generates_chats_lists_and_shows(served, lm):
    app, port = served
    client = ollama.Client(host=f"http://127.0.0.1:{port}")
    expected = lm.complete(PROMPT, temperature=0, max_new_tokens=12)
    # a base model: the prompt continued as text (Ollama's {{ .Prompt }})
    reply = client.generate(model=MODEL, prompt=PROMPT, options={"temperature": 0, "num_predict": 12})
    assert reply.response == expected.text and reply.done and reply.done_reason == "length"
    assert reply.eval_count == 12 and reply.prompt_eval_count == len(lm.tokenizer.encode(PROMPT))
    assert list(reply.context) == lm.tokenizer.encode(PROMPT) + expected.token_ids
    assert reply.total_duration >= reply.eval_duration > 0
    parts = list(client.generate(model=MODEL, prompt=PROMPT, stream=True,
                                 options={"temperature": 0, "num_predict": 12}))
    assert "".join(p.response for p in parts) == expected.text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    # `context` continues the conversation: the same as generating from the whole text
    more = client.generate(model=MODEL, prompt=" The end.", context=reply.context,
                           options={"temperature": 0, "num_predict": 6})
    whole = reply.context + lm.tokenizer.encode(" The end.")
    assert more.response == lm.generate(whole, temperature=0, max_new_tokens=6)

    messages = [{"role": "user", "content": "Tell me a story."}]
    answer = lm.complete(plain_chat_ids(lm, messages), temperature=0, max_new_tokens=10,
                         stop=resolve_chat_template(None, missing="plain").stop)
    chat = client.chat(model=MODEL, messages=messages, options={"temperature": 0, "num_predict": 10})
    assert chat.message.role == "assistant" and chat.message.content == answer.text
    streamed = list(client.chat(model=MODEL, messages=messages, stream=True,
                                options={"temperature": 0, "num_predict": 10}))
    assert "".join(p.message.content for p in streamed) == answer.text and streamed[-1].done

    listed = client.list()
    assert [m.model for m in listed.models] == [f"{MODEL}:latest"]
    assert listed.models[0].details.parameter_size == "260.0K" and listed.models[0].details.family == "llama"
    shown = client.show(MODEL)
    assert shown.modelinfo["general.parameter_count"] == 260_032
    assert shown.modelinfo["llama.context_length"] == 512
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="llama3", prompt=PROMPT)
    assert e.value.status_code == 404 and "llama3" in e.value.error


def test_ollama_errors_are_ollamas_shape(served):
    port = served[1]
    status, _, body = post(port, "/api/generate", {"model": MODEL, "prompt": PROMPT, "options": {"temperature": -1}})
    assert status == 400 and set(body) == {"error"} and "temperature" in body["error"]
    status, _, body = post(port, "/api/chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and "role" in body["error"]
    status, _, body = post(port, "/api/generate", {"model": MODEL, "prompt": "x", "format": "xml"})
    assert status == 400 and body["error"] == "'format' must be \"json\" or a JSON schema object"
    status, _, body = post(port, "/api/generate", {"model": MODEL, "prompt": "x", "format": {"type": "strin"}})
    assert status == 400 and body["error"] == "the JSON schema cannot be compiled: Invalid type: strin"


# ---------------------------------------------------------------------------- security
def test_a_host_header_not_allowed_is_403(served, lm):
    port = served[1]
    for host in (b"evil.example", b"evil.example:8000", b"127.0.0.1.evil.example", b""):
        answer = raw(port, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403"), (host, answer[:100])
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert "--allowed-hosts" in body["error"]["message"] and body["error"]["type"] == "permission_error"
    for host in (b"127.0.0.1", b"localhost:1234", b"[::1]:99"):
        answer = raw(port, b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), host
    app = Server(lm, MODEL, slots=1, allowed_hosts=("models.lan",))
    assert app.host_allowed("models.lan:8000") and not app.host_allowed("other.lan")
    app.close()


def test_origins_are_checked_and_allowed_ones_get_cors(served):
    port = served[1]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    status, _, error = post(port, "/v1/completions", body, {"Origin": "https://evil.example"})
    assert status == 403 and "--allowed-origins" in error["error"]["message"]
    # the page's own origin, and a configured one (which gets CORS headers)
    status, headers, _ = post(port, "/v1/completions", body, {"Origin": f"http://127.0.0.1:{port}"})
    assert status == 200
    status, headers, _ = post(port, "/v1/completions", body, {"Origin": "https://tools.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://tools.example"
    preflight = raw(port, b"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://tools.example\r\n"
                          b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")
    assert preflight.startswith(b"HTTP/1.1 204") and b"access-control-allow-origin: https://tools.example" in \
        preflight.lower()


def test_slow_drip_headers_are_cut_off(lm):
    app = Server(lm, MODEL, slots=1, header_timeout=0.5)
    server, _ = serve_in_thread(app)
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        started = time.monotonic()
        closed = False
        for byte in b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 50:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:  # a reset: the server closed the socket with our bytes still unread in it
                closed = True
                break
            finally:
                sock.setblocking(True)
        sock.close()
        assert closed and time.monotonic() - started < 2.0  # closed after about 0.5 s, not served
    finally:
        server.shutdown()
        app.close()


def test_serving_beyond_loopback_needs_a_key(capsys, tmp_path, monkeypatch):
    from emergence.cli import main

    monkeypatch.delenv("EMERGENCE_API_KEY", raising=False)
    code = main(["serve", "--host", "0.0.0.0", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "needs an API key" in err and "--insecure" in err
    code = main(["serve", "--api-key-file", str(tmp_path / "missing")])
    assert code == 1 and "cannot read --api-key-file" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "empty")]) == 1
    assert "is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the key never on the command line
        main(["serve", "--api-key", "sekret"])


def test_a_key_from_the_environment_or_a_file(lm, tmp_path, monkeypatch):
    # run_server's way to the key, through app_for (the CLI reads the file or the variable)
    from emergence.cli import build_parser

    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    seen = {}
    monkeypatch.setattr("emergence.serve.app.run_server", lambda model, **kw: seen.update(kw))
    monkeypatch.setenv("EMERGENCE_API_KEY", "from-the-environment")
    from emergence.cli import cmd_serve

    cmd_serve(build_parser().parse_args(["serve"]))
    assert seen["api_key"] == "from-the-environment"
    assert seen["warmup"] is True
    cmd_serve(build_parser().parse_args(["serve", "--api-key-file", str(key_file), "--no-warmup"]))
    assert seen["api_key"] == "from-a-file" and seen["warmup"] is False


def test_a_kept_alive_connection_outlives_its_first_header_deadline(lm):
    # the deadline runs from each wait for a request's headers: an idle gap shorter than it, then
    # another request, on one connection, past the first deadline (armed at connect), is served
    app = Server(lm, MODEL, slots=1, header_timeout=0.5)
    server, _ = serve_in_thread(app)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        statuses = []
        for _ in range(4):  # at 0, 0.3, 0.6 and 0.9 s
            conn.request("GET", "/health")
            resp = conn.getresponse()
            statuses.append((resp.status, json.loads(resp.read())["status"]))
            time.sleep(0.3)
        conn.close()
        assert statuses == [(200, "ok")] * 4
    finally:
        server.shutdown()
        app.close()


def test_events_ready_together_go_out_in_one_write():
    import asyncio

    from emergence.serve.app import coalesced

    async def run() -> list[bytes]:
        queue = [b"a", b"b", b"c", b"d", b"e"]
        ready = {b"a": True, b"b": False, b"c": True, b"d": True, b"e": False}  # is another part waiting after it?
        state = {"last": None}

        async def parts():
            for part in queue:
                state["last"] = part
                yield part

        return [chunk async for chunk in coalesced(parts(), lambda: ready[state["last"]])]

    assert asyncio.run(run()) == [b"ab", b"cde"]


def test_a_slow_chat_template_is_cut_off(lm):
    # A template whose rendering grows with the conversation: past the time limit, a 400.
    from emergence.chat import ChatTemplate

    slow = ChatTemplate("{% for m in messages %}{% for i in range(99999) %}{% for j in range(99) %}"
                        "{% endfor %}{% endfor %}{{ m['content'] }}{% endfor %}", name="slow")
    app = Server(lm, MODEL, slots=1, chat_template=slow, template_timeout=0.3)
    server, _ = serve_in_thread(app)
    try:
        status, _, body = post(server.server_address[1], "/v1/chat/completions",
                               {"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 3})
        assert status == 400 and "took more than 0.3 s" in body["error"]["message"]
    finally:
        server.shutdown()
        app.close()


def test_an_engine_failure_is_a_generic_500_with_the_request_id(lm, caplog):
    app = Server(lm, MODEL, slots=1)
    server, _ = serve_in_thread(app)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals: /home/someone/weights")

    app.engine.batch.step = broken
    try:
        with caplog.at_level(logging.INFO, logger="emergence.serve"):
            status, headers, body = post(server.server_address[1], "/v1/completions",
                                         {"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
        assert status == 500 and "secret" not in json.dumps(body)
        request_id = headers["x-request-id"]
        assert body["error"]["type"] == "server_error" and request_id in body["error"]["message"]
        failures = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert request_id in failures[0].getMessage() and "secret internals" in str(failures[0].exc_info[1])
    finally:
        server.shutdown()
        app.close()


# ---------------------------------------------------------------------------- observability
def test_one_log_line_per_request(served, lm, caplog):
    port = served[1]
    with caplog.at_level(logging.INFO, logger="emergence.serve"):
        status, headers, body = post(port, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 6,
                                                               "temperature": 0})
        time.sleep(0.1)  # the line is written after the last byte is sent
    assert status == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "emergence.serve"]
    line = next(entry for entry in lines if entry["id"] == headers["x-request-id"])
    assert line["status"] == 200 and line["model"] == MODEL and line["path"] == "/v1/completions"
    assert line["prompt_tokens"] == len(lm.tokenizer.encode(PROMPT)) and line["completion_tokens"] == 6
    assert 0 < line["ttft_ms"] <= line["duration_ms"]


def test_health_metrics_and_docs(served):
    app, port = served
    for _ in range(2):
        post(port, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    post(port, "/v1/completions", {"model": "gpt-4", "prompt": PROMPT})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    assert json.loads(conn.getresponse().read()) == {"status": "ok", "model": MODEL, "active": 0, "waiting": 0}
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['emergence_requests_total{path="/v1/completions",status="404"}'] >= 1
    assert values['emergence_requests_total{path="/v1/completions",status="200"}'] >= 2
    assert values["emergence_generated_tokens_total"] >= 10
    assert values["emergence_kv_blocks_used"] == 0 and values["emergence_kv_blocks_total"] == app.engine.cache.num_blocks
    assert values["emergence_queue_depth"] == 0 and values["emergence_time_to_first_token_seconds_count"] >= 2
    conn.request("GET", "/openapi.json")
    schema = json.loads(conn.getresponse().read())
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/api/chat", "/api/generate"} <= \
        set(schema["paths"])
    request_schema = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"tools", "tool_choice", "response_format", "messages"} <= set(request_schema)
    conn.request("GET", "/docs")
    assert b"swagger" in conn.getresponse().read().lower()
    conn.close()


def test_the_warm_up_answers_every_route_and_counts_nothing(lm):
    # `emergence serve` sends each generation route a two-token request, whole and streamed,
    # before serving (through the API key when there is one); what the clients then see starts
    # from zero: no request or token counted, no KV block held or cached
    app = Server(lm, MODEL, slots=2, api_key="sekret")
    try:
        statuses = app.warm_up()
        assert statuses == {f"POST {path} {kind}": 200 for kind in ("whole", "stream")
                            for path in ("/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat")}
        engine = app.engine
        assert (engine.generated, engine.prompt_tokens, engine.cached_tokens, engine.batch.forward_seconds) == (0, 0, 0, 0)
        assert engine.cache.num_used == 0 and engine.cache.num_cached == 0
        server, _ = serve_in_thread(app)
        port = server.server_address[1]
        auth = {"Authorization": "Bearer sekret"}
        status, _, body = post(port, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3,
                                                         "temperature": 0}, auth)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics", headers=auth)
        text = conn.getresponse().read().decode()
        conn.close()
        server.shutdown()
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line and not line.startswith("#")}
        assert {k: v for k, v in values.items() if k.startswith("emergence_requests_total")} == \
            {'emergence_requests_total{path="/v1/completions",status="200"}': 1.0}
        assert values["emergence_generated_tokens_total"] == 3
        assert values["emergence_prefill_prompt_tokens_total"] == len(lm.tokenizer.encode(PROMPT))  # (BOS included)
    finally:
        app.close()


def test_a_warm_up_that_fails_reports_it_and_leaves_the_server_serving(lm, caplog):
    # a route whose first request raises (a bug) is logged with its traceback and status 0: the
    # server still starts, and its other routes were warmed up
    app = Server(lm, MODEL, slots=1)
    inner = app.app

    async def broken(scope, receive, send):
        if scope["path"] == "/api/chat":
            raise RuntimeError("a bug")
        await inner(scope, receive, send)

    app.app = broken
    try:
        with caplog.at_level(logging.ERROR, logger="emergence.serve"):
            statuses = app.warm_up()
        assert statuses["POST /api/chat whole"] == statuses["POST /api/chat stream"] == 0
        assert {k: v for k, v in statuses.items() if "/api/chat" not in k} == \
            {f"POST {p} {kind}": 200 for kind in ("whole", "stream")
             for p in ("/v1/completions", "/v1/chat/completions", "/api/generate")}
        assert sum("the warm-up request to /api/chat raised" in r.getMessage() for r in caplog.records) == 2
        assert app.engine.generated == 0
    finally:
        app.close()


def test_tools_reach_the_template_and_bad_structured_output_is_refused(lm):
    # A template that lists the tools it is given: the rendered prompt names the function.
    from emergence.chat import ChatTemplate

    listing = ChatTemplate("{% if tools %}Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
                           "{{ '\\n' }}{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                           "{{ '\\n' }}{% endfor %}assistant:", name="tools")
    app = Server(lm, MODEL, slots=1, chat_template=listing)
    server, _ = serve_in_thread(app)
    port = server.server_address[1]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "Weather?"}]
    try:
        status, _, body = post(port, "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": tools,
                                                              "max_tokens": 6, "temperature": 0})
        prompt = listing.render(messages, add_generation_prompt=True, tools=tools)
        assert prompt.startswith("Tools: get_weather\n")
        assert status == 200 and body["usage"]["prompt_tokens"] == len(encode_prompt(lm.tokenizer, prompt))
        assert body["choices"][0]["message"]["content"] == lm.generate(encode_prompt(lm.tokenizer, prompt),
                                                                       temperature=0, max_new_tokens=6)
        for bad, param in (({"tool_choice": "required"}, "tool_choice"),
                           ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
                           ({"response_format": {"type": "json_schema"}}, "response_format"),
                           ({"response_format": {"type": "json_schema", "json_schema": {
                               "name": "x", "schema": {"type": "object", "required": 3}}}}, "response_format"),
                           ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools")):
            status, _, body = post(port, "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": tools,
                                                                  **bad})
            assert status == 400 and body["error"]["param"] == param, (bad, body)
    finally:
        server.shutdown()
        app.close()


def test_embeddings_wait_in_the_engines_queue(lm):
    app = Server(lm, MODEL, slots=1, max_queue=1)
    server, _ = serve_in_thread(app)
    port = server.server_address[1]
    try:
        # one long generation holds the slot and another waits: the queue (1) is full
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 400,
                                                            "stream": True, "temperature": 0}),
                     {"Content-Type": "application/json"})
        conn.getresponse().readline()
        waiting = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        waiting.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4}),
                        {"Content-Type": "application/json"})
        until(lambda: app.engine.waiting >= 1, timeout=5)
        status, _, body = post(port, "/v1/embeddings", {"model": MODEL, "input": PROMPT})
        assert status == 429 and "busy" in body["error"]["message"]
        conn.close()
        assert waiting.getresponse().status == 200
        waiting.close()
        status, _, body = post(port, "/v1/embeddings", {"model": MODEL, "input": PROMPT})
        assert status == 200 and len(body["data"][0]["embedding"]) == 64
    finally:
        server.shutdown()
        app.close()


def test_the_soak_script_at_smoke_size(tmp_path):
    # bench/soak_serve.py for 8 seconds with 8 clients, after 6 of warm-up (memory then grows with the
    # allocator's pools, not a leak): every check holds, every kind of request ran.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(root / "bench" / "soak_serve.py"), "--clients", "8", "--seconds", "8", "--warmup", "6",
                           "--slots", "4", "--model", "stories260K", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert all(result["checks"].values()) and result["server_5xx"] == 0 and result["failures"] == []
    assert all(n > 0 for n in result["counts"].values()), result["counts"]
    assert result["generated_tokens"] > 0
