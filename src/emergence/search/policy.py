"""Policies: what writes candidate solutions for a search.

A policy samples completions of prompts: `generate(prompts, n, ...)` gives, for every prompt,
n samples (n may differ per prompt), each with its text (a stop string left out), its
generated token count and why it ended. Whole solutions are sampled with no stop string;
step-wise search continues partial solutions with stop="\\n" (prompt.STEP_STOP), one step per
call. Every policy keeps running totals (`usage`: prompt and generated tokens, FLOPs, calls,
requests that got no answer), which the search runner reads before and after each problem.

- `LocalPolicy`: an emergence model. The prompts are prefilled in one pass and each prompt's
  n samples are forks of its row (DecodeBatch.fork): they share the prompt's KV blocks
  (a shared, partly filled last block is copied when a sample first writes into it) and its
  first logits, and decode together as rows of one batch through the native batched step
  (decode.make_backend "auto": decode.cpp on the CPU where it runs the model). Sample j of a
  call gets its own seeded generator, seeds drawn from the policy's own random stream.
- `HTTPPolicy`: any OpenAI-compatible server, POST /v1/completions with `n` and `stop`
  (urllib; at most 16 prompts and 16 samples a request, as emergence's server takes). A
  request that gets no answer within `timeout` seconds (or whose connection fails) is counted
  in `usage.timeouts` and its prompts come back with no samples: the run goes on, and those
  problems score as unanswered. A 5xx answer is counted in `usage.server_errors` the same way;
  a 4xx answer is bad input and raises.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import random
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import InvalidArgument
from .flops import FlopsModel

MAX_PER_REQUEST = 16  # prompts, and samples, in one request (emergence's server takes at most 16 of each)


@dataclass
class Sample:
    text: str  # the completion, without the stop string that ended it
    tokens: int  # generated tokens (the one holding a stop string included; an end token not)
    finish_reason: str  # "stop" (a stop string; over HTTP also the end token), "eos", "length"


@dataclass
class Generation:
    """A prompt's samples. `error` is set (and `samples` empty) when the request got no answer."""

    prompt: str
    samples: list[Sample]
    prompt_tokens: int = 0
    flops: float | None = None
    error: str | None = None


@dataclass
class Usage:
    """Running totals of a policy or a verifier."""

    calls: int = 0
    prompt_tokens: int = 0  # tokens prefilled (a prompt shared by n samples counts once)
    generated_tokens: int = 0  # policy: tokens written; verifier: tokens scored
    flops: float = 0.0
    flops_known: bool = True  # False once a call's FLOPs could not be counted (an endpoint of unknown shape)
    timeouts: int = 0  # requests without an answer (timed out, connection failed)
    server_errors: int = 0  # requests answered with a 5xx status

    def copy(self) -> Usage:
        return dataclasses.replace(self)

    def minus(self, other: Usage) -> Usage:
        return Usage(self.calls - other.calls, self.prompt_tokens - other.prompt_tokens,
                     self.generated_tokens - other.generated_tokens, self.flops - other.flops,
                     self.flops_known, self.timeouts - other.timeouts, self.server_errors - other.server_errors)

    def add(self, gen: Generation) -> None:
        self.prompt_tokens += gen.prompt_tokens
        self.generated_tokens += sum(s.tokens for s in gen.samples)
        if gen.flops is None:
            self.flops_known = False
        else:
            self.flops += gen.flops


@runtime_checkable
class Policy(Protocol):
    name: str
    usage: Usage

    def generate(self, prompts: Sequence[str], n: int | Sequence[int], *, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: Sequence[str] = ()) -> list[Generation]:
        """n samples of every prompt (n: one count for all, or one per prompt)."""
        ...


def _counts(prompts: Sequence[str], n: int | Sequence[int]) -> list[int]:
    counts = [n] * len(prompts) if isinstance(n, int) else [int(k) for k in n]
    if len(counts) != len(prompts):
        raise InvalidArgument(f"{len(counts)} sample counts for {len(prompts)} prompts")
    if any(k < 0 for k in counts):
        raise InvalidArgument("sample counts must be >= 0")
    return counts


# --------------------------------------------------------------------------------- local
class LocalPolicy:
    """An emergence model (a LanguageModel from emergence.load) as a policy."""

    def __init__(self, lm, *, seed: int = 0, name: str | None = None) -> None:
        from ..api import require_decoder_only

        require_decoder_only(lm.config, "search")
        self.lm = lm
        self.name = name or lm.config.name
        self.tokenizer = lm.tokenizer
        self.flops_model = FlopsModel.of(lm.model)
        self.usage = Usage()
        self._rng = random.Random(seed)
        self.last_stats: dict = {}  # the last call's decode batch: prefill, forks, shared blocks

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def generate(self, prompts: Sequence[str], n: int | Sequence[int], *, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: Sequence[str] = (),
                 ignore_eos: bool = False) -> list[Generation]:
        """ignore_eos (this policy only): every sample runs to max_tokens or a stop string (benchmarks)."""
        from ..decode import DecodeBatch
        from ..kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
        from ..sampling import SamplingParams

        counts = _counts(prompts, n)
        model, tok, config = self.lm.model, self.tokenizer, self.lm.config
        base = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_tokens, stop=tuple(stop),
                              ignore_eos=ignore_eos)
        out = [Generation(p, [], 0, 0.0) for p in prompts]
        ids = [tok.encode(p) or [tok.bos_id if tok.bos_id is not None else tok.eos_id] for p in prompts]
        jobs = []  # (prompt index, ids, count) of the prompts that leave room for a token
        for i, (p_ids, k) in enumerate(zip(ids, counts)):
            out[i].prompt_tokens = len(p_ids) if k else 0
            if k == 0:
                continue
            if len(p_ids) >= config.block_size or max_tokens == 0:  # no room left in the context
                out[i].samples = [Sample("", 0, "length") for _ in range(k)]
                continue
            jobs.append((i, p_ids, k))
        self.usage.calls += 1
        stats = {"prompts": len(jobs), "prefill_tokens": sum(len(p) for _, p, _ in jobs),
                 "rows": sum(k for *_, k in jobs), "forks": 0, "prompt_block_refs": []}
        if jobs:
            bs = DEFAULT_BLOCK_SIZE
            blocks = sum(-(-len(p) // bs) + k * (-(-max_tokens // bs) + 1) for _, p, k in jobs)
            cache = PagedKVCache(config, blocks, block_size=bs, dtype=model.dtype, device=model.device)
            batch = DecodeBatch(model, tok, cache, backend=self.lm.backend)
            seeds = {(i, j): self._rng.getrandbits(62) for i, _, k in jobs for j in range(k)}
            params = {key: dataclasses.replace(base, seed=None if temperature == 0 else s) for key, s in seeds.items()}
            firsts = [batch.new_row(p, params[(i, 0)], (i, 0)) for i, p, _ in jobs]
            batch.admit(firsts)  # every prompt prefilled once, in one pass
            for first, (i, _, k) in zip(firsts, jobs):
                if k > 1:  # the other samples share the prompt's blocks and first logits
                    batch.fork(first, [batch.child(first, params[(i, j)], (i, j)) for j in range(1, k)])
                    stats["forks"] += k - 1
                stats["prompt_block_refs"].append([cache._refs[b] for b in first.blocks])
            stats["blocks_used_after_fork"] = peak = cache.num_used
            texts: dict = {key: "" for key in seeds}
            ends: dict = {}
            rows = {}
            while batch.rows:
                for row, chunk in batch.step():
                    texts[row.tag] += chunk.text
                    if chunk.finish_reason:
                        end = chunk.finish_reason
                        if end == "stop" and not chunk.token_ids:  # an end token, not a stop string
                            end = "eos"
                        ends[row.tag], rows[row.tag] = end, row
                if batch.preempted:  # the cache is sized for every row: never happens
                    raise RuntimeError("search decode batch preempted a row")
                peak = max(peak, cache.num_used)
            stats.update(blocks=cache.num_blocks, peak_blocks_used=peak, block_copies=cache.copies, steps=batch.steps,
                         backend=batch.backend.name)
            for i, p, k in jobs:
                samples = [Sample(texts[(i, j)], len(rows[(i, j)].token_ids), ends[(i, j)]) for j in range(k)]
                out[i].samples = samples
                out[i].flops = self.flops_model.generation_flops(len(p), [s.tokens for s in samples])
        self.last_stats = stats
        for g in out:
            self.usage.add(g)
        return out


# ---------------------------------------------------------------------------------- HTTP
class HTTPPolicy:
    """An OpenAI-compatible server's /v1/completions as a policy.

    model: the `model` field of the requests (default: the first of GET /v1/models).
    flops_model, tokenizer: the served model's shapes and tokenizer, when known (e.g. the same
    model loaded locally): FLOPs are then counted, and token counts per sample come from the
    tokenizer; without them the server's usage counts are spread over the samples and FLOPs are
    not reported."""

    def __init__(self, url: str, *, model: str | None = None, timeout: float = 60.0, api_key: str | None = None,
                 seed: int = 0, flops_model: FlopsModel | None = None, tokenizer=None) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidArgument(f"an endpoint is an http:// or https:// URL, got {url!r}")
        base = url.rstrip("/")
        self.base = base[:-3] if base.endswith("/v1") else base
        self.name = url
        self.model, self.timeout, self.api_key = model, timeout, api_key
        self.flops_model, self.tokenizer = flops_model, tokenizer
        self.usage = Usage()
        self._rng = random.Random(seed)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict | None:
        """The JSON answer, or None when none came (timeout, connection failure, 5xx: counted)."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                self.usage.server_errors += 1
                return None
            try:
                detail = json.loads(e.read()).get("error", {}).get("message", "")
            except (ValueError, AttributeError, OSError):
                detail = ""
            raise InvalidArgument(f"{self.base}{path} refused the request: HTTP {e.code} "
                                  f"{detail or e.reason}") from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException,
                OSError):
            self.usage.timeouts += 1
            return None

    def _model(self) -> str | None:
        if self.model is None:
            answer = self._request("GET", "/v1/models")
            if answer is None:
                return None
            try:
                self.model = answer["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise InvalidArgument(f"{self.base}/v1/models lists no model: pass the model's name") from None
        return self.model

    def generate(self, prompts: Sequence[str], n: int | Sequence[int], *, temperature: float = 1.0,
                 top_p: float = 1.0, max_tokens: int = 256, stop: Sequence[str] = ()) -> list[Generation]:
        counts = _counts(prompts, n)
        out = [Generation(p, [], 0, 0.0 if self.flops_model else None) for p in prompts]
        self.usage.calls += 1
        # requests: prompts asking for the same number of samples, at most 16 prompts and 16 samples each
        pending = [(i, k) for i, k in enumerate(counts) if k > 0]
        while pending:
            k = min(pending[0][1], MAX_PER_REQUEST)
            group = [i for i, left in pending if left >= k][:MAX_PER_REQUEST]
            self._complete([prompts[i] for i in group], [out[i] for i in group], k, temperature, top_p, max_tokens,
                           stop)
            pending = [(i, left - k if i in group else left) for i, left in pending]
            pending = [(i, left) for i, left in pending if left > 0]
        for g in out:
            if g.error is not None:
                g.samples = []
            self.usage.add(g)
        return out

    def _complete(self, prompts: list[str], gens: list[Generation], n: int, temperature: float, top_p: float,
                  max_tokens: int, stop: Sequence[str]) -> None:
        model = self._model()
        answer = None
        if model is not None:
            body = {"model": model, "prompt": prompts, "n": n, "max_tokens": max_tokens, "temperature": temperature,
                    "top_p": top_p, "seed": self._rng.getrandbits(31)}
            if stop:
                body["stop"] = list(stop)
            answer = self._request("POST", "/v1/completions", body)
        if answer is None:
            for g in gens:
                g.error = "no answer"
            return
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != n * len(prompts):
            raise InvalidArgument(f"{self.base}/v1/completions answered {len(choices)} choices for "
                                  f"{len(prompts)} prompts x n={n}")
        usage = answer.get("usage") or {}
        total = usage.get("completion_tokens")
        texts = [c.get("text") or "" for c in choices]
        finishes = [c.get("finish_reason") or "stop" for c in choices]
        if self.tokenizer is not None:
            # the text's tokens; the server's total adds the tokens that held a stop string (one each)
            tokens = [len(self.tokenizer.encode(t)) for t in texts]
            extra = [i for i, f in enumerate(finishes) if f == "stop"] if total is not None else []
            for k in range(max(0, (total or 0) - sum(tokens))):
                if not extra:
                    break
                tokens[extra[k % len(extra)]] += 1
        else:  # the server's total spread over the samples
            tokens = [round((total or 0) / max(len(choices), 1))] * len(choices)
        for p, g in enumerate(gens):
            new = [Sample(texts[i], tokens[i], finishes[i]) for i in range(p * n, (p + 1) * n)]
            prompt_tokens = (len(self.tokenizer.encode(g.prompt)) if self.tokenizer is not None
                             else round((usage.get("prompt_tokens") or 0) / len(prompts)))
            if not g.samples:  # the first request for this prompt prefills it
                g.prompt_tokens = prompt_tokens
                if self.flops_model is not None:
                    g.flops += self.flops_model.forward_flops(0, prompt_tokens)
            if self.flops_model is not None:
                g.flops += sum(self.flops_model.forward_flops(prompt_tokens, s.tokens) for s in new)
            g.samples += new
