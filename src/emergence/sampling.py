"""logits -> next token, as small pure functions.

Each processor maps logits (B, V) to logits (B, V); filtered-out tokens get -inf. They
follow transformers' definitions (RepetitionPenalty, Temperature, TopK, TopP, MinP,
Typical, SequenceBias) and its order of application, so the same logits give the same
distribution. Presence and frequency penalties follow OpenAI's definition and count only
generated tokens. `choose` turns the processed logits into a token, with the random
generator passed in, never taken from global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidArgument

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides which tokens a generation produces and when it stops."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # transformers' definition: over prompt and generated tokens
    presence_penalty: float = 0.0  # OpenAI's definition: over generated tokens
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    max_new_tokens: int = 256
    stop: Sequence[str] = ()  # stop strings; the text ends before the first match
    stop_token_ids: Sequence[int] = ()  # in addition to the model's end-of-sequence ids
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # report the chosen token's logprob and this many top alternatives
    no_repeat_ngram_size: int = 0  # ban tokens that would repeat an n-gram of the sequence (0: off)
    # Beam search (beam.py), with transformers' meanings: beams kept per prompt; the length
    # exponent of a finished hypothesis' score; when to stop (True, False or "never"); how
    # many of the best hypotheses each prompt returns.
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    # Structured output (structured.py): a compiled JSON schema, regex or grammar the output
    # must match; each row masks its logits to what the grammar allows next.
    constraint: Any = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "typical_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "length_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "max_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be an integer >= 0, got {value!r}")
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (0 < self.typical_p <= 1, f"typical_p must be in (0, 1], got {self.typical_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
             f"logprobs must be an integer in [0, 20], got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be integers >= 0"),
            (isinstance(self.num_beams, int) and not isinstance(self.num_beams, bool) and self.num_beams >= 1,
             f"num_beams must be an integer >= 1, got {self.num_beams!r}"),
            (isinstance(self.num_return_sequences, int) and not isinstance(self.num_return_sequences, bool)
             and 1 <= self.num_return_sequences, f"num_return_sequences must be an integer >= 1, got "
             f"{self.num_return_sequences!r}"),
            (self.num_return_sequences <= self.num_beams if isinstance(self.num_return_sequences, int) else True,
             f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams}): "
             "each returned sequence is one beam"),
            (self.early_stopping in (True, False, "never"),
             f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgument(message)
        if self.constraint is not None:
            from .structured import Constraint

            if not isinstance(self.constraint, Constraint):
                raise InvalidArgument("constraint must be a structured.Constraint (structured.compile_constraint)")
            if self.num_beams > 1:
                raise InvalidArgument("structured output (a JSON schema, regex or grammar) does not work with beam "
                                      "search yet; use num_beams 1")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidArgument(f"logit_bias keys must be token ids >= 0, got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise InvalidArgument(f"logit_bias values must be numbers in [-100, 100], got {bias!r}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Token ids named by these parameters must exist in the model's vocabulary."""
        for token in (*self.logit_bias, *self.stop_token_ids):
            if token >= vocab_size:
                raise InvalidArgument(f"token id {token} is outside the vocabulary of {vocab_size}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def row_processors(self) -> bool:
        """Whether a processor reads something of the row's own (its bias, its history): rows
        without one process their logits alike and may be processed together."""
        return bool(self.logit_bias) or self.needs_history or bool(self.no_repeat_ngram_size)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor that changes the logits: the token is the raw argmax."""
        return self.greedy and not self.row_processors and self.constraint is None

    @property
    def needs_history(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


# ----------------------------------------------------------------------------- processors
def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor(list(bias.keys()), device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values.expand(logits.shape[0], -1))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen (B, V) bool: tokens in the prompt or generated so far. Positive logits are divided, negative multiplied."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """counts (B, V): how often each token was generated. logit -= frequency * count + presence * [count > 0]."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def banned_ngram_tokens(history: Sequence[int], n: int) -> list[int]:
    """Tokens that would repeat an n-gram of `history` (transformers' NoRepeatNGramLogitsProcessor):
    those that followed an earlier occurrence of the sequence's last n - 1 tokens."""
    if n <= 0 or len(history) + 1 < n:
        return []
    prefix = tuple(history[len(history) - n + 1:])
    return [history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i:i + n - 1]) == prefix]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def min_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens less likely than p times the most likely one."""
    probs = logits.softmax(dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, NEG_INF)


def typical_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to mass p."""
    logprobs = logits.log_softmax(dim=-1)
    entropy = -(logprobs * logprobs.exp()).nansum(-1, keepdim=True)
    distance = (-logprobs - entropy).abs()
    sorted_distance, order = torch.sort(distance, descending=False)
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < p).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    remove_sorted = sorted_distance > sorted_distance.gather(-1, last[:, None])
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """All configured processors in transformers' order. logits (B, V) float32."""
    logits = apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and counts is not None:
        logits = apply_presence_frequency(logits, counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return logits  # transformers applies no warpers without sampling either
    if params.temperature != 1:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p > 0:
        logits = min_p_filter(logits, params.min_p)
    if params.typical_p < 1:
        logits = typical_filter(logits, params.typical_p)
    return logits


def argmax_ids(logits: torch.Tensor) -> list[int]:
    """Each row's argmax of logits (B, V), as ints: the first of equal maxima (a NaN counting as
    the largest), as torch.argmax gives it. CPU float32 goes through NumPy, whose argmax is
    vectorised where torch's CPU reduction is not (this runs per token in greedy decoding and
    per step of a speculative draft)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.detach().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def choose(logits: torch.Tensor, greedy: bool, generator: torch.Generator | None = None,
           uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Processed logits (B, V) -> token ids (B,): argmax, or a draw from softmax(logits).

    The draw inverts each row's cumulative distribution at one uniform number (drawn from
    `generator`, or given: `uniforms` (B,) float64 in [0, 1)): the first token
    whose cumulative probability exceeds u * total (exactly categorical; a token of probability
    0 is never drawn, its cumulative value equalling its predecessor's). The sums are float64,
    so u * total < total holds after rounding. torch.multinomial draws the same distribution
    but costs ~100 us at 4K tokens and ~1 ms at 50K per call on a CPU, against ~15 us here."""
    if greedy:
        return logits.argmax(dim=-1)
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # (B, V)
    u = (uniforms.to(cdf.device, torch.float64)[:, None] if uniforms is not None else
         torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=torch.float64))
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
