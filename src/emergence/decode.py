"""One decode batch: the sequences being decoded, their paged KV cache, and one step for all.

`generate()` drives a `DecodeBatch` synchronously; the serving engine drives one from its
thread, letting requests join and leave between steps. A step:

1. every row chooses its next token from its pending logits (penalties, logit bias,
   temperature and the filters, its own random generator; plain greedy rows share one argmax,
   and seeded rows that sample alike one softmax, each drawing from its own generator);
   a row under a structured-output constraint (structured.py: a JSON schema, regex or
   grammar) first has its logits masked to the tokens its grammar allows, and its grammar
   advances on the token chosen;
2. every row emits what became final: stop ids and strings, streamed text that never splits a
   character or shows the start of a stop string, logprobs;
3. finished rows leave and free their KV blocks;
4. the others' tokens go through the model in one forward pass, which gives their next logits.

Rows join with a prefill (several prompts in one pass; with prefix caching on, kv_cache.py,
a row first takes the cached blocks of its history's longest cached prefix and prefills only
the rest, and every block a row fills is registered for later rows), fork (n samples of one
prompt share its blocks, copied on write), are reordered (beam search continues some rows under new rows
without copying their caches) and leave. When the pool has too few blocks for a step, the
most recently admitted rows are preempted: their blocks are freed and they wait in
`preempted`, to be admitted again later with their prompt and generated tokens recomputed
(vLLM's recompute preemption); what they already emitted stands.

The forward pass runs on an explicit backend: `EagerBackend` (the model's own forward over a
CacheView; any device, any model) or the native one (kernels/fused_decode.py: decode.cpp's
one-call forward on the CPU). `make_backend` chooses; nothing in the model dispatches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InvalidArgument
from .kv_cache import DEFAULT_BLOCK_SIZE, CacheView, OutOfBlocks, PagedKVCache
from .model import Transformer
from .sampling import SamplingParams, argmax_ids, banned_ngram_tokens, choose, process_logits
from .tokenizer import StreamDecoder, Tokenizer

BACKENDS = ("auto", "native", "eager")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability under the model's raw distribution (before sampling filters)
    top: list[tuple[int, float]]  # the most likely alternatives, (token_id, logprob), best first


@dataclass
class Chunk:
    """What one step added to one sequence."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"


# ------------------------------------------------------------------------------ one row
@dataclass(eq=False)
class Row:
    """One sequence: its decoding state (budget, random generator, stop rules, detokenizer,
    penalty counts, what it emitted) and its place in the KV cache (blocks, length)."""

    tag: Any  # the caller's handle (a prompt index, a request)
    params: SamplingParams
    prompt: list[int]
    max_new: int  # tokens it may generate (its budget, within the context window)
    decoder: StreamDecoder
    generator: torch.Generator | None
    stop_ids: set[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded text of the generated tokens so far
    emitted: int = 0  # characters of `text` already handed out
    seen: torch.Tensor | None = None  # (1, V) bool: tokens in prompt or output (repetition penalty)
    counts: torch.Tensor | None = None  # (1, V): generated-token counts (presence/frequency penalties)
    blocks: list[int] = field(default_factory=list)  # its KV cache blocks, in order
    length: int = 0  # tokens whose keys and values are in the cache
    adapter: str | None = None  # the model's adapter this row runs through (None: the active one)
    # An encoder-decoder's row: `prompt` is the decoder's start token, `source` the encoder's
    # input, `cross` its cross-attention states (t5.CrossStates), computed once when the row
    # joins and shared by its forks.
    source: list[int] | None = None
    cross: Any = None
    constraint: Any = None  # structured.RowConstraint: where the row is in its grammar (None: free text)
    serials: list[int] = field(default_factory=list)  # prefix-cache serials of its full blocks (kv_cache.py)
    cached: int = 0  # tokens of its history taken from the prefix cache when it last joined

    @property
    def history(self) -> list[int]:
        """Every token of the sequence: the prompt and what it generated."""
        return self.prompt + self.token_ids

    def choose(self, logits: torch.Tensor) -> int:
        """logits (1, V) -> the next token under this row's sampling parameters."""
        processed = process_logits(logits, self.params, self.seen, self.counts)
        if self.params.no_repeat_ngram_size:
            banned = banned_ngram_tokens(self.history, self.params.no_repeat_ngram_size)
            unbanned = processed
            processed = processed.clone()  # (may be the batch's own logits)
            processed[0, banned] = float("-inf")
            if self.constraint is not None and processed.max() == float("-inf"):
                processed = unbanned  # the grammar allows only banned tokens: the grammar wins
        return int(choose(processed, self.params.greedy, self.generator))

    def emit(self, token: int, raw_logits: torch.Tensor | None) -> tuple[Chunk, bool]:
        """Record one chosen token; return its chunk and whether the row is done.
        raw_logits (V,) are read only when the row asked for logprobs."""
        if token in self.stop_ids:  # the end token itself is not part of the output
            return Chunk(self._flush(), [], [], "stop"), True
        logprobs = [_logprobs(raw_logits, token, self.params.logprobs)] if self.params.logprobs is not None else []
        self.token_ids.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
            self.counts[0, token] += 1
        text, stopped = self._advance_text(self.decoder.push(token))
        if stopped:
            return Chunk(text, [token], logprobs, "stop"), True
        if self.constraint is not None:
            self.constraint.advance(token)
            if self.constraint.finished:  # the grammar is complete: nothing may follow
                return Chunk(text + self._flush(), [token], logprobs, "stop"), True
        if len(self.token_ids) >= self.max_new:
            return Chunk(text + self._flush(), [token], logprobs, "length"), True
        return Chunk(text, [token], logprobs), False

    def _advance_text(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; return (text now final, whether a stop string ended the sequence)."""
        stops = self.params.stop
        search_from = max(0, len(self.text) - max((len(s) for s in stops), default=0))
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, True
        safe = len(self.text) - _held_back(self.text, stops)
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def _flush(self) -> str:
        """Text still held back (an incomplete character, a possible stop-string start) at the end."""
        text, stopped = self._advance_text(self.decoder.flush())
        if stopped:
            return text
        rest = self.text[self.emitted:]
        self.emitted = len(self.text)
        return text + rest


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


def end_ids(config, tokenizer: Tokenizer) -> set[int]:
    """The ids that end a sequence: the model's EOS ids and the tokenizer's."""
    return set(config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())


def new_row(tag: Any, prompt: list[int], params: SamplingParams, config, tokenizer: Tokenizer, eos: set[int],
            device: torch.device) -> Row:
    """The decoding state of one sequence (not yet in a batch): its budget within the context
    window, random generator, stop ids, detokenizer, and (for penalties) the tokens seen."""
    params.check_vocabulary(config.vocab_size)
    source = None
    if config.is_encoder_decoder:  # the prompt goes to the encoder
        source, prompt = list(prompt), [config.decoder_start_token_id]
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    row = Row(tag, params, list(prompt), min(params.max_new_tokens, config.block_size - len(prompt)),
              tokenizer.stream_decoder(), generator, set(params.stop_token_ids) | (set() if params.ignore_eos else eos),
              source=source)
    if params.constraint is not None:
        constraint = params.constraint
        if constraint.tokenizer is not tokenizer and constraint.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise InvalidArgument("the constraint was compiled for another tokenizer than the model's")
        row.constraint = constraint.start()
    if params.needs_history and row.max_new > 0:
        row.seen = torch.zeros(1, config.vocab_size, dtype=torch.bool, device=device)
        row.seen[0, torch.tensor(prompt, device=device)] = True
        row.counts = torch.zeros(1, config.vocab_size, dtype=torch.float32, device=device)
    return row


# ------------------------------------------------------------------------------ backends
class EagerBackend:
    """The model's own forward pass over a CacheView: any device, dtype and module."""

    name = "eager"

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model, self.cache = model, cache
        self._cross: tuple[tuple, tuple] | None = None  # (the last rows' cross states, them batched)

    def forward(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]],
                cross: list | None = None, every: bool = False) -> torch.Tensor:
        """Sequence j, holding starts[j] tokens in the blocks tables[j], is extended by
        chunks[j]; returns each sequence's last-token logits (J, V) float32, or with `every`
        the logits of every token fed, (sum of chunk lengths, V) in order. An
        encoder-decoder's rows bring their cross-attention states (`cross`)."""
        device = self.cache.device
        J, T = len(chunks), max(len(c) for c in chunks)
        counts = torch.tensor([len(c) for c in chunks], device=device)
        if all(len(c) == T for c in chunks):
            ids = torch.tensor(chunks, device=device)
        else:  # right-padded: the padding's keys and values are never stored
            ids = torch.zeros(J, T, dtype=torch.long)
            for j, c in enumerate(chunks):
                ids[j, :len(c)] = torch.tensor(c)
            ids = ids.to(device)
        view = CacheView(self.cache, self.cache.tables(tables), torch.tensor(starts, device=device), counts)
        with torch.inference_mode():
            if cross is not None:
                h = self.model.decoder_states(ids, *self._batched_cross(cross), view)  # (J, T, D)
            else:
                h = self.model.hidden_states(ids, view)  # (J, T, D)
            if every:  # (N, D): every real token, row by row
                last = h[torch.arange(T, device=device) < counts[:, None]]
            else:
                last = h[torch.arange(J, device=device), counts - 1]  # (J, D): each row's last real token
            logits = self.model.head(last).float()  # soft-capped where the model caps
        return logits.clone()  # a normal tensor: the batch masks unused ids in place


    def _batched_cross(self, cross: list) -> tuple:
        """The rows' cross states batched (t5.batch_cross_states), reused while the same sources
        stand in the same order (step after step of a stable batch: no copy per step)."""
        from .t5 import batch_cross_states

        last = self._cross
        if last is None or len(last[0]) != len(cross) or any(a is not b for a, b in zip(last[0], cross)):
            self._cross = last = (tuple(cross), batch_cross_states(cross))  # holds the states: no id is reused
        return last[1]


def make_backend(model: Transformer, cache: PagedKVCache, choice: str = "auto"):
    """The backend a decode batch runs on: "native" (decode.cpp; refused with the reason when it
    cannot run this model), "eager", or "auto": native where it can run, else eager."""
    if choice not in BACKENDS:
        raise InvalidArgument(f"unknown decode backend {choice!r} (use {', '.join(BACKENDS)})")
    if choice != "eager":
        from .kernels.fused_decode import NativeBackend, unsupported

        why = unsupported(model, cache)
        if why is None:
            return NativeBackend(model, cache)
        if choice == "native":
            raise InvalidArgument(f"the native decode step cannot run this model: {why}")
    return EagerBackend(model, cache)


# ---------------------------------------------------------------------------- the batch
class DecodeBatch:
    """The rows being decoded together, over one paged KV cache and one backend."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, cache: PagedKVCache, *, backend: str = "auto") -> None:
        self.model, self.tokenizer, self.cache = model, tokenizer, cache
        self.config = model.config
        self.device = cache.device
        self.backend = make_backend(model, cache, backend)
        self.rows: list[Row] = []  # in admission order (the last admitted are preempted first)
        self.logits: torch.Tensor | None = None  # (B, V) float32: row b's next-token logits
        self.preempted: list[Row] = []  # rows pushed out for lack of blocks, to admit again
        self.steps = 0  # forward passes of the decoding loop (each serves every row)
        self.forward_seconds = 0.0  # time spent in forward passes (prefills included)
        self.eos = end_ids(self.config, tokenizer)
        self.encoder_decoder = self.config.is_encoder_decoder
        # ids past the tokenizer's vocabulary (a model's padded embedding rows) are never chosen
        self.unused = slice(tokenizer.vocab_size, None) if tokenizer.vocab_size < self.config.vocab_size else None

    @classmethod
    def for_rows(cls, model: Transformer, tokenizer: Tokenizer, rows: Sequence[Row], *, backend: str = "auto",
                 block_size: int | None = None) -> DecodeBatch:
        """A batch with a cache sized for `rows` to run to their budgets (no preemption)."""
        block_size = block_size or DEFAULT_BLOCK_SIZE
        blocks = sum(-(-(len(r.history) + r.max_new) // block_size) for r in rows)
        check_memory(PagedKVCache.block_bytes(model.config, block_size, model.dtype) * blocks, model.device,
                     f"a KV cache for {sum(len(r.history) + r.max_new for r in rows)} tokens",
                     "lower max_new_tokens or the batch size")
        cache = PagedKVCache(model.config, blocks, block_size=block_size, dtype=model.dtype, device=model.device)
        return cls(model, tokenizer, cache, backend=backend)

    def new_row(self, prompt: list[int], params: SamplingParams, tag: Any = None) -> Row:
        return new_row(tag, prompt, params, self.config, self.tokenizer, self.eos, self.device)

    def child(self, parent: Row, params: SamplingParams | None = None, tag: Any = None) -> Row:
        """A new row continuing `parent`'s sequence (its history and the text it emitted) under
        its own parameters and random generator; `fork` or `reorder` gives it the cache."""
        row = self.new_row(parent.prompt, params or parent.params, tag)
        row.token_ids, row.text, row.emitted = list(parent.token_ids), parent.text, parent.emitted
        row.prompt, row.source, row.cross, row.max_new = parent.prompt, parent.source, parent.cross, parent.max_new
        row.decoder = parent.decoder.copy()
        if parent.seen is not None and row.seen is not None:
            row.seen, row.counts = parent.seen.clone(), parent.counts.clone()
        if parent.constraint is not None and row.params.constraint is parent.params.constraint:
            row.constraint = parent.constraint.copy()  # where the parent is in the grammar
        return row

    # -------------------------------------------------------------------- joining
    def admit(self, rows: Sequence[Row]) -> None:
        """Prefill the rows' histories (the prompt; after a preemption, the prompt and the tokens
        generated) in one forward pass; they join the batch with their next-token logits.
        Raises OutOfBlocks, admitting none, when the cache cannot hold them."""
        if not rows:
            return
        for row in rows:
            if row.blocks or row.length:
                raise ValueError("a row joins with no cache of its own")
        histories = [r.history for r in rows]
        self._reuse_prefixes(rows, histories)
        need = sum(self.cache.blocks_for(len(h)) - len(r.blocks) for r, h in zip(rows, histories))
        if need > self.cache.num_free:
            free = self.cache.num_free
            self.remove(rows)
            raise OutOfBlocks(f"{need} blocks needed, {free} free")
        if self.encoder_decoder:
            self._encode([r for r in rows if r.cross is None])
        logits = self._forward(rows, [h[r.length:] for r, h in zip(rows, histories)])
        self.rows += rows
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    def _reuse_prefixes(self, rows: Sequence[Row], histories: list[list[int]]) -> None:
        """With prefix caching on: each joining row takes the cached blocks of its history's
        longest cached prefix (leaving at least its last token to compute, for its logits)."""
        for row, history in zip(rows, histories):
            row.cached = 0
            if not self.cache.prefix_caching or self.encoder_decoder:
                continue
            blocks, row.serials = self.cache.match(history, self._namespace(row), limit=len(history) - 1)
            row.blocks = self.cache.acquire(blocks)
            row.length = row.cached = len(blocks) * self.cache.block_size

    def _register_prefixes(self, rows: Sequence[Row]) -> None:
        """Register the blocks the rows have filled since their last registration (prefix caching)."""
        bs = self.cache.block_size
        for row in rows:
            if row.length // bs <= len(row.serials):
                continue
            history, namespace = row.history, self._namespace(row)
            while len(row.serials) < row.length // bs:
                i = len(row.serials)
                row.serials.append(self.cache.register(row.blocks[i], row.serials[-1] if row.serials else 0,
                                                       history[i * bs:(i + 1) * bs], namespace))

    def _namespace(self, row: Row) -> str | None:
        """What a row's keys and values depend on beyond its tokens: the adapter it runs through."""
        if row.adapter is not None:
            return row.adapter
        routing = self.model.__dict__.get("lora_routing")  # (adapters/lora.py; absent without adapters)
        return routing.active if routing is not None else None

    def fork(self, parent: Row, children: Sequence[Row]) -> None:
        """Children continue `parent`'s sequence: they share its KV blocks (a block is copied
        only when one of them writes into it) and its next-token logits."""
        b = self._index(parent)
        for child in children:
            child.blocks, child.length = self.cache.fork(parent.blocks), parent.length
            child.cross, child.serials = parent.cross, list(parent.serials)
        self.rows += children
        self.logits = torch.cat([self.logits, self.logits[b:b + 1].expand(len(children), -1)])

    def reorder(self, parents: Sequence[Row], children: Sequence[Row]) -> None:
        """Beam search's step: the batch becomes `children`, child i continuing the sequence of
        parents[i] (a row of the batch; one may be named several times, a row not named leaves).
        Blocks are shared, never copied here; a shared, partly filled last block is copied when
        a child first writes into it."""
        index = [self._index(p) for p in parents]
        for parent, child in zip(parents, children):
            child.blocks, child.length = self.cache.fork(parent.blocks), parent.length
            child.cross, child.serials = parent.cross, list(parent.serials)
        for row in self.rows:
            self.cache.release(row.blocks)
        self.rows = list(children)
        self.logits = self.logits[torch.tensor(index, dtype=torch.long, device=self.logits.device)] if index else None

    def remove(self, rows: Sequence[Row]) -> None:
        """Rows leave (finished, or their client went away): their blocks are freed."""
        gone = {id(r) for r in rows}
        keep = [b for b, r in enumerate(self.rows) if id(r) not in gone]
        for row in rows:
            self.cache.release(row.blocks)
            row.length = 0
            row.serials = []
        if len(keep) < len(self.rows):
            self.rows = [self.rows[b] for b in keep]
            self.logits = self.logits[torch.tensor(keep, device=self.logits.device)] if keep else None

    # ----------------------------------------------------------------- stepping
    def step(self, deliver: Callable[[Row, Chunk], None] | None = None) -> list[tuple[Row, Chunk]]:
        """Choose every row's next token and emit it; finished rows leave; the others advance
        one token. Returns each row's chunk, in row order. `deliver`, when given, gets each
        (row, chunk) before the forward pass that advances the batch: a server hands its clients
        their tokens while the next step computes (the native step releases the GIL), not a
        step later."""
        if not self.rows:
            return []
        logits = self.logits
        if self.unused is not None:
            logits[:, self.unused] = float("-inf")
        raw = self._constrain(logits)
        # plain greedy rows (the common case) take their tokens from one argmax over the batch
        argmax = argmax_ids(logits) if any(r.params.plain_greedy for r in self.rows) else None
        drawn = self._sample_together(logits)
        events, finished, tokens = [], [], []
        for b, row in enumerate(self.rows):
            # (no per-row tensor ops unless needed: under load each is a chance to lose the GIL)
            if row.constraint is not None and row.constraint.dead:  # its grammar allows nothing more
                events.append((row, Chunk(row._flush(), [], [], "length")))
                finished.append(row)
                continue
            token = argmax[b] if row.params.plain_greedy else drawn[b] if b in drawn else row.choose(logits[b:b + 1])
            chunk, done = row.emit(token, raw.get(b, logits[b]) if row.params.logprobs is not None else None)
            events.append((row, chunk))
            if done:
                finished.append(row)
            else:
                tokens.append(token)
        self.remove(finished)
        if deliver is not None:
            for row, chunk in events:
                deliver(row, chunk)
        self.advance(tokens)
        return events

    def _sample_together(self, logits: torch.Tensor) -> dict[int, int]:
        """The tokens of rows that sample alike, drawn in one pass per kind: rows with their own
        generator (a seed) and the same temperature and filters, with nothing that differs by
        row (penalties, logit bias, banned n-grams). Each row still draws its one uniform number
        from its own generator, so it gets the token row.choose would give it: n samples of a
        search or a request cost one softmax and cumulative sum over their rows, not n."""
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(self.rows):
            p = row.params
            if row.generator is None or p.greedy or p.row_processors:
                continue
            groups.setdefault((p.temperature, p.top_k, p.top_p, p.min_p, p.typical_p), []).append(b)
        drawn = {}
        for rows in groups.values():
            if len(rows) < 2:
                continue
            processed = process_logits(logits[rows], self.rows[rows[0]].params)
            uniforms = torch.cat([torch.rand(1, generator=self.rows[b].generator, device=logits.device,
                                             dtype=torch.float64) for b in rows])
            drawn.update(zip(rows, choose(processed, False, uniforms=uniforms).tolist()))
        return drawn

    def _constrain(self, logits: torch.Tensor) -> dict[int, torch.Tensor]:
        """Mask the constrained rows' logits in place to what their grammars allow (structured.py);
        returns the raw logits of those that report logprobs (which are the model's)."""
        rows = [b for b, r in enumerate(self.rows) if r.constraint is not None and not r.constraint.dead]
        if not rows:
            return {}
        from .structured import mask_logits

        raw = {b: logits[b].clone() for b in rows if self.rows[b].params.logprobs is not None}
        mask_logits(logits, rows, [self.rows[b].constraint for b in rows],
                    [sorted(self.rows[b].stop_ids) for b in rows])
        return raw

    def advance(self, tokens: Sequence[int]) -> None:
        """Feed token b to row b (every row of the batch) and compute the next logits; rows
        that cannot get a block are preempted first (see the module docstring)."""
        if not self.rows:
            return
        tokens = list(tokens)
        while (self.cache.blocks_needed_all([r.blocks for r in self.rows], [r.length for r in self.rows], 1)
               > self.cache.num_free):
            if len(self.rows) == 1:
                raise OutOfBlocks("the KV cache cannot hold one sequence of this length")
            victim = self.rows[-1]
            self.remove([victim])
            self.preempted.append(victim)
            tokens.pop()
        self.logits = self._forward(self.rows, [[t] for t in tokens])
        self.steps += 1

    def _adapters(self, rows: Sequence[Row]):
        """Each row through its own adapter (PEFT's mixed batch) when any row names one."""
        if all(r.adapter is None for r in rows):
            return nullcontext()
        from .adapters.lora import per_row, routing

        active = routing(self.model).active
        return per_row(self.model, [active if r.adapter is None else r.adapter for r in rows])

    def extend(self, row: Row, tokens: list[int], every: bool = True) -> torch.Tensor:
        """Feed `tokens` to one row's cache, after its `length` tokens (the row need not be in
        `rows`); the logits after each, (len(tokens), V) float32 (`every` False: after the last
        only, (1, V)). Speculative decoding's verification and drafting (speculative.py): tokens
        that may be taken back with `truncate`, so none of the blocks they fill is registered
        for prefix caching here."""
        return self._forward([row], [tokens], every=every, register=False)

    def truncate(self, row: Row, length: int) -> None:
        """Take back a row's cached tokens past `length` (blocks no longer needed are released);
        with prefix caching, the blocks now filled by its history are registered."""
        if not 0 <= length <= row.length:
            raise ValueError(f"cannot truncate a row of {row.length} tokens to {length}")
        keep = self.cache.blocks_for(length)
        tail = row.blocks[keep:]
        del row.blocks[keep:]
        self.cache.release(tail)
        row.length = length
        del row.serials[length // self.cache.block_size:]
        if self.cache.prefix_caching and not self.encoder_decoder:
            self._register_prefixes([row])

    def _forward(self, rows: Sequence[Row], chunks: list[list[int]], *, every: bool = False,
                 register: bool = True) -> torch.Tensor:
        """Extend each row's cache by its chunk; (J, V) float32 logits of the chunks' last tokens
        (`every`: of every token)."""
        for row, chunk in zip(rows, chunks):
            self.cache.grow(row.blocks, row.length, len(chunk))
        started = time.perf_counter()
        extra = {"cross": [r.cross for r in rows]} if self.encoder_decoder else {}
        if every:
            extra["every"] = True
        with self._adapters(rows):
            logits = self.backend.forward(chunks, [r.length for r in rows], [r.blocks for r in rows], **extra)
        self.forward_seconds += time.perf_counter() - started
        for row, chunk in zip(rows, chunks):
            row.length += len(chunk)
        if register and self.cache.prefix_caching and not self.encoder_decoder:
            self._register_prefixes(rows)
        return logits.to(self.device)

    def _encode(self, rows: Sequence[Row]) -> None:
        """An encoder-decoder's joining rows: their sources through the encoder in one pass
        (right-padded), and each row's cross-attention keys and values kept on it."""
        if not rows:
            return
        S = max(len(r.source) for r in rows)
        ids = torch.full((len(rows), S), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), S, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r.source)], mask[b, :len(r.source)] = torch.tensor(r.source), 1
        started = time.perf_counter()
        with torch.inference_mode():
            encoded = self.model.encode(ids.to(self.device), mask.to(self.device))
            for r, states in zip(rows, self.model.cross_states(encoded)):
                n = len(r.source)  # a padded row keeps only its own slots (a copy: the batch's tensor goes)
                r.cross = states if n == S else type(states)(states.k[:, :, :n].clone(), states.v[:, :, :n].clone())
        self.forward_seconds += time.perf_counter() - started

    def _index(self, row: Row) -> int:
        for b, r in enumerate(self.rows):
            if r is row:
                return b
        raise ValueError("the row is not in this batch")


def check_memory(need: int, device: torch.device, what: str, remedy: str) -> None:
    """Refuse an allocation larger than the device's memory before trying it."""
    import os

    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > available:
        raise InvalidArgument(f"{what} needs {need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB "
                              f"available; {remedy}")
