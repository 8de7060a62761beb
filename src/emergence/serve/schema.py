"""OpenAI-compatible request bodies -> checked values, and the response shapes.

Every check fails with `ApiError(status, message, param)`, which the server sends in
OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import EmergenceError
from ..generate import TokenLogprob
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 16 of them", "stop")
    return tuple(stop)


@dataclass
class Sampling:
    """What a request asks of the decoder, before the prompt's length is known."""

    n: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # top alternatives per token, None: no logprobs
    params: dict[str, Any]  # SamplingParams fields except max_new_tokens and logprobs

    def for_prompt(self, prompt_tokens: int, context: int, index: int, prompt_param: str) -> SamplingParams:
        """SamplingParams for choice `index` of a prompt of prompt_tokens tokens."""
        if prompt_tokens >= context:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the model's context is {context}",
                           prompt_param, "context_length_exceeded")
        room = context - prompt_tokens
        max_tokens = room if self.max_tokens is None else self.max_tokens
        if max_tokens > room:
            raise ApiError(400, f"max_tokens {max_tokens} + {prompt_tokens} prompt tokens exceed the context of "
                           f"{context}", "max_tokens", "context_length_exceeded")
        params = dict(self.params)
        if params.get("seed") is not None:
            params["seed"] += index  # n > 1: different samples, reproducible
        try:
            return SamplingParams(max_new_tokens=max_tokens, logprobs=self.logprobs, **params)
        except EmergenceError as e:
            raise ApiError(400, str(e)) from None


def parse_sampling(body: dict, *, chat: bool, default_max_tokens: int | None) -> Sampling:
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    if chat:
        wants = body.get("logprobs", False)
        if not isinstance(wants, bool):
            raise ApiError(400, "'logprobs' must be true or false", "logprobs")
        top = _integer(body, "top_logprobs", 0, 0, 20)
        logprobs = top if wants else None
        if top and not wants:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 30)
        max_tokens = _integer(body, "max_tokens", max_tokens, 1, 1 << 30)
    else:
        logprobs = _integer(body, "logprobs", None, 0, 20)
        max_tokens = _integer(body, "max_tokens", default_max_tokens, 1, 1 << 30)
        # legacy completion options this server does not implement: refused, not silently ignored
        if body.get("echo") not in (None, False):
            raise ApiError(400, "'echo' is not supported: the prompt is not repeated in the completion", "echo")
        if body.get("suffix") not in (None, ""):
            raise ApiError(400, "'suffix' (text insertion) is not supported", "suffix")
        if body.get("best_of") not in (None, body.get("n", 1)):
            raise ApiError(400, "'best_of' is not supported (candidates are not ranked on the server); use n",
                           "best_of")
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 63) - 1)
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id -> bias", "logit_bias")
    try:
        bias = {int(k): v for k, v in bias.items()}
    except ValueError:
        raise ApiError(400, "'logit_bias' keys must be token ids", "logit_bias") from None
    if not isinstance(body.get("ignore_eos", False), bool):  # vLLM's extra field
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos")
    params = dict(
        ignore_eos=body.get("ignore_eos", False),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        top_k=int(_integer(body, "top_k", 0, 0, 1 << 20)),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 100.0),
        stop=_stop(body), seed=None if seed is None else seed % (1 << 63), logit_bias=bias,
    )
    return Sampling(n=int(_integer(body, "n", 1, 1, 16)), max_tokens=max_tokens, stream=body.get("stream", False),
                    include_usage=bool(options.get("include_usage", False)), logprobs=logprobs, params=params)


# ------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _piece(tokenizer: Tokenizer, token_id: int) -> str:
    """The text one token stands for ("▁the" -> " the": decoding a lone SentencePiece token
    drops its leading space, which OpenAI's token strings keep)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if tokenizer.id_to_piece(token_id).startswith("\u2581") and not text.startswith(" "):
        text = " " + text
    return text


def chat_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob]) -> dict:
    """OpenAI chat shape: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def entry(token_id: int, logprob: float) -> dict:
        text = _piece(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top]}
                        for i in items]}


def completion_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob], offset: int = 0) -> dict:
    """OpenAI legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [_piece(tokenizer, i.token_id) for i in items]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{_piece(tokenizer, t): lp for t, lp in i.top} for i in items],
            "text_offset": offsets}
