"""Ollama's native API beside OpenAI's, over the same model and engine, so tools written for
Ollama work unchanged:

    GET  /api/tags       the served model, as `ollama list` shows models
    GET  /api/version
    POST /api/show       its Modelfile, parameters, template, details
    POST /api/generate   a prompt (the model's template with its system prompt unless raw;
                         a base model continues the text), streamed as NDJSON by default
    POST /api/chat       messages through the chat template, streamed as NDJSON by default

Options take the Modelfile PARAMETER names (temperature, top_k, num_predict, stop, ...); the
final object of a reply carries Ollama's counts and durations (nanoseconds), and /api/generate's
`context` (the prompt and the reply's token ids) continues a conversation. Errors are
{"error": message}.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import fit_context
from ..errors import EmergenceError
from ..sampling import SamplingParams
from ..store import Modelfile, inspect_model, with_system
from .app import INLINE_PROMPT, coalesced
from .schema import ApiError, OllamaChat, OllamaGenerate, OllamaOptions, OllamaShow

VERSION = "0.6.0"  # the Ollama API version these routes follow


def _timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def add_ollama_routes(app: FastAPI, server, authorized, state_of) -> None:
    info = _ModelInfo(server)

    def begin(body: OllamaGenerate | OllamaChat, request: HttpRequest):
        """A generating request's state, once its model is the served one."""
        state = state_of(request)
        state.model = body.model
        _check(server, body.model)
        if isinstance(body.format, str) and body.format not in ("", "json"):
            raise ApiError(400, "'format' must be \"json\" or a JSON schema object", "format")
        return state

    async def constrain(body: OllamaGenerate | OllamaChat, options: dict) -> None:
        """Ollama's structured output: format "json" (any JSON object) or a JSON schema."""
        if body.format:
            kind = "json_schema" if isinstance(body.format, dict) else "json_object"
            options["constraint"] = await server._in_thread(server.constraint, kind, body.format, param="format")

    @app.get("/api/version", summary="Ollama: the API version")
    async def version():
        return {"version": VERSION}

    @app.get("/api/tags", dependencies=[Depends(authorized)], summary="Ollama: the served model")
    async def tags():
        return {"models": [info.entry()]}

    @app.post("/api/show", dependencies=[Depends(authorized)], summary="Ollama: the model's details")
    async def show(body: OllamaShow):
        name = body.model or body.name
        if name is None:
            raise ApiError(400, "'model' is required", "model")
        _check(server, name)
        return info.show()

    @app.post("/api/generate", dependencies=[Depends(authorized)], summary="Ollama: complete a prompt")
    async def generate(body: OllamaGenerate, request: HttpRequest):
        state = begin(body, request)
        if body.images:
            raise ApiError(400, "images are not supported: emergence's models read text")
        if body.template:
            raise ApiError(400, "a per-request template is not supported (emergence's templates are Jinja: put one "
                                "in the model's Modelfile)")
        options = (body.options or OllamaOptions()).sampling(server.defaults)
        await constrain(body, options)
        system = body.system if body.system is not None else server.system
        if body.raw or server.template.name == "plain":  # a base model continues the text, as {{ .Prompt }} does
            text = body.prompt if body.raw else with_system(system, body.prompt)
            ids = await server._in_thread(server.lm.tokenizer.encode, text, param="prompt",
                                          inline=len(text) <= INLINE_PROMPT)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": body.prompt}]
            fit = await server._in_thread(lambda: fit_context(messages, server.lm.tokenizer, server.template,
                                                              context_window=server.context, reserve=1,
                                                              policy=server.context_policy),
                                          param="prompt", timeout=server.template_timeout)
            ids = fit.token_ids
        ids = list(body.context or []) + ids
        if not ids:
            ids = server._prompts([[]])[0]
        params = _params(server, options, len(ids), "prompt")
        return await _reply(server, state, request, ids, params, body.stream, chat=False)

    @app.post("/api/chat", dependencies=[Depends(authorized)], summary="Ollama: answer a conversation")
    async def chat(body: OllamaChat, request: HttpRequest):
        state = begin(body, request)
        if not body.messages:
            raise ApiError(400, "'messages' must hold at least one message", "messages")
        options = (body.options or OllamaOptions()).sampling(server.defaults)
        await constrain(body, options)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        if server.system is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": server.system}, *messages]
        reserve = options.get("max_new_tokens") or min(256, server.context // 4)
        reserve = min(reserve if reserve > 0 else server.context // 4, server.context - 1)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        fit = await server._in_thread(lambda: fit_context(messages, server.lm.tokenizer, server.template,
                                                          context_window=server.context, reserve=reserve,
                                                          policy=server.context_policy, tools=tools),
                                      param="messages", timeout=server.template_timeout)
        params = _params(server, options, len(fit.token_ids), "messages")
        return await _reply(server, state, request, fit.token_ids, params, body.stream, chat=True)


def _check(server, model: str) -> None:
    try:
        server.check_model(model)
    except ApiError as e:
        raise ApiError(404, f"model '{model}' not found (this server serves '{server.name}')") from e


def _params(server, options: dict, prompt_tokens: int, param: str) -> SamplingParams:
    if prompt_tokens >= server.context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {server.context}", param)
    room = server.context - prompt_tokens
    wanted = options.pop("max_new_tokens", None)
    options["max_new_tokens"] = room if wanted is None or wanted < 0 else min(wanted, room)
    options["stop"] = tuple(dict.fromkeys((*options.get("stop", ()), *server.template.stop)))
    try:
        return SamplingParams(**options)
    except EmergenceError as e:
        raise ApiError(400, str(e)) from None


async def _reply(server, state, request: HttpRequest, ids: list[int], params: SamplingParams, stream: bool,
                 *, chat: bool):
    """Ollama's reply: NDJSON chunks then a final object with the counts, or that object whole."""
    state.prompt_tokens = len(ids)
    requests, sink = server._submit([(0, ids, params)], stream, server.check_model(state.model), state)
    generated: list[int] = []

    def part(text: str) -> dict:
        body = {"model": server.name, "created_at": _timestamp()}
        if chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        return {**body, "done": False}

    def final(reason: str, text: str = "") -> dict:
        total = time.perf_counter() - state.start  # seconds since the request arrived
        first = state.first_token if state.first_token is not None else total
        body = {**part(text), "done": True, "done_reason": reason, "total_duration": int(1e9 * total),
                "load_duration": 0, "prompt_eval_count": len(ids), "prompt_eval_duration": int(1e9 * first),
                "eval_count": len(generated), "eval_duration": int(1e9 * (total - first))}
        if not chat:
            body["context"] = ids + generated
        return body

    if stream:
        async def lines() -> AsyncIterator[bytes]:
            reason = "length"
            try:
                async for _, chunk in server._merged(requests, sink, state):
                    generated.extend(chunk.token_ids)
                    if chunk.text:
                        yield json.dumps(part(chunk.text), ensure_ascii=False).encode() + b"\n"
                    reason = chunk.finish_reason or reason
                yield json.dumps(final(reason), ensure_ascii=False).encode() + b"\n"
            except ApiError as e:  # the status is sent already: say it in the stream
                yield json.dumps({"error": e.message}).encode() + b"\n"
        return StreamingResponse(coalesced(lines(), sink.ready), media_type="application/x-ndjson")

    results = await server._collect(requests, sink, state, request)
    text, _, reason, token_ids = results[0]
    generated.extend(token_ids)
    return JSONResponse(final(reason, text))


class _ModelInfo:
    """What /api/tags and /api/show say of the served model, read once from its files."""

    def __init__(self, server) -> None:
        self.server = server
        source = server.source
        config = server.lm.config
        self.modified = _timestamp()
        self.size, self.digest, self.format = 0, "", "safetensors"
        if source is not None:
            entry = source.entry
            if entry is not None:
                self.size = entry.size()
                self.modified = entry.manifest.created
                files = sorted((name, rec.sha256) for name, rec in entry.manifest.files.items())
                self.digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
            else:
                paths = [source.path] if source.path.is_file() else sorted(p for p in source.path.iterdir() if p.is_file())
                self.size = sum(p.stat().st_size for p in paths)
                self.digest = hashlib.sha256("".join(f"{p.name}:{p.stat().st_size}" for p in paths).encode()).hexdigest()
            try:
                details = inspect_model(source.path)
                self.format = "gguf" if details.layout == "gguf" else "safetensors"
                self.quantization = details.format
            except EmergenceError:
                self.quantization = "unknown"
        else:
            self.quantization = str(next(server.lm.model.parameters()).dtype).removeprefix("torch.")
        self.parameters = sum(p.numel() for p in server.lm.model.parameters())
        self.family = config.family

    def details(self) -> dict:
        return {"parent_model": "", "format": self.format, "family": self.family, "families": [self.family],
                "parameter_size": _human(self.parameters), "quantization_level": self.quantization}

    def entry(self) -> dict:
        name = self.server.name if ":" in self.server.name else f"{self.server.name}:latest"
        return {"name": name, "model": name, "modified_at": self.modified, "size": self.size,
                "digest": self.digest, "details": self.details()}

    def show(self) -> dict:
        server, config = self.server, self.server.lm.config
        stored = {k: list(v) if k == "stop" else v for k, v in server.defaults.items()}
        source = server.source.label if server.source is not None else server.name
        try:
            modelfile = Modelfile(source, stored, server.system, server.template.source).to_text()
        except EmergenceError:  # a text a Modelfile cannot quote: shown without it
            modelfile = Modelfile(source, stored).to_text()
        parameters = "\n".join(line.removeprefix("PARAMETER ") for line in modelfile.splitlines()
                               if line.startswith("PARAMETER "))
        return {"license": "", "modelfile": modelfile, "parameters": parameters, "template": server.template.source,
                "system": server.system or "", "details": self.details(), "modified_at": self.modified,
                "model_info": {"general.architecture": config.family, "general.parameter_count": self.parameters,
                               f"{config.family}.context_length": server.context,
                               f"{config.family}.embedding_length": config.n_embd,
                               f"{config.family}.block_count": config.n_layer,
                               f"{config.family}.attention.head_count": config.n_head,
                               f"{config.family}.attention.head_count_kv": config.n_kv_head},
                "capabilities": ["completion", "embedding"]}


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
