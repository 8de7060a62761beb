"""`emergence serve`: OpenAI's and Ollama's HTTP APIs over the continuous-batching engine,
on FastAPI (pydantic models of every request and response) and uvicorn.

    GET  /                          the chat page (streamed replies, each token's alternatives)
    GET  /health                    {"status": "ok", "model", "active", "waiting"}
    GET  /metrics                   Prometheus text: requests, tokens, queue, KV blocks, latency
    GET  /docs, /openapi.json       the API, from the pydantic models
    GET  /v1/models                 the served model
    POST /v1/completions            prompt -> text (stream, n, stop, seed, logprobs, penalties...)
    POST /v1/chat/completions       messages -> chat template -> text (same; tools reach the template);
                                    with `search`: the answer of a test-time search (Server.search_chat)
    POST /v1/embeddings             text -> mean of the final hidden states
    GET  /api/tags, /api/version    Ollama's API (serve/ollama.py): the same model and engine
    POST /api/show, /api/generate, /api/chat

Every request passes `Guard` first (one ASGI layer): a request id (X-Request-Id) and one JSON
log line at its end; the Host header must name an allowed host (loopback by default: a web
page cannot reach the server through DNS rebinding); a browser's Origin must be allowed (the
server's own hosts by default, or --allowed-origins, which also get CORS headers); bodies are
limited in size (413) and must arrive in time (408); uvicorn's connections must send their
headers in time (slow-drip clients are closed). The API key (when set) is checked on every API
route. An engine failure is logged with its request id and answered with a generic 500
carrying that id. Streams are server-sent events ("data: {...}", then "data: [DONE]"); a client
that goes away frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hmac
import json
import logging
import secrets
import struct
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import LanguageModel
from ..chat import ChatTemplate, find_model_template, fit_context, resolve_chat_template
from ..errors import EmergenceError, InvalidArgument
from ..generate import Chunk, prepare_prompt
from .engine import BatchEngine, CallJob, Request
from .metrics import Metrics
from .schema import (
    ApiError, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, EmbeddingList,
    EmbeddingRequest, ErrorResponse, ModelList, NamedToolChoice, chat_logprobs, completion_logprobs, new_id, now, sampling,
    usage, validation_error,
)
from ..search.policy import LocalPolicy
from ..search.prompt import format_prompt
from ..search.strategies import SearchConfig

PAGE = Path(__file__).with_name("page.html")  # the chat page served at /
DEFAULT_CHAT_RESERVE = 256  # tokens kept free for a chat reply when max_tokens is not given
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# prompts up to this many characters (or token ids) are tokenized in the event loop (a half
# millisecond at most): handing them to a worker thread and back costs more, under load
INLINE_PROMPT = 2048
DEFAULT_SEARCH_TOKENS = SearchConfig.max_tokens  # per solution, when a search request gives no max_tokens
# request fields a test-time search cannot honour (its policy samples with temperature and top_p only, and
# answers with one plain text): refused with `search`, never silently ignored
SEARCH_REFUSES = ("stop", "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p",
                  "repetition_penalty", "ignore_eos", "num_beams", "length_penalty", "early_stopping",
                  "no_repeat_ngram_size", "logprobs", "top_logprobs", "tools", "response_format")
log = logging.getLogger("emergence.serve")


# ----------------------------------------------------------------------- the engine's sink
class Courier:
    """Carries items from the engine's thread to one event loop. Every item put since the loop
    last ran is delivered in one wake-up, whatever the number of requests: one step of 16 rows
    costs the loop one wake-up, not 16, and the engine's thread is not held up handing the GIL
    back and forth with the loop between its steps."""

    _of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.lock, self.pending = loop, threading.Lock(), []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Courier:
        courier = cls._of.get(loop)
        if courier is None:
            courier = cls._of[loop] = cls(loop)
        return courier

    def put(self, queue: asyncio.Queue, items: list) -> None:
        with self.lock:
            self.pending.append((queue, items))
            if len(self.pending) > 1:  # a delivery is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server is gone, nobody waits
            pass

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, items in pending:
            for item in items:
                queue.put_nowait(item)


class AsyncSink:
    """Where the engine's thread puts a request's (tag, chunk) items, for the event loop to
    await. A held sink (a response sent whole) keeps them until a request of it ends: the loop
    is not woken at every step for text nobody reads before the end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, hold: bool = False) -> None:
        self.courier, self.queue, self.hold, self.held = Courier.of(loop), asyncio.Queue(), hold, []
        self.first_token_at: float | None = None  # perf_counter() when the engine emitted the first token

    def put(self, item) -> None:
        chunk = item[1]
        if self.first_token_at is None and getattr(chunk, "token_ids", None):
            self.first_token_at = time.perf_counter()
        if self.hold and isinstance(chunk, Chunk):
            self.held.append(item)
            return
        items, self.held = self.held + [item], []
        self.courier.put(self.queue, items)

    async def get(self):
        return await self.queue.get()

    def ready(self) -> bool:
        """Whether an item is waiting (a `get` would not wait)."""
        return not self.queue.empty()


@dataclass
class EventStream:
    """A streamed response's events, and whether more of them are ready without waiting (those
    ready together go out in one write)."""

    events: AsyncIterator[dict]
    ready: Callable[[], bool]


@dataclass
class RequestState:
    """One HTTP request as the log line and the metrics see it."""

    id: str
    method: str
    path: str
    start: float = field(default_factory=time.perf_counter)
    status: int = 0
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None  # seconds after start
    # says the engine this request has been submitted, or will not be (BatchEngine.arriving)
    arrived: Callable[[], None] = lambda: None

    def token(self, at: float | None = None) -> None:
        """A token was generated (at perf_counter() `at`, default now)."""
        if self.first_token is None:
            self.first_token = (at or time.perf_counter()) - self.start


def prompt_items(prompt) -> list:
    """A completion request's prompts: a text or a token-id list is one, a list of them several."""
    return prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]


def prompt_size(prompt) -> int:
    """A completion request's prompt(s) in characters or token ids."""
    return sum(len(item) for item in prompt_items(prompt))


def cached_tokens(requests: list[tuple[int, Request]], n: int) -> int:
    """Prompt tokens a response's prompts took from the prefix cache (each prompt once: its n
    choices, tagged p * n + j, share one prefill)."""
    return sum(r.cached_tokens or 0 for index, r in requests if index % n == 0)


class ClientGone(Exception):
    """The client of a non-streaming request disconnected while it was decoded."""


class SearchPolicy(LocalPolicy):
    """The served model as a search policy: LocalPolicy exactly (the same samples for the same
    seed), stopping at its next call once the client has gone."""

    def __init__(self, lm, *, seed: int, gone: threading.Event) -> None:
        super().__init__(lm, seed=seed)
        self.gone = gone

    def generate(self, *args, **kwargs):
        if self.gone.is_set():
            raise ClientGone()
        return super().generate(*args, **kwargs)


# ---------------------------------------------------------------------------- the routes
class Server:
    """The routes' logic over one model and its engine; `app` is the FastAPI application.

    defaults: SamplingParams fields a request leaves out (a store model's PARAMETERs); system: a
    system message for chats that bring none; context: the longest sequence a request may have
    (default: the model's window); kv_memory: the KV cache's budget in bytes (default: every
    slot can hold a full context); allowed_hosts / allowed_origins: besides the loopback names
    and the server's own origins ("*" allows any); timeouts in seconds; verifiers: name ->
    verifier (search.verifier.RewardVerifier) that chat requests with `search` may name (they
    are loaded at start: a request never names a path); prefix_caching: keep the KV blocks of
    earlier prompts for requests that start the same way (kv_cache.py); draft: a speculator
    (speculative.py) that decodes a request running alone speculatively.
    """

    def __init__(self, lm: LanguageModel, name: str, *, slots: int = 8, max_queue: int = 256,
                 api_key: str | None = None, max_body_bytes: int = 1 << 20, context_policy: str = "drop-oldest",
                 chat_template: ChatTemplate | None = None, defaults: dict | None = None,
                 system: str | None = None, context: int | None = None, kv_memory: int | None = None,
                 allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = (),
                 body_timeout: float = 60.0, header_timeout: float = 10.0, template_timeout: float = 5.0,
                 source=None, adapters: dict[str, str] | None = None, verifiers: dict | None = None,
                 prefix_caching: bool = True, draft=None) -> None:
        self.lm, self.name, self.api_key, self.source = lm, name, api_key, source
        self.verifiers = dict(verifiers or {})
        for vname, verifier in self.verifiers.items():
            from ..search.verifier import check_tokenizers

            notice = check_tokenizers(lm.tokenizer, getattr(verifier, "tokenizer", None), name, vname)
            if notice:  # scored as text re-encoded with the verifier's tokenizer, refused if not lossless
                verifier.check_roundtrip = True
                log.warning("%s", notice)
        # Served model names -> the adapter each runs through (None: the model as loaded). Every
        # adapter sits on the one base in memory; rows of a batch may each use another.
        self.served: dict[str, str | None] = {name: None, **(adapters or {})}
        self.defaults, self.system = dict(defaults or {}), system
        self.max_body_bytes, self.context_policy = max_body_bytes, context_policy
        self.allowed_hosts = {h.lower() for h in (*LOOPBACK_HOSTS, *allowed_hosts)}
        self.allowed_origins = set(allowed_origins)
        self.body_timeout, self.header_timeout, self.template_timeout = body_timeout, header_timeout, template_timeout
        self.engine = BatchEngine(lm.model, lm.tokenizer, slots=slots, max_queue=max_queue, context=context,
                                  kv_memory=kv_memory, backend=lm.backend, prefix_caching=prefix_caching,
                                  draft=draft)
        self.context = self.engine.context
        self.encoder_decoder = lm.config.is_encoder_decoder
        self.template = chat_template or resolve_chat_template(None, missing="plain")
        self.created = now()
        self.metrics = Metrics(self)
        self.app = create_app(self)

    def close(self) -> None:
        self.engine.close()

    # The warm-up's requests: each generation route whole and streamed, two tokens.
    WARM_UP = [(path, {**body, "stream": stream}) for stream in (False, True) for path, body in (
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        ("/api/generate", {"prompt": "Hi", "options": {"num_predict": 2}}),
        ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}], "options": {"num_predict": 2}}))]

    def warm_up(self) -> dict[str, int]:
        """Send each WARM_UP request through the whole app, in-process, before serving (as
        llama-server warms up at load; `emergence serve --no-warmup` skips it): a route's first
        request pays one-time costs (before the first stream, anyio imports its event-loop
        backend), which a wave of clients' time to first token would carry (measured by
        bench/bench_serve_peers.py, whose servers start warmed up and cold). The counters and
        metrics then start from zero; KV blocks the prompts filled whole (a long SYSTEM prompt)
        stay in the prefix cache, as any request's do. Returns the status of each ("POST path
        stream": status, 0 if the app raised); a refusal (a model without chat, say) is no error."""
        statuses = asyncio.run(self._warm_up())
        self.engine.reset_counters()
        self.metrics = Metrics(self)
        return statuses

    async def _warm_up(self) -> dict[str, int]:
        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
        if self.api_key is not None:
            headers.append((b"authorization", f"Bearer {self.api_key}".encode()))
        statuses = {}
        for path, body in self.WARM_UP:
            data = json.dumps({"model": self.name, **body}).encode()
            parts = [{"type": "http.request", "body": data, "more_body": False}]
            status = []

            async def receive():
                if parts:
                    return parts.pop()
                await asyncio.Event().wait()  # the client never leaves (cancelled once answered)

            async def send(message) -> None:
                if message["type"] == "http.response.start":
                    status.append(message["status"])

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                     "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
                     "headers": [*headers, (b"content-length", str(len(data)).encode())]}
            try:
                await self.app(scope, receive, send)
            except Exception:  # noqa: BLE001 - reported by the status, and serving goes on
                log.exception("the warm-up request to %s raised", path)
            statuses[f"POST {path} {'stream' if body['stream'] else 'whole'}"] = status[0] if status else 0
        return statuses

    # ------------------------------------------------------------------- security checks
    def host_allowed(self, host: str | None) -> bool:
        """A Host header (name, name:port, [v6]:port) naming an allowed host."""
        if "*" in self.allowed_hosts:
            return True
        if not host:
            return False
        host = host.strip().lower()
        if host.startswith("["):
            name = host[1:].split("]", 1)[0]
        else:
            name = host.split(":", 1)[0] if host.count(":") == 1 else host
        return name in self.allowed_hosts

    def origin_allowed(self, origin: str) -> bool:
        """A browser's Origin: one of --allowed-origins, or http(s) on an allowed host."""
        if "*" in self.allowed_origins or origin in self.allowed_origins:
            return True
        scheme, sep, rest = origin.partition("://")
        return bool(sep) and scheme in ("http", "https") and self.host_allowed(rest)

    def authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    # -------------------------------------------------------------------- OpenAI routes
    def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": self.created,
                                             "owned_by": "emergence"} for name in self.served]}

    def check_model(self, model: str) -> str | None:
        """The adapter a served model name runs through (None: the model as loaded); 404 otherwise."""
        name = model.removesuffix(":latest")  # Ollama's default tag
        if name not in self.served:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self.served)}", "model", "model_not_found")
        return self.served[name]

    async def completions(self, req: CompletionRequest, state: RequestState, http: HttpRequest):
        adapter = self.check_model(req.model)
        options = sampling(req, self.defaults)
        await self._constrain(options, req.response_format)
        prompts = await self._in_thread(self._prompts, req.prompt, inline=prompt_size(req.prompt) <= INLINE_PROMPT)
        # an encoder-decoder's decoder starts from one token, whatever the prompt's length
        jobs = [(p * options.n + j, ids, options.for_prompt(1 if self.encoder_decoder else len(ids), self.context, j,
                                                            "prompt"))
                for p, ids in enumerate(prompts) for j in range(options.n)]
        state.prompt_tokens = sum(len(ids) for ids in prompts)  # each prompt counted once, whatever n
        cid, created = new_id("cmpl"), now()
        requests, sink = self._submit(jobs, options.stream, adapter, state)
        tokenizer = self.lm.tokenizer

        if options.stream:
            async def events() -> AsyncIterator[dict]:
                offsets: dict[int, int] = {}
                async for index, chunk in self._merged(requests, sink, state):
                    logprobs = None
                    if options.logprobs is not None:
                        logprobs = completion_logprobs(tokenizer, chunk.logprobs, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(chunk.text)
                    if chunk.text or chunk.finish_reason or chunk.token_ids:
                        yield {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [{"index": index, "text": chunk.text, "logprobs": logprobs,
                                            "finish_reason": chunk.finish_reason}]}
                if options.include_usage:
                    yield {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                           "choices": [], "usage": usage(state.prompt_tokens, state.completion_tokens,
                                                         cached_tokens(requests, options.n))}
            return EventStream(events(), sink.ready)

        results = await self._collect(requests, sink, state, http)
        choices = [{"index": index, "text": text, "finish_reason": finish,
                    "logprobs": completion_logprobs(tokenizer, items) if options.logprobs is not None else None}
                   for index, (text, items, finish, _) in sorted(results.items())]
        return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(state.prompt_tokens, state.completion_tokens,
                                                   cached_tokens(requests, options.n))}

    async def chat_completions(self, req: ChatCompletionRequest, state: RequestState, http: HttpRequest):
        adapter = self.check_model(req.model)
        if req.search is not None:
            return await self.search_chat(req, state, http, adapter)
        options = sampling(req, self.defaults)
        await self._constrain(options, req.response_format)
        if req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice):
            raise ApiError(400, "a required or named tool_choice needs constrained decoding, not supported yet; "
                                "'auto' and 'none' are", "tool_choice")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for m in messages:  # content parts -> one text
            if isinstance(m.get("content"), list):
                m["content"] = "".join(part["text"] for part in m["content"])
        if self.system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system}, *messages]
        reserve = options.max_tokens or min(DEFAULT_CHAT_RESERVE, self.context // 4)
        if reserve >= self.context:
            raise ApiError(400, f"max_tokens {reserve} leaves no room for a prompt in the context of {self.context}",
                           "max_tokens", "context_length_exceeded")
        tools = None if req.tool_choice == "none" or not req.tools else [t.model_dump(exclude_none=True)
                                                                          for t in req.tools]
        fit = await self._in_thread(lambda: fit_context(messages, self.lm.tokenizer, self.template,
                                                        context_window=self.context, reserve=reserve,
                                                        policy=self.context_policy, tools=tools),
                                    param="messages", timeout=self.template_timeout)
        ids = fit.token_ids
        state.prompt_tokens = len(ids)
        if self.template.stop:
            options.params["stop"] = tuple(dict.fromkeys((*options.params["stop"], *self.template.stop)))
        jobs = [(j, ids, options.for_prompt(len(ids), self.context, j, "messages")) for j in range(options.n)]
        cid, created = new_id("chatcmpl"), now()
        requests, sink = self._submit(jobs, options.stream, adapter, state)
        context_note = ({"dropped_messages": list(fit.dropped), "note": fit.note, "policy": fit.policy}
                        if fit.dropped else None)
        tokenizer = self.lm.tokenizer

        def frame(choices: list, **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": choices, **extra}

        if options.stream:
            async def events() -> AsyncIterator[dict]:
                first = [frame([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for j in range(options.n)]
                if context_note:
                    first[0]["context"] = context_note
                for event in first:
                    yield event
                async for index, chunk in self._merged(requests, sink, state):
                    logprobs = (chat_logprobs(tokenizer, chunk.logprobs)
                                if options.logprobs is not None and chunk.logprobs else None)
                    delta = {"content": chunk.text} if chunk.text else {}
                    if delta or chunk.finish_reason or logprobs:
                        yield frame([{"index": index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": chunk.finish_reason}])
                if options.include_usage:
                    yield frame([], usage=usage(len(ids), state.completion_tokens,
                                                cached_tokens(requests, options.n)))
            return EventStream(events(), sink.ready)

        results = await self._collect(requests, sink, state, http)
        choices = [{"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                    "logprobs": chat_logprobs(tokenizer, items) if options.logprobs is not None else None}
                   for index, (text, items, finish, _) in sorted(results.items())]
        out = {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
               "choices": choices, "usage": usage(len(ids), state.completion_tokens,
                                                  cached_tokens(requests, options.n))}
        if context_note:
            out["context"] = context_note
        return out

    async def search_chat(self, req: ChatCompletionRequest, state: RequestState, http: HttpRequest,
                          adapter: str | None) -> dict:
        """A chat completion answered by test-time search (emergence.search): the strategy
        req.search names, over the served model, with the verifier it names (one the server
        loaded at start).

        The question is the last message, which must be the user's; it is put to the policy in
        the search's own prompt format (search/prompt.py: "Question: ...\nAnswer step by
        step.\n", the format search policies are trained on and every strategy builds its
        prompts from), not through the chat template; earlier messages and the system message
        are not seen. The reply is the chosen solution's text; `usage` counts the tokens the
        policy prefilled and every token it generated; `search` (SearchResult) has the chosen
        answer, the tokens the verifier read and the FLOPs. A stream is refused: the answer is
        known only once every candidate is written.

        Where it runs: a LocalPolicy over the served weights (the same samples as
        `emergence search` or a direct strategy call with the same seed), run whole as a job
        of the engine's thread between two steps of the batch (engine.submit_call), as a beam
        search is. Not inside the continuous batch: a strategy calls its policy synchronously,
        round after round, and LocalPolicy decodes each call in a DecodeBatch of its own over a
        KV cache sized for its N rows. Not in a thread of its own beside the engine: the model
        would be run by two threads at once (two OpenMP teams on the same cores, the slowdown
        kernels.release_thread_pool avoids, and the adapter routing of the engine's mixed
        batches is state of the one model). The rows in the batch pause while a search runs.
        """
        spec = req.search
        if req.stream:
            raise ApiError(400, "'search' does not stream: its answer is chosen only once every candidate is written; "
                                "send 'stream': false", "stream")
        if (req.n or 1) != 1:
            raise ApiError(400, "'n' must be 1 with 'search': the search answers with the one solution it chooses "
                                "(its samples are 'search.n')", "n")
        given = req.model_fields_set
        for name in SEARCH_REFUSES:
            value = getattr(req, name)
            if name in given and value and not (name == "num_beams" and value == 1):
                raise ApiError(400, f"'{name}' does not combine with 'search' (a search samples with temperature, "
                                    "top_p, max_tokens and seed only)", name)
        if adapter is not None:
            raise ApiError(400, f"'search' runs on the served model {self.name!r} as loaded, not through the "
                                f"adapter {req.model!r}", "model")
        if self.encoder_decoder:
            raise ApiError(400, f"'search' needs a decoder-only model; {self.name} is an encoder-decoder", "search")
        verifier = None
        if spec.verifier is not None:
            verifier = self.verifiers.get(spec.verifier)
            if verifier is None:
                have = (f"loaded {', '.join(repr(v) for v in self.verifiers)}" if self.verifiers else
                        "loaded none (emergence serve --verifier NAME=DIR)")
                raise ApiError(400, f"'search.verifier': no verifier {spec.verifier!r}; this server {have}", "search")
        last = req.messages[-1]
        if last.role != "user" or not last.text().strip():
            raise ApiError(400, "'search' answers the last message, which must be the user's question (not empty)",
                           "messages")
        question = last.text()
        prompt_tokens = len(await self._in_thread(self.lm.tokenizer.encode, format_prompt(question),
                                                  param="messages"))
        room = self.context - prompt_tokens
        max_tokens = req.max_tokens or req.max_completion_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise ApiError(400, f"the search prompt has {prompt_tokens} tokens; with max_tokens "
                                f"{max_tokens or 1} it exceeds the context of {self.context}", "messages",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(DEFAULT_SEARCH_TOKENS, room)
        sampled = {k: v for k, v in (("temperature", req.temperature), ("top_p", req.top_p)) if v is not None}
        for k in ("temperature", "top_p"):  # a store model's PARAMETERs stand in for the ones left out
            if k not in sampled and self.defaults.get(k) is not None:
                sampled[k] = self.defaults[k]
        cfg = SearchConfig(n=spec.n, width=spec.beam_width, aggregation=spec.aggregation, lookahead=spec.lookahead,
                           max_tokens=max_tokens, step_tokens=spec.step_tokens, max_steps=spec.max_steps,
                           window=spec.window, budget=spec.budget, threshold=spec.threshold, **sampled)
        try:
            cfg.check()
        except EmergenceError as e:
            raise ApiError(400, str(e), "search") from None
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        gone = threading.Event()
        policy = SearchPolicy(self.lm, seed=seed, gone=gone)

        def run() -> dict:  # in the engine's thread
            from ..search.run import solve_problem

            record = solve_problem({"question": question, "answer": None}, spec.strategy, policy, verifier, cfg)
            self.engine.generated += record["generated_tokens"]
            return record

        sink = AsyncSink(asyncio.get_running_loop())
        state.arrived()
        try:
            job: CallJob = self.engine.submit_call(run, sink=sink)
        except EmergenceError as e:
            raise ApiError(429 if "busy" in str(e) else 400, str(e)) from None
        def left() -> None:  # the client left: not run if still waiting, stopped at its next policy call
            gone.set()
            job.cancel()

        _, record = await _until_done(asyncio.ensure_future(sink.get()), http, left)
        if isinstance(record, ClientGone) or record is None:
            raise ClientGone()
        if isinstance(record, EmergenceError):
            raise ApiError(400, str(record), "search")
        if isinstance(record, BaseException):
            raise self._failure(record, state)
        state.prompt_tokens, state.completion_tokens = record["prompt_tokens"], record["generated_tokens"]
        result = {"strategy": spec.strategy, "n": spec.n,
                  "beam_width": spec.beam_width if spec.strategy in ("beam_search", "dvts") else None,
                  "verifier": spec.verifier, "answer": record["answer"], "candidates": record["candidates"],
                  "prompt_tokens": record["prompt_tokens"], "generated_tokens": record["generated_tokens"],
                  "verifier_tokens": record["verifier_tokens"], "policy_flops": record["policy_flops"],
                  "verifier_flops": record["verifier_flops"], "flops": record["flops"], "seed": seed,
                  "rounds": record.get("rounds")}
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": record["text"]},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": usage(record["prompt_tokens"], record["generated_tokens"]), "search": result}

    async def embeddings(self, req: EmbeddingRequest, state: RequestState) -> dict:
        """Through the engine's queue, as generation goes (the same limit on waiting work)."""
        self.check_model(req.model)
        if req.dimensions is not None:
            raise ApiError(400, "'dimensions' is not supported: the embeddings are the model's width", "dimensions")
        items = req.input
        if isinstance(items, str) or (items and isinstance(items[0], int)) or not items:
            items = [items]
        inputs = []
        for index, item in enumerate(items):
            ids = self._ids(item, "input")
            if not ids:
                raise ApiError(400, f"input {index} is empty", "input")
            if len(ids) > self.context:
                raise ApiError(400, f"input {index} has {len(ids)} tokens; the context is {self.context}", "input",
                               "context_length_exceeded")
            inputs.append(ids)
        state.prompt_tokens = sum(map(len, inputs))
        sink = AsyncSink(asyncio.get_running_loop())
        state.arrived()
        try:
            self.engine.submit_embedding(inputs, sink=sink)
        except EmergenceError as e:
            raise ApiError(429 if "busy" in str(e) else 400, str(e)) from None
        _, vectors = await sink.get()
        if isinstance(vectors, BaseException):
            raise self._failure(vectors, state)
        data = []
        for index, vector in enumerate(vectors):
            embedding = (base64.b64encode(struct.pack(f"<{len(vector)}f", *vector.tolist())).decode()
                         if req.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {"object": "list", "data": data, "model": req.model,
                "usage": {"prompt_tokens": state.prompt_tokens, "total_tokens": state.prompt_tokens}}

    # --------------------------------------------------------------------------- helpers
    def constraint(self, kind: str, schema=None):
        """Structured output (structured.py) for this model's tokenizer: kind "json_object", or
        "json_schema" with its schema (none: any JSON object); InvalidArgument with the engine's
        message when it cannot be compiled."""
        from ..structured import json_object, json_schema

        if kind == "json_schema" and schema is not None:
            return json_schema(schema, self.lm.tokenizer)
        return json_object(self.lm.tokenizer)

    async def _constrain(self, options, response_format) -> None:
        """OpenAI's response_format ("text", "json_object", "json_schema") into the sampling
        parameters, compiled in a worker thread (a large schema may take a while)."""
        if response_format is None or response_format.type == "text":
            return
        schema = response_format.json_schema.json_schema if response_format.json_schema is not None else None
        options.params["constraint"] = await self._in_thread(self.constraint, response_format.type, schema,
                                                             param="response_format")

    def _ids(self, item, param: str) -> list[int]:
        if isinstance(item, str):
            return self.lm.tokenizer.encode(item)
        if any(t < 0 or t >= self.lm.tokenizer.vocab_size for t in item):
            raise ApiError(400, f"token ids in '{param}' must be in [0, {self.lm.tokenizer.vocab_size})", param)
        return list(item)

    def _prompts(self, prompt) -> list[list[int]]:
        items = prompt_items(prompt)
        if len(items) > 16:
            raise ApiError(400, "at most 16 prompts per request", "prompt")
        out = []
        for item in items:
            if self.encoder_decoder:  # the prompt is the encoder's: a text ends with EOS, as T5's tokenizer has it
                try:
                    out.append(prepare_prompt(self.lm.tokenizer, item if isinstance(item, str) else
                                              self._ids(item, "prompt"), self.context, 0, source=True))
                except EmergenceError as e:
                    raise ApiError(400, str(e), "prompt", "context_length_exceeded") from None
                continue
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

    async def _in_thread(self, fn, *args, param: str | None = None, timeout: float | None = None,
                         inline: bool = False):
        """fn(*args) in a worker thread (tokenizing or rendering a long prompt must not stall the
        event loop; `inline`: work known to be short, run here); EmergenceError -> 400 on `param`;
        past `timeout`, a 400 (the thread is left to finish on its own: Python cannot stop it)."""
        try:
            if inline:
                return fn(*args)
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, fn, *args), timeout)
        except asyncio.TimeoutError:
            raise ApiError(400, f"rendering the chat template took more than {timeout:g} s", param) from None
        except ApiError:
            raise
        except EmergenceError as e:
            raise ApiError(400, str(e), param) from None

    def _submit(self, jobs, stream: bool, adapter: str | None, state: RequestState,
                ) -> tuple[list[tuple[int, Request]], AsyncSink]:
        """Queue (choice index, prompt ids, params) jobs; the choices of one prompt (consecutive
        jobs with the same ids) go together, sharing its prefill and KV blocks. A response sent
        whole (not `stream`) gets its chunks when its requests end."""
        state.arrived()
        sink = AsyncSink(asyncio.get_running_loop(), hold=not stream)
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
                                                      tags=indices, adapter=adapter)
                submitted += zip(indices, requests)
        except EmergenceError as e:
            for _, r in submitted:
                r.cancel()
            raise ApiError(429 if "busy" in str(e) else 400, str(e)) from None
        return submitted, sink

    async def _merged(self, requests: list[tuple[int, Request]], sink: AsyncSink,
                      state: RequestState) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) from all of a response's requests, as they come."""
        open_ = len(requests)
        try:
            while open_:
                tag, item = await sink.get()
                if item is None:
                    open_ -= 1
                    continue
                if isinstance(item, BaseException):
                    raise self._failure(item, state)
                if item.token_ids:
                    state.token(sink.first_token_at)
                    state.completion_tokens += len(item.token_ids)
                yield tag, item
        finally:  # done, the client left (cancelled) or an error: free the slots
            for _, r in requests:
                r.cancel()

    async def _collect(self, requests, sink: AsyncSink, state: RequestState,
                       http: HttpRequest) -> dict[int, tuple[str, list, str, list[int]]]:
        """Every choice's text, logprobs, finish reason and token ids; stops (and frees the slots)
        when the client disconnects before the end."""
        texts: dict[int, list] = {index: ["", [], "length", []] for index, _ in requests}

        async def gather() -> None:
            async for index, chunk in self._merged(requests, sink, state):
                entry = texts[index]
                entry[0] += chunk.text
                entry[1] += chunk.logprobs
                entry[3] += chunk.token_ids
                if chunk.finish_reason:
                    entry[2] = chunk.finish_reason

        await _until_done(asyncio.ensure_future(gather()), http)
        return {k: tuple(v) for k, v in texts.items()}

    def _failure(self, error: BaseException, state: RequestState) -> ApiError:
        log.error("request %s: generation failed", state.id, exc_info=(type(error), error, error.__traceback__))
        return ApiError(500, f"generation failed; the server's log has the details (request {state.id})",
                        code="internal_error")


async def _until_done(task: asyncio.Future, http: HttpRequest, on_leave=None):
    """The task's result, checking every second that the client is still there (ClientGone when
    it left). Whenever the wait ends before the task (the client left, or this coroutine was
    cancelled), on_leave() runs and the task is cancelled."""
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=1.0)
            if not task.done() and await http.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            if on_leave is not None:
                on_leave()
            task.cancel()
    return task.result()


# ------------------------------------------------------------------------- the HTTP layer
def _json(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def coalesced(parts: AsyncIterator[bytes], ready: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The parts, those ready together joined: a socket write costs far more than its bytes, and
    an event loop behind its streams catches up a write per stream, not one per token."""
    pending = []
    async for part in parts:
        pending.append(part)
        if not ready():
            yield b"".join(pending)
            pending = []
    if pending:
        yield b"".join(pending)


def sse(stream: EventStream) -> StreamingResponse:
    async def body():
        try:
            async for event in stream.events:
                yield b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n"
            yield b"data: [DONE]\n\n"
        except ApiError as e:  # failed mid-stream: the status is sent already, so say it in the stream
            yield b"data: " + json.dumps(e.body()).encode("utf-8") + b"\n\n"
    return StreamingResponse(coalesced(body(), stream.ready), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="emergence", summary=f"OpenAI- and Ollama-compatible API serving {server.name}",
                  docs_url="/docs", redoc_url=None)
    errors = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)}

    def state_of(request: HttpRequest) -> RequestState:
        return request.scope["state"]["emergence"]

    async def authorized(request: HttpRequest) -> None:  # async: FastAPI runs a plain def in a worker thread
        server.authorize(request)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, e: ApiError):
        if request.url.path.startswith("/api/"):  # Ollama's error shape
            return _json(e.status, {"error": e.message}, e.headers)
        return _json(e.status, e.body(), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HttpRequest, e: RequestValidationError):
        return await api_error(request, validation_error(list(e.errors()), prefix=("body",)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: HttpRequest, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.url.path} does not take {request.method}"}.get(e.status_code, str(e.detail))
        return await api_error(request, ApiError(e.status_code, message))

    @app.exception_handler(ClientGone)
    async def gone(request: HttpRequest, e: ClientGone):
        return Response(status_code=499)  # nobody reads it

    @app.exception_handler(Exception)
    async def failure(request: HttpRequest, e: Exception):
        state = state_of(request)
        log.error("request %s failed", state.id, exc_info=e)
        return await api_error(request, ApiError(500, f"internal error; the server's log has the details (request "
                                                      f"{state.id})", code="internal_error"))

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/health", summary="liveness, and what the engine holds")
    async def health():
        return {"status": "ok", "model": server.name, "active": server.engine.active,
                "waiting": server.engine.waiting}

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(authorized)],
             response_class=Response)
    async def metrics():
        data, content_type = server.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)], responses=errors)
    async def models():
        return server.models()

    @app.post("/v1/completions", response_model=Completion, dependencies=[Depends(authorized)], responses=errors,
              summary="complete a prompt (stream: server-sent events)")
    async def completions(body: CompletionRequest, request: HttpRequest):
        state = state_of(request)
        state.model = body.model
        result = await server.completions(body, state, request)
        return JSONResponse(result) if isinstance(result, dict) else sse(result)

    @app.post("/v1/chat/completions", response_model=ChatCompletion, dependencies=[Depends(authorized)],
              responses=errors, summary="answer a conversation (stream: server-sent events)")
    async def chat_completions(body: ChatCompletionRequest, request: HttpRequest):
        state = state_of(request)
        state.model = body.model
        result = await server.chat_completions(body, state, request)
        return JSONResponse(result) if isinstance(result, dict) else sse(result)

    @app.post("/v1/embeddings", response_model=EmbeddingList, dependencies=[Depends(authorized)], responses=errors)
    async def embeddings(body: EmbeddingRequest, request: HttpRequest):
        state = state_of(request)
        state.model = body.model
        return JSONResponse(await server.embeddings(body, state))

    from .latent_routes import add_latent_routes
    from .ollama import add_ollama_routes

    add_ollama_routes(app, server, authorized, state_of)
    add_latent_routes(app, server, authorized)
    return Guard(app, server)


class Guard:
    """The outermost ASGI layer (see the module docstring): request ids and the log line, Host
    and Origin checks, CORS, body size and arrival time; it tells the engine of each POST it
    takes in until the request is submitted or answered (BatchEngine.arriving)."""

    def __init__(self, app: FastAPI, server: Server) -> None:
        self.app, self.server = app, server

    def __getattr__(self, name):  # the FastAPI app's attributes (routes, openapi, ...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server = self.server
        state = RequestState(uuid.uuid4().hex[:16], scope["method"], scope["path"])
        scope.setdefault("state", {})["emergence"] = state
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        cors = origin is not None and server.origin_allowed(origin)
        finished = False

        async def send_logged(message) -> None:
            nonlocal finished
            if message["type"] == "http.response.start":
                state.status = message["status"]
                extra = [(b"x-request-id", state.id.encode())]
                if cors:
                    extra += [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not finished:
                finished = True
                server.metrics.observe(state)
                log.info(json.dumps({"id": state.id, "method": state.method, "path": state.path,
                                     "status": state.status, "model": state.model,
                                     "prompt_tokens": state.prompt_tokens,
                                     "completion_tokens": state.completion_tokens,
                                     "ttft_ms": None if state.first_token is None else round(1e3 * state.first_token, 1),
                                     "duration_ms": round(1e3 * (time.perf_counter() - state.start), 1)}))

        async def refuse(status: int, message: str, extra: tuple = ()) -> None:
            error = ApiError(status, message, code={403: "forbidden"}.get(status))
            body = json.dumps({"error": message} if state.path.startswith("/api/") else error.body()).encode()
            await send_logged({"type": "http.response.start", "status": status,
                               "headers": [(b"content-type", b"application/json"),
                                           (b"content-length", str(len(body)).encode()), *extra]})
            await send_logged({"type": "http.response.body", "body": body})

        if not server.host_allowed(headers.get("host")):
            return await refuse(403, f"the Host header {headers.get('host')!r} is not allowed (--allowed-hosts)")
        if origin is not None and not cors:
            return await refuse(403, f"the Origin {origin!r} is not allowed (--allowed-origins)")
        if scope["method"] == "OPTIONS" and origin is not None:  # a CORS preflight
            await send_logged({"type": "http.response.start", "status": 204,
                               "headers": [(b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                                           (b"access-control-allow-headers", b"authorization, content-type"),
                                           (b"access-control-max-age", b"600")]})
            return await send_logged({"type": "http.response.body", "body": b""})
        length = headers.get("content-length")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            if length is None and "chunked" not in headers.get("transfer-encoding", ""):
                return await refuse(411, "a JSON body with a Content-Length is required")
            if length is not None and (not length.isdigit() or int(length) > server.max_body_bytes):
                return await refuse(413, f"the request body is {length} bytes; the limit is {server.max_body_bytes}",
                                    ((b"connection", b"close"),))
        if scope["method"] == "POST":  # likely a generation: an idle engine waits for it a moment
            state.arrived = server.engine.arriving()
        try:
            await self.app(scope, self._limited(receive, length, state), send_logged)
        finally:
            state.arrived()

    def _limited(self, receive, length: str | None, state: RequestState):
        """receive(), with the body limited in size and each part of it in arrival time."""
        server, received, body_done = self.server, 0, False

        async def limited():
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), server.body_timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body ({length} bytes announced) did not arrive within "
                                    f"{server.body_timeout:g} s", close=True) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > server.max_body_bytes:
                    raise ApiError(413, f"the request body is over the limit of {server.max_body_bytes} bytes",
                                   close=True)
                body_done = not message.get("more_body", False)
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        return limited


# ------------------------------------------------------------------------------ uvicorn
def _protocol(header_timeout: float):
    """uvicorn's HTTP/1.1 protocol on httptools (llhttp, C: a request's parsing costs the event
    loop a fraction of h11's), closing a connection whose request headers take longer than
    `header_timeout` seconds to arrive (uvicorn itself waits forever: slow-drip clients)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedProtocol(HttpToolsProtocol):
        armed = 0  # which wait for headers the pending timer is for (a later one supersedes it)
        waiting = False  # a request's headers are due

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_headers_complete(self) -> None:
            self.waiting = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.armed += 1
            self.waiting = True
            self.loop.call_later(header_timeout, self._headers_due, self.armed)

        def _headers_due(self, armed: int) -> None:
            if armed == self.armed and self.waiting and not self.transport.is_closing():
                self.transport.close()  # the headers of a request did not arrive in time

    return GuardedProtocol


class RunningServer:
    """A server in a background thread (tests, embedding): `server_address`, `shutdown()`."""

    def __init__(self, app: Server, host: str, port: int) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app.app, host=host, port=port, log_level="warning", access_log=False,
                                http=_protocol(app.header_timeout), lifespan="off", timeout_keep_alive=5)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.install_signal_handlers = lambda: None  # not the main thread
        self._thread = threading.Thread(target=self._uvicorn.run, name="emergence-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EmergenceError(f"the HTTP server did not start on {host}:{port}")
            time.sleep(0.01)
        self.server_address = self._uvicorn.servers[0].sockets[0].getsockname()[:2]

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)

    def server_close(self) -> None:
        pass


def serve_in_thread(app: Server, host: str = "127.0.0.1", port: int = 0) -> tuple[RunningServer, threading.Thread]:
    """Start serving in a background thread (port 0: any free port); for tests and embedding."""
    server = RunningServer(app, host, port)
    return server, server._thread


def model_chat_template(path: Path, override: str | None) -> ChatTemplate:
    """The served model's own template, the override when given, or the plain transcript for
    a base model that has none."""
    return resolve_chat_template(find_model_template(Path(path)), override=override, missing="plain")


def app_for(model: str | None, *, slots: int = 8, max_queue: int = 256, api_key: str | None = None,
            context_policy: str = "drop-oldest", chat_template: str | None = None, device: str = "auto",
            dtype: str | None = None, context: int | None = None, kv_memory: int | None = None,
            allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = (),
            adapters: dict[str, str] | None = None, verifiers: dict[str, str] | None = None,
            verifier_kind: str = "prm", prefix_caching: bool = True, draft: str | None = None,
            draft_tokens: int = 4, draft_dtype: str | None = None) -> Server:
    """The server's routes for a model argument (store.resolve_model). A store model's
    PARAMETERs are the request defaults, its SYSTEM the system message of chats that bring none,
    its TEMPLATE the chat template (unless one is given). adapters: served name -> PEFT adapter
    folder, each loaded once onto the one base and chosen per request by that model name.
    verifiers: name -> reward model folder (search.verifier.load_verifier, as verifier_kind),
    loaded here once, named by chat requests with `search`. draft: a smaller model with the same
    tokenizer (default: a store model's DRAFT) that decodes requests running alone speculatively,
    proposing draft_tokens a round, loaded in draft_dtype (default: dtype)."""
    from ..adapters.lora import routing
    from ..adapters.peft_format import load_adapter
    from ..api import load
    from ..store import resolve_model

    source = resolve_model(model)
    lm = load(source, device=device, dtype=dtype)
    served = {}
    if adapters:
        active = routing(lm.model).active  # the loaded model's own (a store entry's ADAPTER), or None
        for served_name, folder in adapters.items():
            if served_name.removesuffix(":latest") == source.name:
                raise InvalidArgument(f"adapter name {served_name!r} is the served model's own name")
            load_adapter(lm.model, folder, served_name)
            served[served_name] = served_name
        routing(lm.model).active = active
    speculator = None
    if (draft or source.draft) is not None:
        speculator = lm.speculator(load(resolve_model(draft or source.draft), device=device,
                                        dtype=draft_dtype or dtype), k=draft_tokens)
    loaded_verifiers = {}
    if verifiers:
        from ..search.verifier import load_verifier

        for verifier_name, folder in verifiers.items():
            loaded_verifiers[verifier_name] = load_verifier(folder, kind=verifier_kind, device=device, dtype=dtype)
            loaded_verifiers[verifier_name].name = verifier_name
    return Server(lm, source.name, slots=slots, max_queue=max_queue, api_key=api_key, context_policy=context_policy,
                  chat_template=model_chat_template(source.path, chat_template or source.template),
                  defaults=source.parameters, system=source.system, context=context, kv_memory=kv_memory,
                  allowed_hosts=allowed_hosts, allowed_origins=allowed_origins, source=source, adapters=served,
                  verifiers=loaded_verifiers, prefix_caching=prefix_caching, draft=speculator)


def run_server(model: str | None, *, host: str = "127.0.0.1", port: int = 8000, insecure: bool = False,
               warmup: bool = True, **options) -> None:
    """`emergence serve`: load the model, warm it up (Server.warm_up), serve until Ctrl-C
    (options: those of `app_for`). A non-loopback address needs an API key, or `insecure`."""
    import uvicorn

    if host not in LOOPBACK_HOSTS and options.get("api_key") is None and not insecure:
        raise EmergenceError(f"serving on {host}, beyond this machine, needs an API key (EMERGENCE_API_KEY or "
                             "--api-key-file); --insecure serves without one")
    hosts = tuple(options.pop("allowed_hosts", ()))
    if host not in LOOPBACK_HOSTS and host not in ("0.0.0.0", "::"):
        hosts += (host,)  # the address it is reached by
    app = app_for(model, allowed_hosts=hosts, **options)
    if warmup:
        for request, status in app.warm_up().items():
            if status >= 500 or status == 0:
                log.warning("the warm-up request %s failed (status %d)", request, status)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = uvicorn.Config(app.app, host=host, port=port, log_level="warning", access_log=False,
                            http=_protocol(app.header_timeout), lifespan="off")
    http = uvicorn.Server(config)
    # what is loaded now (the model, the app, the libraries) stays: out of the collector's sight, a
    # full collection no longer walks it, pausing every stream for tens of milliseconds
    gc.collect()
    gc.freeze()
    cache = app.engine.cache
    print(f"serving {app.name} ({app.template.name} chat template) on http://{host}:{port}/v1 with "
          f"{app.engine.slots} decode slots, context {app.context}, KV cache {cache.nbytes / 2**20:.0f} MiB "
          f"({cache.num_blocks * cache.block_size:,} tokens){'; API key required' if app.api_key else ''}"
          f"{'; search verifiers ' + ', '.join(app.verifiers) if app.verifiers else ''}", flush=True)
    try:
        http.run()
    except OSError as e:
        raise EmergenceError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        app.close()
