"""Continuous batching: requests join and leave one decode batch, step by step.

One worker thread owns a `DecodeBatch` (decode.py) over a paged KV cache of a fixed memory
budget. Each loop it admits waiting requests into free slots (their prompts prefilled
together in one forward pass; the n choices of one prompt prefill it once and fork, sharing
its blocks), runs ONE step for every active row together (on the CPU one native call: each
weight is read once for all rows), hands each request its chunk, and drops the rows that
finished or whose client went away. A request never waits for another to finish: it waits
at most for a free slot, free blocks and one step.

Memory follows the tokens held: blocks are taken as rows grow and freed when they leave. A
request is admitted when the cache has blocks for its prompt with one block to spare for
every row's next step; when a step still finds too few, the most recently admitted rows are
preempted (their blocks freed) and wait at the front of the queue, to be prefilled again
with the tokens they generated; what they already sent stands. A request that could not
finish even alone in the cache is refused when it is submitted.

With prefix caching (on by default, kv_cache.py) the blocks rows fill stay cached after they
leave, until the pool needs them: a request whose prompt starts with a cached prefix (a shared
system prompt, the conversation so far) prefills only the rest, and a preempted row only what
was evicted meanwhile. Results are those of a cold run (tests/test_prefix_cache.py).

With a draft model (speculative.py), a request decoded alone (one row in the batch, nobody
waiting, sampling parameters that allow it) advances by speculative rounds of up to k + 1
tokens instead of one step; when others join, its owed token is fed and it steps with them.

An idle engine holds its first prefill while more requests are arriving: the HTTP layer says
when it starts taking one in (`arriving`: reading, validating, tokenizing) and when it has
submitted it or given up, and the engine waits, at most `admission_window` seconds after the
first waiting request came, until none is still arriving. A wave of requests (many clients
at once) is then prefilled in one forward pass, and the HTTP layer parses the wave without
forward passes competing for the cores and the GIL, instead of a prefill per request or two
interleaved with the parsing; a request alone waits for nothing. A busy engine never holds:
its rows keep stepping and take the newcomers in at the next step. While requests arrive at
an idle engine, it also keeps its thread team awake (kernels.wake_thread_team), so the prefill
does not wait for sleeping workers to wake.

A beam search, an embedding job and a test-time search (`submit_call`: the server's `search`
field) wait in the same queue and run whole in the engine's thread between two steps: the
rows in the batch pause meanwhile, and the model is never run by two threads at once.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..beam import check_beam_params
from ..decode import Chunk, DecodeBatch, Row, check_memory
from ..errors import InvalidArgument
from ..generate import beam_generate
from ..kernels import release_thread_pool, wake_thread_team
from ..kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from ..model import Transformer
from ..sampling import SamplingParams
from ..speculative import Speculator, eligible
from ..tokenizer import Tokenizer


# After each step the engine's thread steps aside (sched_yield, the GIL released) for a thread
# waiting for its core: the event loop, taking requests in. Without it a fast small batch ran
# back to back holding the GIL but in its forward passes, while its thread team kept the other
# core, and the loop, able to run only with both a core and the GIL, could wait out a whole
# short completion before it accepted the next connections (the time to first token of a wave
# of clients arriving while one request decodes; bench/bench_serve_peers.py). Costs a system
# call a step when nothing else waits.
yield_cpu = getattr(os, "sched_yield", lambda: None)

# How often an idle engine wakes its thread team while requests are arriving: well inside the
# time libgomp's idle workers spin before they sleep.
TEAM_WAKE_SECONDS = 0.002


@dataclass(eq=False)
class Request:
    """A submitted completion. Its `sink` receives (tag, Chunk) items, then (tag, None) at the
    end, or (tag, exception) if the engine failed; several requests may share one sink (the
    choices of one HTTP response). Iterating a request with its own sink yields its chunks."""

    prompt: list[int]
    params: SamplingParams
    sink: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    tag: int = 0
    adapter: str | None = None  # the model's adapter to run through (None: the active one)
    cancelled: threading.Event = field(default_factory=threading.Event)
    cached_tokens: int | None = None  # prompt tokens taken from the prefix cache (None: not yet admitted)

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


@dataclass(eq=False)
class EmbeddingJob:
    """Token id lists to embed (the mean of the final hidden states); the sink receives
    (0, [vector (D,) per input]) then (0, None), or (0, exception)."""

    inputs: list[list[int]]
    sink: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


@dataclass(eq=False)
class CallJob:
    """A function run whole in the engine's thread, between two steps of the batch (the server's
    test-time search: it decodes on the model the batch uses, so it must not run beside a step).
    The sink receives (0, its result) or (0, the exception it raised); a job cancelled before
    its turn is not run, and its sink receives (0, None)."""

    fn: Callable[[], Any]
    sink: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass(eq=False)
class _Waiting:
    """Requests for one prompt that join together (they share its prefill), one preempted row,
    or an embedding job."""

    requests: list[Request]
    row: Row | None = None  # a preempted row: it resumes with its history
    embedding: EmbeddingJob | None = None
    call: CallJob | None = None
    beams: bool = False  # the requests are the returned beams of one beam search
    since: float = field(default_factory=time.perf_counter)  # when it was queued

    @property
    def tokens(self) -> int:
        return len(self.row.history) if self.row is not None else len(self.requests[0].prompt)


class BatchEngine:
    """`submit()` from any thread; the engine's own thread decodes every active request together.

    context: the longest sequence (prompt and completion) a request may have, at most the
    model's window. kv_memory: the KV cache's budget in bytes (default: room for every slot to
    hold a full context); with prefix_caching, blocks no row holds keep their prefixes within it.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, slots: int = 8, max_queue: int = 256,
                 context: int | None = None, kv_memory: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 backend: str = "auto", prefix_caching: bool = True, draft: Speculator | None = None,
                 admission_window: float = 0.01) -> None:
        config = model.config
        if slots < 1:
            raise InvalidArgument(f"slots must be at least 1, got {slots}")
        self.context = config.block_size if context is None else context
        if not 1 < self.context <= config.block_size:
            raise InvalidArgument(f"the context must be in [2, {config.block_size}] (the model's window), "
                                  f"got {self.context}")
        dtype, device = model.dtype, model.device
        per_block = PagedKVCache.block_bytes(config, block_size, dtype)
        per_context = -(-self.context // block_size)
        if kv_memory is None:
            kv_memory = slots * per_context * per_block
        blocks = kv_memory // per_block
        if blocks < per_context:
            raise InvalidArgument(f"a KV budget of {kv_memory / 2**20:.1f} MiB holds {blocks * block_size} tokens, "
                                  f"less than one context of {self.context} ({per_block * per_context / 2**20:.1f} "
                                  f"MiB at {PagedKVCache.block_bytes(config, 1, dtype) // 1024} KiB a token); raise "
                                  "the KV memory or lower the context")
        check_memory(blocks * per_block, device, f"a KV cache of {blocks * block_size} tokens",
                     "lower the KV memory, the context or the slots")
        self.model, self.tokenizer = model, tokenizer
        self.slots, self.max_queue = slots, max_queue
        self.cache = PagedKVCache(config, blocks, block_size=block_size, dtype=dtype, device=device)
        self.cache.prefix_caching = self.prefix_caching = prefix_caching
        self.backend = backend
        self.cpu = device.type == "cpu"  # (the thread team to keep awake is the CPU's)
        self.batch = DecodeBatch(model, tokenizer, self.cache, backend=backend)
        self.speculator = draft  # decodes a lone request speculatively (None: never)
        self._waiting: deque[_Waiting] = deque()
        self._lock = threading.Condition()
        self._stopping = False
        self.admission_window = admission_window
        self._arriving = 0  # requests the HTTP layer is taking in (see `arriving`)
        self._arrived_at = float("-inf")  # when the latest of them began
        self.holds = 0  # prefills held for arriving requests
        self.preemptions = 0  # rows pushed out for lack of blocks
        self.generated = 0  # tokens generated since the start
        self.prompt_tokens = 0  # prompt tokens of the rows admitted (each prompt once, whatever n)
        self.cached_tokens = 0  # ... of which taken from the prefix cache
        self.busy_seconds = 0.0  # time admitting and stepping (prefills, forward passes, sampling, emission)
        release_thread_pool()  # the engine's thread does the parallel work from now on
        self._thread = threading.Thread(target=self._run, name="emergence-batch-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------ client side
    def submit(self, prompt: list[int], params: SamplingParams, *, sink: queue.SimpleQueue | None = None,
               tag: int = 0, adapter: str | None = None) -> Request:
        """Queue a completion of `prompt` (token ids)."""
        return self.submit_choices(prompt, [params], sink=sink, tags=[tag], adapter=adapter)[0]

    def submit_choices(self, prompt: list[int], params: list[SamplingParams], *,
                       sink: queue.SimpleQueue | None = None, tags: list[int] | None = None,
                       adapter: str | None = None) -> list[Request]:
        """Queue several completions of one prompt (the n choices of a request): they share its
        prefill and its KV blocks. All share `sink`; tags name them there. `adapter`: one of the
        model's adapters (rows of one batch may each use another, sharing the base weights)."""
        sink = sink if sink is not None else queue.SimpleQueue()
        tags = tags if tags is not None else list(range(len(params)))
        for p in params:
            self._check(prompt, p)
        requests = [Request(list(prompt), p, sink, t, adapter=adapter) for p, t in zip(params, tags)]
        beams = params[0].num_beams > 1
        if beams and (adapter is not None or len(params) != params[0].num_return_sequences):
            raise InvalidArgument("a beam search runs on the base model and returns num_return_sequences choices")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise InvalidArgument(f"the server is busy: {self.max_queue} requests are already waiting")
            if beams:
                self._waiting.append(_Waiting(requests, beams=True))
                self._lock.notify()
                return requests
            for i in range(0, len(requests), self.slots):  # more choices than slots: several groups
                self._waiting.append(_Waiting(requests[i:i + self.slots]))
            self._lock.notify()
        return requests

    def submit_embedding(self, inputs: list[list[int]], *, sink=None) -> EmbeddingJob:
        """Queue an embedding job: it waits in the same queue as completions (and counts against
        max_queue), and runs in the engine's thread between two steps."""
        for ids in inputs:
            if not ids or len(ids) > self.model.config.block_size:
                raise InvalidArgument(f"an input of {len(ids)} tokens (1 to {self.model.config.block_size})")
        job = EmbeddingJob([list(ids) for ids in inputs], sink if sink is not None else queue.SimpleQueue())
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise InvalidArgument(f"the server is busy: {self.max_queue} requests are already waiting")
            self._waiting.append(_Waiting([], embedding=job))
            self._lock.notify()
        return job

    def submit_call(self, fn: Callable[[], Any], *, sink=None) -> CallJob:
        """Queue fn() to run whole in the engine's thread between two steps (CallJob); it waits in
        the same queue as completions and counts against max_queue."""
        job = CallJob(fn, sink if sink is not None else queue.SimpleQueue())
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise InvalidArgument(f"the server is busy: {self.max_queue} requests are already waiting")
            self._waiting.append(_Waiting([], call=job))
            self._lock.notify()
        return job

    def reset_counters(self) -> None:
        """Zero the counters (a server's warm-up is not traffic it served), in the engine's thread
        between two steps so that no step's accounting straddles the reset; returns when done."""

        def zero() -> None:
            self.holds = self.preemptions = self.generated = self.prompt_tokens = self.cached_tokens = 0
            self.busy_seconds = self.batch.forward_seconds = 0.0

        _, outcome = self.submit_call(zero).sink.get()
        if isinstance(outcome, BaseException):
            raise outcome

    def arriving(self) -> Callable[[], None]:
        """A request is being taken in (read, validated, tokenized) and will likely be submitted:
        until the returned function is called (once it is submitted, or has failed; later calls
        do nothing), an idle engine holds its next prefill, up to admission_window seconds, so
        that the request joins it."""
        with self._lock:
            self._arriving += 1
            self._arrived_at = time.perf_counter()
            self._lock.notify()  # an idle engine wakes its team meanwhile
        done = False

        def arrived() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                self._arriving -= 1
                if not self._arriving:
                    self._lock.notify()

        return arrived

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def incoming(self) -> int:
        """Requests the HTTP layer is taking in (see `arriving`)."""
        return self._arriving

    def _check(self, prompt: list[int], params: SamplingParams) -> None:
        params.check_vocabulary(self.model.config.vocab_size)
        check_beam_params(params)
        if not prompt:
            raise InvalidArgument("the prompt is empty")
        if self.model.config.is_encoder_decoder:  # the prompt is the encoder's
            if len(prompt) > self.context or params.max_new_tokens >= self.context:
                raise InvalidArgument(f"a source of {len(prompt)} tokens and max_tokens {params.max_new_tokens} "
                                      f"must each fit the context of {self.context}")
            return
        total = len(prompt) + params.max_new_tokens
        if len(prompt) >= self.context or total > self.context:
            raise InvalidArgument(f"{len(prompt)} prompt tokens + max_tokens {params.max_new_tokens} exceed the "
                                  f"context of {self.context}")

    @property
    def active(self) -> int:
        return len(self.batch.rows)

    @property
    def steps(self) -> int:
        return self.batch.steps

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------ engine side
    def _run(self) -> None:
        while self._work():
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    self._admit()
                    self._step()
            except Exception as e:  # a bug, or memory: fail the requests in flight, keep serving
                with self._lock:
                    waiting, self._waiting = list(self._waiting), deque()
                for row in self.batch.rows + self.batch.preempted + [w.row for w in waiting if w.row is not None]:
                    row.tag._end(e)
                for w in waiting:  # queued requests are failed too: the cache they would use is gone
                    if w.embedding is not None:
                        w.embedding.sink.put((0, e))
                    elif w.call is not None:
                        w.call.sink.put((0, e))
                    elif w.row is None:
                        for request in w.requests:
                            request._end(e)
                self.batch = DecodeBatch(self.model, self.tokenizer,
                                         PagedKVCache(self.model.config, self.cache.num_blocks,
                                                      block_size=self.cache.block_size, dtype=self.cache.dtype,
                                                      device=self.cache.device), backend=self.backend)
                self.cache = self.batch.cache
                self.cache.prefix_caching = self.prefix_caching
                if self.speculator is not None:
                    self.speculator.reset()
            self.busy_seconds += time.perf_counter() - started
            yield_cpu()
        for row in self.batch.rows:
            row.tag._end()
        for w in self._waiting:
            if w.embedding is not None:
                w.embedding.sink.put((0, InvalidArgument("the server is shutting down")))
            if w.call is not None:
                w.call.sink.put((0, InvalidArgument("the server is shutting down")))
            for request in ([w.row.tag] if w.row is not None else w.requests):
                request._end()

    def _work(self) -> bool:
        """Wait until there is work to do now (False: the engine is stopping). Idle with requests
        arriving, it holds the waiting ones (at most admission_window seconds after the first was
        queued) and wakes its thread team every TEAM_WAKE_SECONDS meanwhile, up to
        admission_window seconds after the latest request began to arrive (a client sending its
        body slowly does not keep the workers spinning)."""
        held, woken = False, float("-inf")
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self.batch.rows or self._arriving):
                    self._lock.wait()
                if self._stopping:
                    return False
                if self.batch.rows:
                    return True
                now = time.perf_counter()
                wait = woken + TEAM_WAKE_SECONDS - now
                if not self.cpu or now > self._arrived_at + self.admission_window:
                    wait = float("inf")  # no team to wake, or the arrivals are stale
                if self._waiting:
                    left = self._waiting[0].since + self.admission_window - now
                    if not self._arriving or left <= 0:
                        return True
                    self.holds += not held
                    held, wait = True, min(wait, left)
                if wait > 0:
                    self._lock.wait(None if wait == float("inf") else wait)  # (or a submission, an arrival)
                    continue
            wake_thread_team()
            woken = time.perf_counter()

    def _admit(self) -> None:
        """Take waiting requests into free slots while the cache has blocks for their prompts and
        one to spare for every row's next step; prefill them together, then fork the choices."""
        batch, cache = self.batch, self.cache
        joining: list[tuple[Row, list[Row]]] = []  # (row to prefill, rows forked from it)
        embeddings: list[EmbeddingJob] = []
        calls: list[CallJob] = []
        searches: list[list[Request]] = []
        rows, free = len(batch.rows), cache.num_free
        with self._lock:
            while self._waiting and rows < self.slots:
                waiting = self._waiting[0]
                if waiting.embedding is not None:
                    embeddings.append(self._waiting.popleft().embedding)
                    continue
                if waiting.call is not None:
                    calls.append(self._waiting.popleft().call)
                    continue
                if waiting.beams:
                    searches.append(self._waiting.popleft().requests)
                    continue
                if waiting.row is None:
                    for request in [r for r in waiting.requests if r.cancelled.is_set()]:
                        request._end()
                    waiting.requests = [r for r in waiting.requests if not r.cancelled.is_set()]
                    if not waiting.requests:
                        self._waiting.popleft()
                        continue
                elif waiting.row.tag.cancelled.is_set():
                    waiting.row.tag._end()
                    self._waiting.popleft()
                    continue
                take = 1 if waiting.row is not None else min(len(waiting.requests), self.slots - rows)
                need = cache.blocks_for(waiting.tokens)
                if need + (rows + take if rows or joining else 0) > free:
                    break  # first come, first served: later requests wait too
                free -= need
                rows += take
                if waiting.row is not None:
                    self._waiting.popleft()
                    joining.append((waiting.row, []))
                    continue
                members, waiting.requests = waiting.requests[:take], waiting.requests[take:]
                if not waiting.requests:
                    self._waiting.popleft()
                new = [batch.new_row(r.prompt, r.params, r) for r in members]
                for row in new:
                    row.adapter = row.tag.adapter
                for row in [r for r in new if r.max_new <= 0]:  # max_tokens 0: nothing to generate
                    row.tag._put(Chunk("", [], [], "length"))
                    row.tag._end()
                    rows -= 1
                new = [r for r in new if r.max_new > 0]
                if new:
                    joining.append((new[0], new[1:]))
                else:
                    free += need
        for job in embeddings:
            self._embed(job)
        for requests in searches:
            self._search(requests)
        for job in calls:
            self._call(job)
        if joining:
            batch.admit([first for first, _ in joining])
            for first, others in joining:
                if others:
                    batch.fork(first, others)
                if first.tag.cached_tokens is None:  # (not a preempted row joining again)
                    self.prompt_tokens += len(first.prompt)
                    self.cached_tokens += first.cached
                    for request in [first.tag] + [r.tag for r in others]:
                        request.cached_tokens = first.cached

    def _search(self, requests: list[Request]) -> None:
        """A beam search, run whole between two steps of the batch on a KV cache of its own
        (sized for its beams): the requests get the best beams, best first, one chunk each."""
        if all(r.cancelled.is_set() for r in requests):
            for r in requests:
                r._end()
            return
        try:
            found = beam_generate(self.model, self.tokenizer, [requests[0].prompt], [requests[0].params],
                                  backend=self.backend)[0]
        except Exception as e:  # noqa: BLE001 - the client hears of it
            for r in requests:
                r._end(e)
            return
        for request, c in zip(requests, found):
            self.generated += len(c.token_ids)
            request._put(Chunk(c.text, c.token_ids, [], c.finish_reason))
            request._end()
        for request in requests[len(found):]:
            request._end()

    def _call(self, job: CallJob) -> None:
        if job.cancelled.is_set():
            job.sink.put((0, None))
            return
        try:
            result = job.fn()
        except Exception as e:  # noqa: BLE001 - the caller reports it
            job.sink.put((0, e))
            return
        job.sink.put((0, result))

    def _embed(self, job: EmbeddingJob) -> None:
        model = self.model
        try:
            vectors = [model.hidden_states(torch.tensor([ids], device=model.device))[0].float().mean(dim=0).cpu()
                       for ids in job.inputs]  # (D,) each: the mean over the tokens
        except Exception as e:  # noqa: BLE001 - the caller reports it
            job.sink.put((0, e))
            return
        job.sink.put((0, vectors))
        job.sink.put((0, None))

    def _step(self) -> None:
        """One step of the batch: each request gets its chunk; cancelled and finished rows leave;
        preempted rows queue again at the front."""
        batch, speculator = self.batch, self.speculator
        cancelled = [row for row in batch.rows if row.tag.cancelled.is_set()]
        if cancelled:
            batch.remove(cancelled)
            for row in cancelled:
                row.tag._end()
                if speculator is not None:
                    speculator.release(row)
        if speculator is not None and batch.rows:
            alone = batch.rows[0]
            if (len(batch.rows) == 1 and not self._waiting and alone.adapter is None and eligible(alone.params)
                    and self.cache.blocks_needed(alone.blocks, alone.length, speculator.k + 1) <= self.cache.num_free):
                for chunk in speculator.round(batch, alone):
                    self.generated += len(chunk.token_ids)
                    alone.tag._put(chunk)
                    if chunk.finish_reason:
                        batch.remove([alone])
                        alone.tag._end()
                return
            for row in batch.rows:  # they step together now: each with its pending logits
                speculator.settle(batch, row)
                speculator.release(row)

        def deliver(row: Row, chunk: Chunk) -> None:  # before the batch's next forward pass
            self.generated += len(chunk.token_ids)
            row.tag._put(chunk)
            if chunk.finish_reason:
                row.tag._end()

        batch.step(deliver)
        if batch.preempted:
            self.preemptions += len(batch.preempted)
            with self._lock:
                for row in batch.preempted:  # the earliest admitted of them ends up first
                    self._waiting.appendleft(_Waiting([], row))
            batch.preempted.clear()
