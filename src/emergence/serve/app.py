"""`emergence serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    GET  /                          a chat page: streamed replies, each token's top alternatives
    GET  /v1/models                 the served model
    POST /v1/completions            prompt -> text (stream, n, stop, seed, logprobs, penalties...)
    POST /v1/chat/completions       messages -> chat template -> text (same options; top_logprobs)
    POST /v1/embeddings             text -> mean of the final hidden states

Standard library only (`ThreadingHTTPServer`): a thread per connection, each waiting on its
own requests while the engine's single thread decodes every active request together.
Streams are server-sent events ("data: {...}" lines, then "data: [DONE]"). A client that goes
away mid-stream is noticed at the next write and its slot is freed at the next step.
Every bad request gets a 4xx in OpenAI's error shape and the server keeps serving.
"""

from __future__ import annotations

import base64
import hmac
import json
import queue
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ..api import LanguageModel
from ..chat import ChatTemplate, find_model_template, fit_context, resolve_chat_template
from ..errors import EmergenceError
from ..generate import prepare_prompt
from .engine import BatchEngine, Request
from .schema import (ApiError, chat_logprobs, completion_logprobs, new_id, now, parse_sampling, usage)

PAGE = Path(__file__).with_name("page.html")  # the chat page served at /
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
DEFAULT_CHAT_RESERVE = 256  # tokens kept free for a chat reply when max_tokens is not given
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # OpenAI's message roles


class Server:
    """The routes, independent of the HTTP plumbing (the tests call them through HTTP anyway)."""

    def __init__(self, lm: LanguageModel, name: str, *, slots: int = 8, max_queue: int = 256,
                 api_key: str | None = None, max_body_bytes: int = 1 << 20, context_policy: str = "drop-oldest",
                 chat_template: ChatTemplate | None = None, defaults: dict | None = None,
                 system: str | None = None, context: int | None = None, kv_memory: int | None = None) -> None:
        """defaults: request fields (OpenAI names) used when a request leaves them out, e.g. a
        store model's PARAMETERs; system: a system message for chats that bring none; context:
        the longest sequence a request may have (default: the model's window); kv_memory: the
        KV cache's budget in bytes (default: every slot can hold a full context)."""
        self.lm, self.name, self.api_key = lm, name, api_key
        self.defaults, self.system = dict(defaults or {}), system
        self.max_body_bytes, self.context_policy = max_body_bytes, context_policy
        self.engine = BatchEngine(lm.model, lm.tokenizer, slots=slots, max_queue=max_queue, context=context,
                                  kv_memory=kv_memory, backend=lm.backend)
        self.context = self.engine.context
        self.template = chat_template or resolve_chat_template(None, missing="plain")
        self.created = now()

    def close(self) -> None:
        self.engine.close()

    # ---------------------------------------------------------------------------- routes
    def models(self) -> dict:
        return {"object": "list", "data": [self._model_card()]}

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "emergence"}

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required and must be a string", "model")
        if model != self.name and model != f"{self.name}:latest":  # Ollama's default tag
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")

    def completions(self, body: dict) -> tuple[dict | None, Iterator[dict] | None]:
        self._check_model(body)
        body = {**self.defaults, **body}
        sampling = parse_sampling(body, chat=False, default_max_tokens=DEFAULT_COMPLETION_TOKENS)
        prompts = self._prompts(body.get("prompt"))
        jobs = []
        for p, ids in enumerate(prompts):
            for j in range(sampling.n):
                params = sampling.for_prompt(len(ids), self.context, j, "prompt")
                jobs.append((p * sampling.n + j, ids, params))
        cid, created = new_id("cmpl"), now()
        requests = self._submit(jobs)
        prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt counted once, whatever n

        def chunk_body(index: int, text: str, logprobs, finish: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": self.name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        if sampling.stream:
            def events() -> Iterator[dict]:
                generated, offsets = 0, {}
                for index, chunk in _merged(requests):
                    generated += len(chunk.token_ids)
                    logprobs = None
                    if sampling.logprobs is not None:
                        logprobs = completion_logprobs(self.lm.tokenizer, chunk.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(chunk.text)
                    if chunk.text or chunk.finish_reason or chunk.token_ids:
                        yield chunk_body(index, chunk.text, logprobs, chunk.finish_reason)
                if sampling.include_usage:
                    yield {"id": cid, "object": "text_completion", "created": created, "model": self.name,
                           "choices": [], "usage": usage(prompt_tokens, generated)}
            return None, events()

        results = _collect(requests)
        choices, generated = [], 0
        for index, (text, items, finish, n_tokens) in sorted(results.items()):
            generated += n_tokens
            logprobs = completion_logprobs(self.lm.tokenizer, items) if sampling.logprobs is not None else None
            choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        return {"id": cid, "object": "text_completion", "created": created, "model": self.name,
                "choices": choices, "usage": usage(prompt_tokens, generated)}, None

    def chat_completions(self, body: dict) -> tuple[dict | None, Iterator[dict] | None]:
        self._check_model(body)
        body = {**self.defaults, **body}
        sampling = parse_sampling(body, chat=True, default_max_tokens=None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") not in CHAT_ROLES:
                raise ApiError(400, f"messages[{i}] has role {m.get('role')!r}; the roles are "
                                    f"{', '.join(CHAT_ROLES)}", "messages")
        if self.system is not None and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        reserve = sampling.max_tokens or min(DEFAULT_CHAT_RESERVE, self.context // 4)
        if reserve >= self.context:
            raise ApiError(400, f"max_tokens {reserve} leaves no room for a prompt in the context of {self.context}",
                           "max_tokens", "context_length_exceeded")
        try:
            fit = fit_context(messages, self.lm.tokenizer, self.template, context_window=self.context,
                              reserve=reserve, policy=self.context_policy)
        except EmergenceError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = fit.token_ids
        if self.template.stop:
            sampling.params["stop"] = tuple(dict.fromkeys((*sampling.params["stop"], *self.template.stop)))
        jobs = [(j, ids, sampling.for_prompt(len(ids), self.context, j, "messages")) for j in range(sampling.n)]
        cid, created = new_id("chatcmpl"), now()
        requests = self._submit(jobs)
        context_note = ({"dropped_messages": list(fit.dropped), "note": fit.note, "policy": fit.policy}
                        if fit.dropped else None)

        def frame(choices: list, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": choices, **extra}

        if sampling.stream:
            def events() -> Iterator[dict]:
                generated = 0
                first = [frame([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for j in range(sampling.n)]
                if context_note:
                    first[0]["context"] = context_note
                yield from first
                for index, chunk in _merged(requests):
                    generated += len(chunk.token_ids)
                    logprobs = (chat_logprobs(self.lm.tokenizer, chunk.logprobs)
                                if sampling.logprobs is not None and chunk.logprobs else None)
                    delta = {"content": chunk.text} if chunk.text else {}
                    if delta or chunk.finish_reason or logprobs:
                        yield frame([{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": chunk.finish_reason}])
                if sampling.include_usage:
                    yield frame([], usage=usage(len(ids), generated))
            return None, events()

        results = _collect(requests)
        choices, generated = [], 0
        for index, (text, items, finish, n_tokens) in sorted(results.items()):
            generated += n_tokens
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": chat_logprobs(self.lm.tokenizer, items) if sampling.logprobs is not None
                            else None, "finish_reason": finish})
        out = {"id": cid, "object": "chat.completion", "created": created, "model": self.name,
               "choices": choices, "usage": usage(len(ids), generated)}
        if context_note:
            out["context"] = context_note
        return out, None

    def embeddings(self, body: dict) -> dict:
        self._check_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or len(inputs) > 256:
            raise ApiError(400, "'input' must be a string, a list of strings or token-id lists (1 to 256)", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
        data, total = [], 0
        for index, item in enumerate(inputs):
            ids = self._ids(item, "input")
            if not ids:
                raise ApiError(400, f"input {index} is empty", "input")
            if len(ids) > self.context:
                raise ApiError(400, f"input {index} has {len(ids)} tokens; the context is {self.context}", "input",
                               "context_length_exceeded")
            total += len(ids)
            model = self.lm.model
            with torch.inference_mode():
                hidden = model.hidden_states(torch.tensor([ids], device=model.tok_embeddings.weight.device))
            vector = hidden[0].float().mean(dim=0).cpu()  # (D,): mean over the tokens
            embedding = (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector.tolist())).decode()
                         if fmt == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {"object": "list", "data": data, "model": self.name,
                "usage": {"prompt_tokens": total, "total_tokens": total}}

    # --------------------------------------------------------------------------- helpers
    def _ids(self, item, param: str) -> list[int]:
        if isinstance(item, str):
            return self.lm.tokenizer.encode(item)
        if isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if any(t < 0 or t >= self.lm.tokenizer.vocab_size for t in item):
                raise ApiError(400, f"token ids in '{param}' must be in [0, {self.lm.tokenizer.vocab_size})", param)
            return list(item)
        raise ApiError(400, f"'{param}' must be a string or a list of token ids", param)

    def _prompts(self, prompt) -> list[list[int]]:
        if prompt is None:
            raise ApiError(400, "'prompt' is required", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            items = prompt
        else:
            items = [prompt]
        if len(items) > 16:
            raise ApiError(400, "at most 16 prompts per request", "prompt")
        out = []
        for item in items:
            ids = self._ids(item, "prompt")
            if len(ids) >= self.context:  # as for_prompt says it, with OpenAI's code
                raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context is {self.context}",
                               "prompt", "context_length_exceeded")
            try:  # an empty prompt starts from BOS (or after EOS), as `emergence generate` does
                ids = prepare_prompt(self.lm.tokenizer, ids, self.context + 1, 0)
            except EmergenceError as e:
                raise ApiError(400, str(e), "prompt") from None
            out.append(ids)
        return out

    def _submit(self, jobs) -> list[tuple[int, Request]]:
        """Queue (choice index, prompt ids, params) jobs; the choices of one prompt (consecutive
        jobs with the same ids) go together, sharing its prefill and KV blocks."""
        sink: queue.SimpleQueue = queue.SimpleQueue()  # C-level: cheaper per token than Queue
        groups: list[list] = []
        for job in jobs:
            if groups and groups[-1][0][1] is job[1]:
                groups[-1].append(job)
            else:
                groups.append([job])
        submitted = []
        try:
            for group in groups:
                indices = [index for index, _, _ in group]
                requests = self.engine.submit_choices(group[0][1], [params for _, _, params in group], sink=sink,
                                                      tags=indices)
                submitted += zip(indices, requests)
        except EmergenceError as e:
            for _, r in submitted:
                r.cancel()
            raise ApiError(429 if "busy" in str(e) else 400, str(e)) from None
        return submitted


def _merged(requests: list[tuple[int, Request]]):
    """(choice index, chunk) from all of a response's requests, as they come."""
    if not requests:
        return
    sink = requests[0][1].sink
    open_ = len(requests)
    try:
        while open_:
            tag, item = sink.get()
            if item is None:
                open_ -= 1
                continue
            if isinstance(item, BaseException):
                raise ApiError(500, f"generation failed: {item}")
            yield tag, item
    finally:  # the client left (GeneratorExit) or an error: free the slots
        for _, r in requests:
            r.cancel()


def _collect(requests) -> dict[int, tuple[str, list, str, int]]:
    texts: dict[int, list] = {index: ["", [], "length", 0] for index, _ in requests}
    for index, chunk in _merged(requests):
        entry = texts[index]
        entry[0] += chunk.text
        entry[1] += chunk.logprobs
        entry[3] += len(chunk.token_ids)
        if chunk.finish_reason:
            entry[2] = chunk.finish_reason
    return {k: tuple(v) for k, v in texts.items()}


# ------------------------------------------------------------------------------ HTTP
class _Handler(BaseHTTPRequestHandler):
    server_version = "emergence"
    protocol_version = "HTTP/1.1"
    app: Server  # set on the subclass made by make_http_server
    # Seconds any one socket read or write may wait: a client that announces more body than it
    # sends gets a 408, an idle kept-alive connection or a client that stops reading its stream
    # is closed, instead of holding a thread forever. (Waiting for tokens is not a socket wait.)
    timeout = 60

    def log_message(self, format, *args) -> None:  # quiet: one line per request is too much for tests
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        try:
            path = self.path.partition("?")[0]
            path = path.rstrip("/")
            if method == "GET" and path == "":  # the chat page: static, no key needed (it asks for one)
                return self._page()
            self._authorize()
            if method == "GET" and path == "/v1/models":
                return self._json(200, self.app.models())
            routes = {"/v1/completions": self.app.completions, "/v1/chat/completions": self.app.chat_completions,
                      "/v1/embeddings": self.app.embeddings}
            if path not in routes:
                raise ApiError(404, f"no route {method} {path}")
            if method != "POST":
                raise ApiError(405, f"{path} takes POST")
            body = self._body()
            result = routes[path](body)
            if isinstance(result, dict):
                return self._json(200, result)
            whole, events = result
            if events is None:
                return self._json(200, whole)
            self._stream(events)
        except ApiError as e:
            self._error(e)
        except EmergenceError as e:
            self._error(ApiError(400, str(e)))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, e: ApiError) -> None:
        """Answer with an error; a client that already went away (it announced a body it never
        sent, say) gets nothing, and the connection is closed."""
        try:
            if not self._body_read:
                self._skip_body()
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def _authorize(self) -> None:
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411 if length is None else 400, "a JSON body with a Content-Length is required")
        if int(length) > self.app.max_body_bytes:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"the request body is {length} bytes; the limit is {self.app.max_body_bytes}")
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:
            self._body_read, self.close_connection = True, True  # what is left of the body never came
            raise ApiError(408, f"the request body ({length} bytes announced) did not arrive within "
                                f"{self.timeout} s") from None
        self._body_read = True
        if len(raw) < int(length):
            self.close_connection = True
            raise ApiError(400, f"the request body ended after {len(raw)} of the {length} bytes announced")
        try:
            body = json.loads(raw.decode("utf-8"))
            # "\ud800" escapes decode to lone surrogates, which are not text: the tokenizer refuses them
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not valid UTF-8") from None
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None
        except json.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _page(self) -> None:
        data = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _skip_body(self) -> None:
        """An error answered before the body was read: read the body off, so that the next request
        on this kept-alive connection starts where it should, or close the connection when the body
        is over the limit or of unknown length."""
        length = self.headers.get("Content-Length", "" if "Transfer-Encoding" in self.headers else "0")
        if length.isdigit() and int(length) <= self.app.max_body_bytes:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: Iterator[dict]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for event in events:
                self.wfile.write(b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except ApiError as e:  # failed mid-stream: the status is sent already, so say it in the stream
            self.wfile.write(b"data: " + json.dumps(e.body()).encode("utf-8") + b"\n\n")
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # frees the slots of a client that went away


def make_http_server(app: Server, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"app": app})
    server = _HTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


class _HTTPServer(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a burst of clients connecting at once overflows
    # it and some connections are reset. Many clients at once is what the server is for.
    request_queue_size = 1024


def serve_in_thread(app: Server, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Start serving in a background thread (port 0: any free port); for tests and embedding."""
    server = make_http_server(app, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def model_chat_template(path: Path, override: str | None) -> ChatTemplate:
    """The served model's own template, the override when given, or the plain transcript for
    a base model that has none."""
    return resolve_chat_template(find_model_template(Path(path)), override=override, missing="plain")


def app_for(model: str | None, *, slots: int = 8, max_queue: int = 256, api_key: str | None = None,
            context_policy: str = "drop-oldest", chat_template: str | None = None, device: str = "auto",
            dtype: str | None = None, context: int | None = None, kv_memory: int | None = None) -> Server:
    """The server's routes for a model argument (store.resolve_model). A store model's
    PARAMETERs are the request defaults, its SYSTEM the system message of chats that bring none,
    its TEMPLATE the chat template (unless one is given)."""
    from ..api import load
    from ..store import resolve_model

    source = resolve_model(model)
    lm = load(source, device=device, dtype=dtype)
    renames = {"max_new_tokens": "max_tokens"}
    defaults = {renames.get(k, k): list(v) if k == "stop" else v for k, v in source.parameters.items()
                if k != "typical_p"}
    return Server(lm, source.name, slots=slots, max_queue=max_queue, api_key=api_key, context_policy=context_policy,
                  chat_template=model_chat_template(source.path, chat_template or source.template),
                  defaults=defaults, system=source.system, context=context, kv_memory=kv_memory)


def run_server(model: str | None, *, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """`emergence serve`: load the model, serve until Ctrl-C (options: those of `app_for`)."""
    app = app_for(model, **options)
    try:
        server = make_http_server(app, host, port)
    except OSError as e:
        app.close()
        raise EmergenceError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    cache = app.engine.cache
    print(f"serving {app.name} ({app.template.name} chat template) on http://{host}:{server.server_address[1]}/v1 "
          f"with {app.engine.slots} decode slots, context {app.context}, KV cache {cache.nbytes / 2**20:.0f} MiB "
          f"({cache.num_blocks * cache.block_size:,} tokens){'; API key required' if app.api_key else ''}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.close()
