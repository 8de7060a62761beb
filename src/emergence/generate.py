"""The decode loop: prefill the prompts, then one token per step until each sequence stops.

Prompts of different lengths are left-padded into one batch sharing a preallocated KV
cache; each row keeps its own sampling parameters, random generator, stop rules and
incremental detokenizer, so a prompt gets the same tokens in a batch as alone. Finished
rows leave the batch at once. `generate` returns whole completions; `stream` yields text
as it becomes final (never half a UTF-8 character, never the start of a stop string).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import InvalidArgument
from .kv_cache import KVCache
from .model import Transformer
from .sampling import SamplingParams, choose, process_logits
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability under the model's raw distribution (before sampling filters)
    top: list[tuple[int, float]]  # the most likely alternatives, (token_id, logprob), best first


@dataclass
class Chunk:
    """What one step added to one sequence (stream() yields these)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None


@dataclass
class _Row:
    """Per-sequence decoding state."""

    index: int  # position in the caller's list of prompts
    params: SamplingParams
    prompt: list[int]
    max_new: int
    decoder: StreamDecoder
    generator: torch.Generator | None
    stop_ids: set[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded text of the generated tokens so far
    emitted: int = 0  # characters of `text` already handed out
    seen: torch.Tensor | None = None  # (1, V) bool: tokens in prompt or output (repetition penalty)
    counts: torch.Tensor | None = None  # (1, V): generated-token counts (presence/frequency penalties)


def prepare_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], block_size: int, max_new_tokens: int,
                   truncate: bool = False) -> list[int]:
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        # Start a document: with BOS, or (GPT-2 style, where EOS separates documents) after EOS.
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise InvalidArgument("empty prompt and the tokenizer has neither BOS nor EOS to start from")
        ids = [start]
    if len(ids) >= block_size:
        if not truncate:
            raise InvalidArgument(f"prompt of {len(ids)} tokens does not fit the context window of {block_size} "
                                  "(ask for truncation to keep its end)")
        keep = max(block_size - max_new_tokens, 1) if max_new_tokens < block_size else block_size // 2
        ids = ids[-keep:]
    vocab = tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
    return ids


def _logprobs(logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """logits (V,) float32 raw model output."""
    lp = logits.log_softmax(dim=-1)
    top = torch.topk(lp, n) if n else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return TokenLogprob(token, lp[token].item(), pairs)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _advance_text(row: _Row, piece: str) -> tuple[str, bool]:
    """Add decoded text; return (text now final, whether a stop string ended the sequence)."""
    search_from = max(0, len(row.text) - max((len(s) for s in row.params.stop), default=0))
    row.text += piece
    hits = [i for i in (row.text.find(s, search_from) for s in row.params.stop) if i >= 0]
    if hits:
        row.text = row.text[:min(hits)]
        out, row.emitted = row.text[row.emitted:], len(row.text)
        return out, True
    safe = len(row.text) - _held_back(row.text, row.params.stop)
    out = row.text[row.emitted:safe] if safe > row.emitted else ""
    row.emitted = max(row.emitted, safe)
    return out, False


def _check_cache_fits(config, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse a KV cache larger than the device's memory before trying to allocate it."""
    need = 2 * config.n_layer * batch * config.n_kv_head * max_len * config.head_dim * dtype.itemsize
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > available:
        raise InvalidArgument(f"a KV cache for {batch} x {max_len} tokens needs {need / 2**30:.1f} GiB, more than the "
                              f"{available / 2**30:.1f} GiB available; lower max_new_tokens or the batch size")


def end_ids(config, tokenizer: Tokenizer) -> set[int]:
    """The ids that end a sequence: the model's EOS ids and the tokenizer's."""
    return set(config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())


def new_row(index: int, prompt: list[int], p: SamplingParams, config, tokenizer: Tokenizer, eos: set[int],
            device: torch.device) -> _Row:
    """The decoding state of one sequence: its budget, random generator, stop ids, detokenizer,
    and (for penalties) the tokens seen so far. Used by `decode_steps` and the serving engine."""
    p.check_vocabulary(config.vocab_size)
    generator = None
    if p.seed is not None and not p.greedy:
        generator = torch.Generator(device=device).manual_seed(p.seed)
    row = _Row(index, p, prompt, min(p.max_new_tokens, config.block_size - len(prompt)), tokenizer.stream_decoder(),
               generator, set(p.stop_token_ids) | (set() if p.ignore_eos else eos))
    if p.needs_history and row.max_new > 0:
        row.seen = torch.zeros(1, config.vocab_size, dtype=torch.bool, device=device)
        row.seen[0, torch.tensor(prompt, device=device)] = True
        row.counts = torch.zeros(1, config.vocab_size, dtype=torch.float32, device=device)
    return row


def decode_steps(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                 params: Sequence[SamplingParams]) -> Iterator[tuple[int, Chunk]]:
    """Yield (prompt index, chunk) for every token generated, until every sequence has finished."""
    config = model.config
    device = model.tok_embeddings.weight.device
    eos = end_ids(config, tokenizer)
    rows = [new_row(i, prompt, p, config, tokenizer, eos, device) for i, (prompt, p) in enumerate(zip(prompts, params))]
    for row in rows:
        if row.max_new <= 0:
            yield row.index, Chunk("", [], [], "length")
    rows = [r for r in rows if r.max_new > 0]
    if not rows:
        return

    # Prefill: left-pad the prompts into one (B, T) batch.
    width = max(len(r.prompt) for r in rows)
    pad_id = 0
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[b, width - len(r.prompt):] = 1
    max_len = width + max(r.max_new for r in rows)  # slots; each row's positions stay < block_size
    dtype = model.tok_embeddings.weight.dtype
    _check_cache_fits(config, len(rows), max_len, dtype, device)
    cache = KVCache(config, len(rows), max_len, dtype=dtype, device=device)
    cache.set_padding(mask)

    # Ids past the tokenizer's vocabulary (a model's padded embedding rows) can never be chosen.
    unused = slice(tokenizer.vocab_size, None) if tokenizer.vocab_size < config.vocab_size else None
    with torch.inference_mode():
        logits = model(input_ids.to(device), cache, last_logits_only=True)[:, -1].float()  # (B, V)
        while rows:
            if unused is not None:
                logits[:, unused] = float("-inf")
            next_tokens, keep = [], []
            for b, r in enumerate(rows):
                raw = logits[b:b + 1]
                processed = process_logits(raw, r.params, r.seen, r.counts)
                token = int(choose(processed, r.params.greedy, r.generator))
                chunk, finished = _emit(r, token, raw[0])
                yield r.index, chunk
                if not finished:
                    next_tokens.append(token)
                    keep.append(b)
            if not keep:
                return
            if len(keep) < len(rows):
                rows = [rows[b] for b in keep]
                cache.reorder(torch.tensor(keep, device=device))
            step = torch.tensor(next_tokens, device=device)[:, None]  # (B, 1)
            logits = model(step, cache)[:, -1].float()


def _emit(r: _Row, token: int, raw_logits: torch.Tensor | None) -> tuple[Chunk, bool]:
    """Record one sampled token for a row; return its chunk and whether the row is done.
    raw_logits (V,) are read only when the row asked for logprobs."""
    if token in r.stop_ids:  # the end token itself is not part of the output
        return Chunk(_flush(r), [], [], "stop"), True
    logprobs = [_logprobs(raw_logits, token, r.params.logprobs)] if r.params.logprobs is not None else []
    r.token_ids.append(token)
    if r.seen is not None:
        r.seen[0, token] = True
        r.counts[0, token] += 1
    text, stopped = _advance_text(r, r.decoder.push(token))
    if stopped:
        return Chunk(text, [token], logprobs, "stop"), True
    if len(r.token_ids) >= r.max_new:
        return Chunk(text + _flush(r), [token], logprobs, "length"), True
    return Chunk(text, [token], logprobs), False


def _flush(r: _Row) -> str:
    """Text still held back (an incomplete character, a possible stop-string start) at the end."""
    text, stopped = _advance_text(r, r.decoder.flush())
    if stopped:
        return text
    rest = r.text[r.emitted:]
    r.emitted = len(r.text)
    return text + rest


def generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
             truncate: bool = False) -> list[Completion]:
    """Complete every prompt (batched); the result for each equals what it gets alone."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ids = [prepare_prompt(tokenizer, p, model.config.block_size, sp.max_new_tokens, truncate)
           for p, sp in zip(prompts, params)]
    out = [Completion("", [], "length", len(i), [] if sp.logprobs is not None else None)
           for i, sp in zip(ids, params)]
    for index, chunk in decode_steps(model, tokenizer, ids, params):
        c = out[index]
        c.text += chunk.text
        c.token_ids += chunk.token_ids
        if c.logprobs is not None:
            c.logprobs += chunk.logprobs
        if chunk.finish_reason:
            c.finish_reason = chunk.finish_reason
    return out


def stream(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int],
           params: SamplingParams = SamplingParams(), *, truncate: bool = False) -> Iterator[Chunk]:
    """Yield chunks of one completion as they become final."""
    ids = prepare_prompt(tokenizer, prompt, model.config.block_size, params.max_new_tokens, truncate)
    for _, chunk in decode_steps(model, tokenizer, [ids], [params]):
        yield chunk
