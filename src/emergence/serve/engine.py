"""Continuous batching: requests join and leave one shared decode batch, step by step.

One worker thread owns the model. Each loop it admits waiting requests into free slots
(their prompts are prefilled apart from the batch: short ones all in one native call, each
in its own cache row; then each prompt's keys and values are placed in the shared KV cache),
runs ONE decoding step for every active row together (one native call on the CPU: each
weight is read once for all rows), hands each row its token, and drops the rows that
finished or whose client went away. A request never waits for another to finish: it waits
at most for a free slot and one step.

The shared cache is the left-padded `KVCache` of batched generation: every row's latest
token sits in the same slot, a row that joined with a shorter history has more padding in
front. Its tensors are views of the first B rows of per-slot buffers allocated once, so a
joining request writes one row and a finishing one is replaced by the last row: no step
copies the whole cache. A row joining with a longer prompt than the batch's history shifts
the others right; when the cache is full, the slots no row uses any more are cut from the
front. Positions and masks come from each row's padding, so a row computes what it would
compute alone.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgument
from ..generate import Chunk, _check_cache_fits, _emit, _Row, end_ids, new_row
from ..kv_cache import KVCache
from ..model import Transformer
from ..sampling import SamplingParams, choose, process_logits
from ..tokenizer import Tokenizer

@dataclass
class Request:
    """A submitted completion. Its `sink` receives (tag, Chunk) items, then (tag, None) at the
    end, or (tag, exception) if the engine failed; several requests may share one sink (the
    choices of one HTTP response). Iterating a request with its own sink yields its chunks."""

    prompt: list[int]
    params: SamplingParams
    sink: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    tag: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __iter__(self):
        while True:
            _, item = self.sink.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """The client is gone: free its slot at the next step."""
        self.cancelled.set()

    def _put(self, chunk: Chunk) -> None:
        self.sink.put((self.tag, chunk))

    def _end(self, error: BaseException | None = None) -> None:
        self.sink.put((self.tag, error))


class BatchEngine:
    """`submit()` from any thread; the engine's own thread decodes every active request together."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, slots: int = 8, max_queue: int = 256) -> None:
        if slots < 1:
            raise InvalidArgument(f"slots must be at least 1, got {slots}")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_queue = slots, max_queue
        self.device = model.tok_embeddings.weight.device
        self.dtype = model.tok_embeddings.weight.dtype
        config = model.config
        # the per-slot KV buffers, allocated at the first request: refuse now if they cannot fit
        _check_cache_fits(config, slots, config.block_size, self.dtype, self.device)
        self.eos = end_ids(config, tokenizer)
        # ids past the tokenizer's vocabulary (padded embedding rows) are never sampled
        self.unused = slice(tokenizer.vocab_size, None) if tokenizer.vocab_size < config.vocab_size else None
        self._waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._rows: list[_Row] = []  # active rows, in cache-row order
        self._requests: list[Request] = []  # the request of each active row
        self._cache: KVCache | None = None  # views of the first B rows of _k / _v
        self._k: list[torch.Tensor] | None = None  # per layer (slots, n_kv_head, block_size, head_dim)
        self._v: list[torch.Tensor] | None = None
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of the active rows
        self._alone: KVCache | None = None  # where each prompt is prefilled before it joins
        self._stopping = False
        self.steps = 0  # decoding steps run (each serves every active row)
        self._thread = threading.Thread(target=self._run, name="emergence-batch-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ client side
    def submit(self, prompt: list[int], params: SamplingParams, *, sink: queue.SimpleQueue | None = None,
               tag: int = 0) -> Request:
        """Queue a completion of `prompt` (token ids, already checked to fit the context)."""
        params.check_vocabulary(self.model.config.vocab_size)
        request = Request(list(prompt), params, sink if sink is not None else queue.SimpleQueue(), tag)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise InvalidArgument(f"the server is busy: {self.max_queue} requests are already waiting")
            self._waiting.append(request)
            self._lock.notify()
        return request

    @property
    def active(self) -> int:
        return len(self._rows)

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------ engine side
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._rows:
                    self._lock.wait()
                if self._stopping:
                    break
                joining = []
                while self._waiting and len(self._rows) + len(joining) < self.slots:
                    joining.append(self._waiting.popleft())
            try:
                with torch.inference_mode():
                    self._admit(joining)
                    if self._rows:
                        self._step()
            except Exception as e:  # a bug, or memory: fail the requests in flight, keep serving
                for request in self._requests:
                    request._end(e)
                for request in joining:  # the ones not admitted yet: they would wait forever
                    if not any(request is r for r in self._requests):
                        request._end(e)
                self._rows, self._requests, self._logits = [], [], None
                self._cache = self._k = self._v = self._alone = None
        for request in self._requests + list(self._waiting):
            request._end()

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the joining prompts and add each as a row of the shared batch: short prompts
        all in one native call when the model has the fused decoder (each prefill alone would
        read every weight once more), the others one by one."""
        config = self.model.config
        ready: list[tuple[Request, _Row]] = []
        for request in requests:
            if request.cancelled.is_set():
                request._end()
                continue
            row = new_row(0, request.prompt, request.params, config, self.tokenizer, self.eos, self.device)
            if row.max_new <= 0:
                request._put(Chunk("", [], [], "length"))
                request._end()
                continue
            ready.append((request, row))
        fused = getattr(self.model, "fused_decoder", None)  # None: eager, or a stand-in model
        together = [(q, r) for q, r in ready if fused is not None and len(q.prompt) <= fused.max_prefill]
        alone = ready
        if len(together) > 1:
            width = max(len(q.prompt) for q, _ in together)
            prefill = KVCache(config, len(together), width, dtype=self.dtype, device=self.device)
            logits = fused.prefill_many(self.model, [q.prompt for q, _ in together], prefill)  # (J, 1, V)
            if logits is not None:
                for j, (request, row) in enumerate(together):
                    P = len(request.prompt)
                    self._join(prefill, j, width - P, P)
                    self._add(request, row, logits[j].float())
                alone = [(q, r) for q, r in ready if len(q.prompt) > fused.max_prefill]
        for request, row in alone:
            if self._alone is None:  # one prefill cache for every lone prompt (a new cache object
                # per prefill would also make the native decoder re-check the model's weights)
                self._alone = KVCache(config, 1, config.block_size, dtype=self.dtype, device=self.device)
            self._alone.length = 0
            ids = torch.tensor([request.prompt], device=self.device)
            logits = self.model(ids, self._alone, last_logits_only=True)[:, -1].float()  # (1, V)
            self._join(self._alone, 0, 0, len(request.prompt))
            self._add(request, row, logits)

    def _add(self, request: Request, row: _Row, logits: torch.Tensor) -> None:
        """A joined row's state; logits (1, V): its first token's."""
        self._rows.append(row)
        self._requests.append(request)
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

    def _join(self, source: KVCache, row: int, start: int, P: int) -> None:
        """Put a prefilled prompt (slots start .. start + P - 1 of `source`'s row `row`) into the
        next free cache row, aligned at the end."""
        config = self.model.config
        if self._k is None:  # every slot's rows, allocated once: (slots, n_kv_head, block_size, head_dim)
            shape = (self.slots, config.n_kv_head, config.block_size, config.head_dim)
            self._k = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(config.n_layer)]
            self._v = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(config.n_layer)]
            self._cache = KVCache(config, 0, config.block_size, dtype=self.dtype, device=self.device)
        cache, B = self._cache, len(self._rows)
        if P > cache.length:  # everyone else moves right: their history now starts later
            shift, L = P - cache.length, cache.length
            for full in (*self._k, *self._v):
                full[:B, :, shift:P] = full[:B, :, :L].clone()  # slots before `shift` become padding
            cache.pad = cache.pad + shift
            cache.length = P
        L = cache.length
        for full, own in ((self._k, source.k), (self._v, source.v)):
            for layer in range(config.n_layer):
                full[layer][B, :, L - P:L] = own[layer][row, :, start:start + P]  # slots before L - P: padding
        cache.pad = torch.cat([cache.pad, torch.tensor([L - P], device=self.device)])
        self._use_rows(B + 1)

    def _use_rows(self, B: int) -> None:
        """Point the shared KVCache at the first B rows (views: no copy)."""
        cache = self._cache
        cache.k = [full[:B] for full in self._k]
        cache.v = [full[:B] for full in self._v]
        cache.has_padding = bool(cache.pad.any())

    def _remove(self, rows: list[int]) -> list[int]:
        """Drop finished rows: the last active row moves into each freed one (one row's copy
        each). Returns the new order: row j now holds what row order[j] held."""
        cache = self._cache
        order = list(range(len(self._rows)))
        for i in sorted(rows, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                for full in (*self._k, *self._v):
                    full[i, :, :cache.length] = full[last, :, :cache.length]
                for items in (self._rows, self._requests, order):
                    items[i] = items[last]
                cache.pad[i] = cache.pad[last]
            for items in (self._rows, self._requests, order):
                items.pop()
            cache.pad = cache.pad[:last]
        self._use_rows(len(self._rows))
        return order

    def _compact(self) -> None:
        """Cut the leading slots that every row has as padding (the cache is full)."""
        cache, B = self._cache, len(self._rows)
        cut = int(cache.pad.min())
        if cut == 0:
            raise RuntimeError("KV cache full with a row at the context limit")  # rows stop before this
        for full in (*self._k, *self._v):
            full[:B, :, :cache.length - cut] = full[:B, :, cut:cache.length].clone()
        cache.pad = cache.pad - cut
        cache.length -= cut
        cache.has_padding = bool(cache.pad.any())

    def _step(self) -> None:
        """Sample one token for every active row, emit it, then advance the survivors one step."""
        logits = self._logits
        if self.unused is not None:
            logits[:, self.unused] = float("-inf")
        tokens, done = [], []  # tokens[b]: row b's new token (0 for a row that is leaving)
        # plain greedy rows (the common case) take their tokens from one argmax over the batch
        argmax = logits.argmax(dim=-1).tolist() if any(r.params.plain_greedy for r in self._rows) else None
        for b, (row, request) in enumerate(zip(self._rows, self._requests)):
            if request.cancelled.is_set():
                request._end()
                done.append(b)
                tokens.append(0)
                continue
            # (no per-row tensor ops unless needed: under load each is a chance to lose the GIL)
            if row.params.plain_greedy:
                token = argmax[b]
            else:
                token = int(choose(process_logits(logits[b:b + 1], row.params, row.seen, row.counts),
                                   row.params.greedy, row.generator))
            chunk, finished = _emit(row, token, logits[b] if row.params.logprobs is not None else None)
            request._put(chunk)
            if finished:
                request._end()
                done.append(b)
            tokens.append(token)
        if done:
            order = self._remove(done)
            if not self._rows:
                self._cache.length, self._logits = 0, None  # an empty batch starts over
                return
            tokens = [tokens[j] for j in order]
        if self._cache.length >= self._cache.max_len:
            self._compact()
        step = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        self._logits = self.model(step, self._cache)[:, -1].float()
        self.steps += 1

