"""The paged KV cache and the decode batch: block accounting to the block, attention over
blocks equal to the model's full forward pass, forks that share blocks, beam reordering,
preemption, and the memory a served model needs.

References: the model's own forward pass over the whole sequence without any cache (itself
checked against transformers in test_model_parity.py), and generation row by row.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import emergence
from emergence.config import Config
from emergence.decode import DecodeBatch, end_ids, new_row
from emergence.errors import InvalidArgument
from emergence.kv_cache import CacheView, OutOfBlocks, PagedKVCache
from emergence.model import Transformer
from emergence.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def lm():
    return emergence.load(device="cpu")


def full_forward_logits(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) float32: the next-token logits at every position, no cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float()


# --------------------------------------------------------------------- block accounting
def test_blocks_are_taken_shared_copied_on_write_and_freed_exactly():
    config = Config.from_name("tiny-llama")
    cache = PagedKVCache(config, 6, block_size=4)
    assert (cache.num_free, cache.num_used) == (6, 0)
    a: list[int] = []
    cache.grow(a, 0, 6)  # 6 tokens: 2 blocks, the lowest ids first
    assert a == [0, 1] and cache.num_free == 4
    cache.k[:, 1] = 7.0
    b = cache.fork(a)  # shares both blocks
    assert b == a and cache.num_free == 4
    assert cache.blocks_needed(b, 6, 1) == 1  # its last block is shared and only half full: one copy
    cache.grow(b, 6, 1)
    assert b[0] == 0 and b[1] not in (0, 1) and cache.num_free == 3
    assert torch.equal(cache.k[:, b[1]], cache.k[:, 1])  # the copy carries the tokens written so far
    assert cache.blocks_needed(a, 6, 1) == 0  # a's last block is its own again
    cache.grow(a, 6, 2)  # 8 tokens: still 2 blocks
    assert a == [0, 1]
    assert cache.blocks_needed(a, 8, 1) == 1  # a full block is never written again: a new one
    cache.release(b)
    assert b == [] and cache.num_free == 4  # block 0 is still a's
    with pytest.raises(OutOfBlocks):
        cache.grow(a, 8, 100)  # needs 25 more blocks
    assert a == [0, 1] and cache.num_free == 4  # nothing changed
    cache.release(a)
    assert cache.num_free == 6 and cache.num_used == 0


def test_a_block_handed_out_again_holds_zeros():
    cache = PagedKVCache(Config.from_name("tiny-llama"), 2, block_size=4)
    table: list[int] = []
    cache.grow(table, 0, 3)
    cache.k[:, table[0]] = float("nan")
    cache.release(table)
    cache.grow(table, 0, 1)
    assert torch.equal(cache.k[:, table[0]], torch.zeros_like(cache.k[:, table[0]]))


def test_memory_budget_to_blocks():
    config = Config.from_name("tiny-llama")
    per_block = PagedKVCache.block_bytes(config)
    assert per_block == 2 * config.n_layer * config.n_kv_head * 64 * config.head_dim * 4
    assert PagedKVCache.blocks_in(10 * per_block + per_block - 1, config) == 10
    with pytest.raises(InvalidArgument, match="at least one block"):
        PagedKVCache(config, 0)


# ------------------------------------------------------------- attention over blocks
@pytest.mark.parametrize("block_size", [1, 3, 16, 64])
def test_chunked_prefill_over_blocks_equals_the_full_forward(hf_model, block_size):
    # Every family (Mistral's window of 8 included): a prompt fed in chunks of 5, 1, 13 and 1
    # tokens through the eager backend over blocks of 1 to 64 slots gives, at every chunk's
    # last token, the logits of the forward pass over the whole sequence.
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", backend="eager")
    torch.manual_seed(11)
    ids = torch.randint(3, 96, (20,)).tolist()
    cache = PagedKVCache(lm.config, 64 // block_size + 1, block_size=block_size)
    batch = DecodeBatch(lm.model, lm.tokenizer, cache, backend="eager")
    table, length, got = [], 0, []
    for n in (5, 1, 13, 1):
        chunk = ids[length:length + n]
        cache.grow(table, length, n)
        got.append(batch.backend.forward([chunk], [length], [table])[0])
        length += n
    expected = full_forward_logits(lm.model, ids)[[4, 5, 18, 19]]
    assert (torch.stack(got) - expected).abs().max().item() <= 1e-5


def test_a_mask_with_a_cache_is_refused(lm):
    cache = PagedKVCache(lm.config, 2)
    table: list[int] = []
    cache.grow(table, 0, 3)
    view = CacheView(cache, cache.tables([table]), torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(InvalidArgument, match="attention_mask applies to a batch without a KV cache"):
        lm.model(torch.tensor([[1, 5, 6]]), view, attention_mask=torch.ones(1, 3))


# ------------------------------------------------------------------- the decode batch
def _rows(lm, prompts, params=GREEDY):
    eos = end_ids(lm.config, lm.tokenizer)
    return [new_row(i, lm.tokenizer.encode(p), params, lm.config, lm.tokenizer, eos, torch.device("cpu"))
            for i, p in enumerate(prompts)]


def _run(batch: DecodeBatch) -> None:
    while batch.rows:
        batch.step()


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_forked_rows_share_the_prompt_and_sample_as_separate_rows(lm, backend):
    # n samples of one prompt: one prefill, blocks shared until each child writes its own.
    prompt = lm.tokenizer.encode("Once upon a time there was a little girl named Lily. She loved to play")
    assert 16 < len(prompt) < 31  # a full block and a partly filled one
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_new_tokens=30, ignore_eos=True) for s in range(4)]
    expected = [lm.complete(prompt, **dataclasses.asdict(p)).token_ids for p in params]
    cache = PagedKVCache(lm.config, 40, block_size=16)
    batch = DecodeBatch(lm.model, lm.tokenizer, cache, backend=backend)
    first = batch.new_row(prompt, params[0], 0)
    batch.admit([first])
    prompt_blocks = cache.num_used
    assert prompt_blocks == cache.blocks_for(len(prompt)) == 2
    children = [batch.child(first, p, i) for i, p in enumerate(params[1:], 1)]
    batch.fork(first, children)
    assert cache.num_used == prompt_blocks  # nothing copied yet
    rows = [first, *children]
    batch.step()
    # each of the 4 rows now owns a copy of the half-full last block; the first block is shared
    assert cache.num_used == 1 + 4
    _run(batch)
    assert [r.token_ids for r in rows] == expected
    assert cache.num_used == 0


def test_reordered_rows_continue_their_parents_sequences(lm):
    # Beam search's reorder: row i continues parents[i] (one parent twice, one dropped) without
    # copying any block; each row's next logits equal the full forward pass over its sequence.
    rows = _rows(lm, ["Once upon a time", "Lily saw a big dog", "The sun"])
    batch = DecodeBatch.for_rows(lm.model, lm.tokenizer, rows + rows)  # room for the copies on write
    batch.admit(rows)
    fed = {id(r): list(r.prompt) for r in rows}
    for _ in range(5):
        tokens = [int(t) for t in batch.logits.argmax(-1)]
        for row, token in zip(batch.rows, tokens):
            fed[id(row)].append(token)
        batch.advance(tokens)
    parents = [rows[2], rows[0], rows[2]]
    children = [batch.child(p) for p in parents]
    used, dropped = batch.cache.num_used, len(rows[1].blocks)
    parent_logits = batch.logits[[2, 0, 2]].clone()
    batch.reorder(parents, children)
    assert batch.rows == children and torch.equal(batch.logits, parent_logits)
    assert batch.cache.num_used == used - dropped  # the dropped row's blocks freed, nothing copied
    forced = [7, 8, 9]
    batch.advance(forced)
    for b, child in enumerate(children):
        sequence = fed[id(parents[b])] + [forced[b]]
        assert child.length == len(sequence)
        assert (batch.logits[b] - full_forward_logits(lm.model, sequence)[-1]).abs().max().item() <= 1e-4


def test_preempted_rows_resume_with_the_same_tokens(lm):
    # A cache too small for four long rows at once: the last admitted rows are pushed out when
    # blocks run short, admitted again later (prompt and generated tokens recomputed), and
    # every row ends with exactly the tokens it generates alone.
    prompts = ["Once upon a time", "Lily saw a big dog", "The sun was hot", "Tom had a red ball"]
    params = SamplingParams(temperature=0, max_new_tokens=120, ignore_eos=True)
    expected = [lm.complete(p, **dataclasses.asdict(params)).token_ids for p in prompts]
    rows = _rows(lm, prompts, params)
    cache = PagedKVCache(lm.config, 20, block_size=16)  # 320 slots; the four rows grow to 4 x ~125 tokens
    batch = DecodeBatch(lm.model, lm.tokenizer, cache)
    batch.admit(rows)
    waiting, preemptions = [], 0
    while batch.rows or waiting:
        if waiting and cache.num_free >= cache.blocks_for(len(waiting[0].history)) + len(batch.rows) + 1:
            batch.admit([waiting.pop(0)])
        batch.step()
        preemptions += len(batch.preempted)
        waiting += batch.preempted
        batch.preempted.clear()
    assert preemptions >= 2
    assert [r.token_ids for r in rows] == expected
    assert cache.num_used == 0


def test_the_engine_hands_a_token_over_before_the_next_forward_pass(lm, monkeypatch):
    # BatchEngine._step delivers each row's chunk through DecodeBatch.step's `deliver`, before the
    # batch advances: a client has its token while the next step computes, not a step later.
    from emergence.serve.engine import BatchEngine

    prompt, params = list(range(3, 12)), SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)
    plain = lm.complete(prompt, temperature=0, max_new_tokens=4, ignore_eos=True).token_ids
    engine = BatchEngine(lm.model, lm.tokenizer, slots=2)
    handed = []  # at each forward pass of the engine's batch: the tokens handed over so far
    advance = DecodeBatch.advance

    def watched(batch, tokens):
        if batch is engine.batch and tokens:  # (a finished row's step advances nothing)
            handed.append(engine.generated)
        return advance(batch, tokens)

    monkeypatch.setattr(DecodeBatch, "advance", watched)
    try:
        tokens = [t for chunk in engine.submit(prompt, params) for t in chunk.token_ids]
    finally:
        engine.close()
    assert tokens == plain
    # the passes after the 1st, 2nd and 3rd tokens (the 4th ends the row: no pass), each with
    # that token already handed over
    assert handed == [1, 2, 3]


# ------------------------------------------------------------------ memory for serving
def test_llama_3_2_1b_serves_8_slots_within_2_gib_of_kv_cache():
    # llama-3.2-1b keeps 16 layers x 8 KV heads x 64 dims: 64 KiB of fp32 keys and values per
    # token. A contiguous cache of slots x context would need 8 x 131,072 tokens = 64 GiB; the
    # paged cache with --context 4096 and --kv-memory 2GiB holds 8 full contexts, exactly.
    from emergence.serve.engine import BatchEngine

    real = Config.from_name("llama-3.2-1b")
    assert PagedKVCache.block_bytes(real, 1) == 64 * 2**10
    assert 8 * real.block_size * PagedKVCache.block_bytes(real, 1) == 64 * 2**30
    # the same KV shapes at a reduced width and vocabulary (random weights), to decode here
    config = dataclasses.replace(real, vocab_size=512, n_embd=256, n_head=8, head_dim=64, intermediate_size=64,
                                 tie_embeddings=False, bos_token_id=1, eos_token_id=2)
    assert PagedKVCache.block_bytes(config) == PagedKVCache.block_bytes(real)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    tokenizer = emergence.load().tokenizer  # 512 tokens, as this vocabulary
    engine = BatchEngine(model, tokenizer, slots=8, context=4096, kv_memory=2 * 2**30)
    try:
        assert engine.cache.nbytes == 2 * 2**30 and engine.cache.num_blocks * engine.cache.block_size == 8 * 4096
        prompt = list(range(3, 35))
        long = SamplingParams(temperature=0, max_new_tokens=4096 - len(prompt), ignore_eos=True)
        requests = [engine.submit(prompt, long) for _ in range(8)]
        chunks = [next(iter(r)) for r in requests]  # every request is decoding
        assert all(len(c.token_ids) == 1 for c in chunks)
        assert engine.active == 8
        # memory follows the tokens held: 8 rows of ~33 tokens hold one block each, not 8 contexts
        assert engine.cache.num_used == 8
        with pytest.raises(InvalidArgument, match="exceed the context of 4096"):
            engine.submit(prompt, dataclasses.replace(long, max_new_tokens=4096))
    finally:
        for r in requests:
            r.cancel()
        engine.close()


def test_a_budget_below_one_context_is_refused(lm):
    from emergence.serve.engine import BatchEngine

    with pytest.raises(InvalidArgument, match="less than one context of 512"):
        BatchEngine(lm.model, lm.tokenizer, kv_memory=PagedKVCache.block_bytes(lm.config) * 3)
