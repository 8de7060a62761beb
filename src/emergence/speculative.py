"""Speculative decoding: a small draft model proposes k tokens, the target verifies them in one pass.

Leviathan et al. (2023) and Chen et al. (2023). A round, for one row of a decode batch:

1. the draft model, keeping its own KV cache in step with the row's history, proposes
   x_1 .. x_k, each drawn from its distribution q_i under the row's sampling parameters;
2. the target runs [t, x_1, .., x_k] through its cache in one forward pass (t: the row's last
   token, not yet in its cache), which gives its distributions p_0 .. p_k, p_i judging x_{i+1};
3. x_i is accepted with probability min(1, p(x_i) / q(x_i)); at the first rejection the row
   takes a token from the residual max(0, p - q), renormalised; if all k are accepted, one
   more from p_k. At temperature 0 "accepted" means "the target's argmax", so the output is
   the target's own greedy decoding, token for token;
4. both caches are truncated to what was accepted: the target's to the history but its new
   last token (which the next round feeds first), the draft's to what it computed of it.

Every round emits 1 .. k+1 tokens at the cost of k draft steps and one target pass over k+1
tokens, which reads the target's weights once, as a one-token step does. Each emitted token goes
through the row's own `emit` (stop ids and strings, budget, streamed text, logprobs), so a
speculative row's output is what its plain decoding would emit.

A row may be decoded this way when its next token depends only on the logits at its position:
no repetition, presence or frequency penalty, no n-gram ban, no grammar, one sequence (no beams).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .decode import Chunk, DecodeBatch, Row
from .errors import InvalidArgument
from .kv_cache import DEFAULT_BLOCK_SIZE, PagedKVCache
from .model import Transformer
from .sampling import SamplingParams, argmax_ids, choose, process_logits
from .tokenizer import Tokenizer

DEFAULT_DRAFT_TOKENS = 4  # k: tokens the draft proposes per round


def eligible(params: SamplingParams) -> bool:
    """Whether a row with these parameters may be decoded speculatively (the module docstring)."""
    return (not params.needs_history and not params.no_repeat_ngram_size and params.constraint is None
            and params.num_beams == 1)


def check_draft(target: Transformer, draft: Transformer, target_tokenizer: Tokenizer,
                draft_tokenizer: Tokenizer | None) -> None:
    """Refuse, in one line, a draft model that cannot propose the target's tokens."""
    tc, dc = target.config, draft.config
    if dc.is_encoder_decoder or tc.is_encoder_decoder:
        raise InvalidArgument("speculative decoding needs decoder-only target and draft models")
    if draft_tokenizer is not None and draft_tokenizer.fingerprint() != target_tokenizer.fingerprint():
        raise InvalidArgument("the draft model's tokenizer differs from the target's: its tokens would not be the "
                              "target's (use a draft trained with the same tokenizer)")
    if dc.vocab_size < target_tokenizer.vocab_size:
        raise InvalidArgument(f"the draft model's vocabulary ({dc.vocab_size}) is smaller than the target's "
                              f"tokenizer ({target_tokenizer.vocab_size})")


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a probability vector (V,), drawn as sampling.choose draws from logits."""
    return int(choose(probs.log()[None], False, generator))


def accept(p: torch.Tensor, q: torch.Tensor, drafts: list[int], greedy: bool,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """The rejection scheme on distributions: p (k+1, V) the target's at each drafted position
    and after the last, q (k, V) the draft's, drafts the k tokens drawn from q. Returns (j, t):
    the first j drafts are accepted and t is the token that follows them (from the residual at
    a rejection, or from p[k] when all are accepted). Greedy: p holds logits and a draft is
    accepted when it is p's argmax, t being the argmax where it was not (q is not read)."""
    if greedy:  # one argmax over every position (a call per position costs more than the search)
        best = argmax_ids(p)
        j = next((i for i, x in enumerate(drafts) if best[i] != x), len(drafts))
        return j, best[j]
    for i, x in enumerate(drafts):
        if float(torch.rand(1, generator=generator)) * float(q[i, x]) >= float(p[i, x]):  # u >= p/q: rejected
            residual = (p[i] - q[i]).clamp(min=0)
            total = float(residual.sum())
            return i, _draw(residual / total if total > 0 else p[i], generator)
    k = len(drafts)
    return k, _draw(p[k], generator)


class Speculator:
    """A draft model following rows of a target DecodeBatch and decoding them speculatively.

    One per target batch. The row it decodes gets a draft row in the draft's own paged KV
    cache (room for one full context: one row is drafted for at a time). `round(batch, row)` runs one round and returns the
    chunks emitted; afterwards the row owes its last token to the target's cache (`owed`), and
    `settle` feeds it, giving the row its pending logits again, before the row steps with others.
    """

    def __init__(self, draft: Transformer, tokenizer: Tokenizer, *, k: int = DEFAULT_DRAFT_TOKENS,
                 backend: str = "auto") -> None:
        if not 1 <= k <= 32:
            raise InvalidArgument(f"the draft's tokens per round must be in [1, 32], got {k}")
        self.model, self.tokenizer, self.k = draft, tokenizer, k
        config = draft.config
        blocks = -(-config.block_size // DEFAULT_BLOCK_SIZE) + 1  # one row's full context (one row drafts at a time)
        cache = PagedKVCache(config, blocks, dtype=draft.dtype, device=draft.device)
        self.batch = DecodeBatch(draft, tokenizer, cache, backend=backend)
        self._drafts: dict[int, tuple[Row, torch.Generator | None]] = {}  # target row id -> its draft row
        self.owed: set[int] = set()  # ids of target rows whose last token is not yet in the target's cache
        self.rounds = self.drafted = self.accepted = 0

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the target accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    def round(self, batch: DecodeBatch, row: Row) -> list[Chunk]:
        """One round for `row` (in `batch`, with pending logits or owing its last token); the
        chunks it emitted, the last one finishing the row when it is done."""
        chunks = []
        if id(row) not in self.owed:  # first its token from the pending logits, as a plain step would
            b = batch._index(row)
            logits = batch.logits[b:b + 1]
            if batch.unused is not None:
                logits[:, batch.unused] = float("-inf")
            token = argmax_ids(logits)[0] if row.params.plain_greedy else row.choose(logits)
            chunk, done = row.emit(token, logits[0] if row.params.logprobs is not None else None)
            chunks.append(chunk)
            if done:
                return chunks
            self.owed.add(id(row))
        history = row.history
        budget = row.max_new - len(row.token_ids)  # tokens it may still emit (>= 1)
        k = max(0, min(self.k, budget - 1, batch.config.block_size - len(history),
                       self.model.config.block_size - len(history)))
        vocab = min(batch.config.vocab_size, self.model.config.vocab_size)  # (padded rows past it are never chosen)
        drafts, q = self._propose(row, history, k, vocab)
        start = row.length
        p = batch.extend(row, [history[-1]] + drafts)  # (k + 1, V) raw logits
        if batch.unused is not None:
            p[:, batch.unused] = float("-inf")
        p = p[:, :vocab]
        greedy = row.params.greedy
        processed = process_logits(p, row.params)
        j, token = accept(processed if greedy else processed.softmax(-1), q, drafts, greedy, row.generator)
        self.rounds += 1
        self.drafted += k
        self.accepted += j
        done = False
        for i, t in enumerate(drafts[:j] + [token]):
            chunk, done = row.emit(t, p[i] if row.params.logprobs is not None else None)
            chunks.append(chunk)
            if done:
                break
        if done:
            self.owed.discard(id(row))
            self.release(row)
            return chunks
        batch.truncate(row, start + 1 + j)  # the fed last token and the accepted drafts
        found = self._drafts.get(id(row))  # (none yet when nothing could be drafted: k = 0)
        if found is not None:
            self.batch.truncate(found[0], min(found[0].length, len(history) + j))
        return chunks

    def _propose(self, row: Row, history: list[int], k: int, vocab: int) -> tuple[list[int], torch.Tensor]:
        """k tokens from the draft after `history`, and the distributions they were drawn from
        (k, vocab): probabilities, or processed logits for a greedy row."""
        if k == 0:
            return [], torch.empty(0)
        found = self._drafts.get(id(row))
        if found is None:
            generator = None
            if row.params.seed is not None and not row.params.greedy:
                generator = torch.Generator().manual_seed(row.params.seed + 0x5EED)
            # (a row of the draft's cache only: it never chooses or emits, the target's row does)
            found = self._drafts[id(row)] = (Row(None, row.params, [], 0, None, None, set()), generator)
        draft_row, generator = found
        logits = self.batch.extend(draft_row, history[draft_row.length:], every=False)  # (1, V): the last's
        drafts, dists = [], []
        greedy = row.params.greedy  # (accept needs no distributions then: q is not read)
        for i in range(k):
            if self.batch.unused is not None:
                logits[:, self.batch.unused] = float("-inf")
            processed = process_logits(logits[:, :vocab], row.params)
            if greedy:
                token = argmax_ids(processed)[0]
            else:
                dists.append(processed.softmax(-1)[0])
                token = _draw(dists[-1], generator)
            drafts.append(token)
            if i < k - 1:
                logits = self.batch.extend(draft_row, [token])
        return drafts, torch.stack(dists) if dists else torch.empty(0)

    def settle(self, batch: DecodeBatch, row: Row) -> None:
        """Feed the row's owed last token: it has pending logits again, as every row of a
        stepping batch must."""
        if id(row) in self.owed:
            self.owed.discard(id(row))
            logits = batch.extend(row, [row.history[-1]])[-1:]
            b = batch._index(row)
            batch.logits[b:b + 1] = logits

    def reset(self) -> None:
        """Forget every row (their batch is gone): the draft cache is emptied."""
        self.batch.remove([draft_row for draft_row, _ in self._drafts.values()])
        self._drafts.clear()
        self.owed.clear()

    def release(self, row: Row) -> None:
        """The row is done or leaves speculation: its draft row's blocks are freed."""
        found = self._drafts.pop(id(row), None)
        if found is not None:
            self.batch.remove([found[0]])
        self.owed.discard(id(row))


def speculative_row(model: Transformer, tokenizer: Tokenizer, row: Row, speculator: Speculator,
                    backend: str = "auto") -> Iterator[tuple[object, Chunk]]:
    """Decode one row alone, speculatively: (its tag, chunk) for every chunk, to the end."""
    batch = DecodeBatch.for_rows(model, tokenizer, [row], backend=backend)
    batch.admit([row])
    try:
        while True:
            for chunk in speculator.round(batch, row):
                yield row.tag, chunk
                if chunk.finish_reason:
                    return
    finally:
        speculator.release(row)
        batch.remove([row])
