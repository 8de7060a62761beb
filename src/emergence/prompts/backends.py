"""Where a prompt program's calls go: emergence's own model in this process, or any
OpenAI-compatible server over HTTP (/v1/completions, /v1/embeddings).

A backend has `complete(prompt, n, temperature, max_tokens, stop, seed)`, returning n samples
(text, prompt_tokens, completion_tokens), and may have `embed(texts)` (one vector per text) for
few-shot selection by similarity. Sample j of a seeded call uses seed + j, as emergence's
server does for a request's n choices, so both backends give the same samples.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from ..errors import InvalidArgument

if TYPE_CHECKING:
    from ..api import LanguageModel


class Sample(NamedTuple):
    text: str
    prompt_tokens: int
    completion_tokens: int


@runtime_checkable
class Backend(Protocol):
    def complete(self, prompt: str, n: int = 1, temperature: float = 0.0, max_tokens: int = 128,
                 stop: Sequence[str] = (), seed: int | None = None) -> list[Sample]: ...


class LocalBackend:
    """emergence's LanguageModel: the k samples of a call decode as one batch; embeddings are
    the mean of the final (normalised) hidden states over the text's tokens, as the server's
    /v1/embeddings gives them."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm

    def complete(self, prompt: str, n: int = 1, temperature: float = 0.0, max_tokens: int = 128,
                 stop: Sequence[str] = (), seed: int | None = None) -> list[Sample]:
        from ..generate import generate
        from ..sampling import SamplingParams

        params = [SamplingParams(temperature=temperature, max_new_tokens=max_tokens, stop=tuple(stop),
                                 seed=None if seed is None else seed % (1 << 63) + j) for j in range(n)]
        done = generate(self.lm.model, self.lm.tokenizer, [prompt] * n, params, backend=self.lm.backend)
        return [Sample(c.text, c.prompt_tokens, len(c.token_ids)) for c in done]

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        import torch

        model, tokenizer = self.lm.model, self.lm.tokenizer
        device = model.device
        out = []
        with torch.no_grad():
            for text in texts:
                ids = tokenizer.encode(text)
                if not ids:
                    raise InvalidArgument(f"cannot embed {text!r}: it has no tokens")
                h = model.hidden_states(torch.tensor([ids], device=device))[0]
                out.append(h.float().mean(dim=0).cpu().tolist())
        return out


class HTTPBackend:
    """An OpenAI-compatible server: POST {base}/v1/completions and /v1/embeddings (base_url may
    end in /v1 or not). model None: the first model GET /v1/models lists. Standard library only."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise InvalidArgument(f"--base-url must be an http:// or https:// URL, got {base_url!r}")
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def _request(self, path: str, body: dict | None = None) -> dict:
        url = self.base + path
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                error = json.loads(detail).get("error", {})
                detail = error.get("message", detail) if isinstance(error, dict) else str(error)
            except (ValueError, AttributeError):
                pass
            raise InvalidArgument(f"{url} answered HTTP {e.code}: {' '.join(detail.split())[:300]}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise InvalidArgument(f"{url} did not answer within {self.timeout:g} s") from None
            raise InvalidArgument(f"cannot reach {url}: {e.reason}") from None
        except (TimeoutError, socket.timeout):
            raise InvalidArgument(f"{url} did not answer within {self.timeout:g} s") from None
        except (ConnectionError, OSError) as e:
            raise InvalidArgument(f"cannot reach {url}: {e}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise InvalidArgument(f"{url} did not answer with JSON") from None

    def model_name(self) -> str:
        if self.model is None:
            data = self._request("/models").get("data") or []
            if not data:
                raise InvalidArgument(f"{self.base}/models lists no model; name one with --model")
            self.model = data[0]["id"]
        return self.model

    def complete(self, prompt: str, n: int = 1, temperature: float = 0.0, max_tokens: int = 128,
                 stop: Sequence[str] = (), seed: int | None = None) -> list[Sample]:
        body = {"model": self.model_name(), "prompt": prompt, "n": n, "temperature": temperature,
                "max_tokens": max_tokens}
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        if n > 1:
            body["logprobs"] = 0  # each choice's tokens: its own completion-token count
        reply = self._request("/completions", body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            usage = reply.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens", 0))
            total = int(usage.get("completion_tokens", 0))
            counts = []
            for i, c in enumerate(choices):
                tokens = (c.get("logprobs") or {}).get("tokens")
                # without per-choice tokens, the usage total shared out (exact for n == 1)
                counts.append(len(tokens) if tokens is not None else total // n + (i < total % n))
            return [Sample(c["text"], prompt_tokens, k) for c, k in zip(choices, counts)]
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"{self.base}/completions answered without choices") from None

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        reply = self._request("/embeddings", {"model": self.model_name(), "input": list(texts)})
        try:
            return [d["embedding"] for d in sorted(reply["data"], key=lambda d: d["index"])]
        except (KeyError, TypeError):
            raise InvalidArgument(f"{self.base}/embeddings answered without data") from None
