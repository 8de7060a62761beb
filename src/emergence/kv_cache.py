"""The paged KV cache: every sequence's keys and values in fixed-size blocks of one pool.

vLLM's PagedAttention layout. The pool holds, for every layer, `num_blocks` blocks of
`block_size` token slots (64 by default):

    k, v: (n_layer, num_blocks, n_kv_head, block_size, head_dim)

A sequence owns a block table, the list of its blocks in order: its token t sits in block
table[t // block_size] at offset t % block_size. Memory therefore follows the tokens held, not
rows x context. Sequences forked from one another (n samples of one prompt, beams) share
blocks through reference counts; a shared block is copied before it is written (copy on
write), which only ever happens to a sequence's last, partly filled block, because full
blocks are never written again.

A block is zeroed when it is handed out, so that its slots not yet written hold zeros rather
than uninitialised memory: the eager attention multiplies masked values by a zero weight, and
0 * NaN would be NaN. (For the same reason a batch's shorter tables are padded with the row's
own first block, whose masked slots hold finite values.)

On the CPU the pool is one untouched allocation: the operating system gives it pages only
as blocks are written, so even a large budget costs memory only for the blocks in use
(blocks are handed out lowest id first and reused last-freed first).

Prefix caching (vLLM's automatic prefix caching), when `prefix_caching` is on: a block that
a sequence has filled is registered under its content, the key (its parent block's serial,
its block_size tokens, a namespace such as the adapter the keys were computed through), so a
later sequence that starts with the same tokens takes those blocks instead of computing them.
The key names its parent by a serial number that is never reused, so a chain of keys
identifies a whole prefix exactly (no hash can collide). A registered block that no sequence
holds any more is not freed but kept, least recently released first in line for eviction:
`_take` hands out never-registered free blocks first, then evicts the least recently used
cached block. The pool is therefore the cache's memory budget, and cached blocks count as free.

`CacheView` is what one eager forward pass over several cached sequences sees: it writes the
new tokens' keys and values into their blocks and returns, per row, every slot the row may
attend to, with the mask that says which.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import count

import torch

from .config import Config
from .errors import InvalidArgument

# Tokens per block. vLLM's GPU default is 16; on the CPU the native attention reads each
# block's slots as one stream, and 16-slot blocks (4 KB of fp32 keys per head at head_dim 64)
# cost up to 10% of a 16-row step at 300 tokens, where 64-slot blocks cost nothing measurable
# against a contiguous cache (same-process A/B of the two native steps).
DEFAULT_BLOCK_SIZE = 64


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a step needs (the caller preempts a sequence)."""


class PagedKVCache:
    def __init__(self, config: Config, num_blocks: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if block_size < 1:
            raise InvalidArgument(f"the KV block size must be at least 1, got {block_size}")
        if num_blocks < 1:
            raise InvalidArgument(f"a KV cache needs at least one block, got {num_blocks}")
        shape = (config.n_layer, num_blocks, config.n_kv_head, block_size, config.head_dim)
        # Zeros, not garbage: a slot a step reads but masks must hold a finite value (0 x NaN is
        # NaN). On the CPU a large pool's zero pages are only mapped when first written.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._written = bytearray(num_blocks)  # 1: taken before, so holding an earlier sequence's values
        self.block_size, self.num_blocks = block_size, num_blocks
        self.dtype, self.device = dtype, self.k.device
        self._refs = [0] * num_blocks  # sequences holding each block
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids are handed out first
        self.copies = 0  # blocks copied on write (a shared, partly filled last block written to)
        # prefix caching (module docstring): off until the owner turns it on
        self.prefix_caching = False
        self._by_key: dict[tuple, tuple[int, int]] = {}  # (parent serial, tokens, namespace) -> (block, serial)
        self._key_of: dict[int, tuple] = {}  # registered block -> its key
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered blocks nobody holds, LRU first
        self._serials = count(1)  # 0 is the root: the parent of a sequence's first block

    # ------------------------------------------------------------------------ sizing
    @staticmethod
    def block_bytes(config: Config, block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of one block: keys and values of block_size tokens in every layer."""
        return 2 * config.n_layer * config.n_kv_head * block_size * config.head_dim * dtype.itemsize

    @classmethod
    def blocks_in(cls, budget_bytes: int, config: Config, block_size: int = DEFAULT_BLOCK_SIZE,
                  dtype: torch.dtype = torch.float32) -> int:
        """How many blocks a memory budget holds."""
        return budget_bytes // cls.block_bytes(config, block_size, dtype)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold `tokens` tokens of one sequence."""
        return -(-tokens // self.block_size)

    @property
    def num_free(self) -> int:
        """Blocks a sequence may take: never-registered free ones and cached ones nobody holds."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (held by sequences or not)."""
        return len(self._key_of)

    @property
    def num_used(self) -> int:
        """Blocks held by sequences."""
        return self.num_blocks - self.num_free

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    # -------------------------------------------------------------- block tables
    def blocks_needed(self, table: list[int], length: int, new: int) -> int:
        """Free blocks that `grow(table, length, new)` would take."""
        if length % self.block_size and self._refs[table[-1]] > 1:  # a shared last block: copied first
            return self.blocks_for(length + new) - len(table) + 1
        return self.blocks_for(length + new) - len(table)

    def blocks_needed_all(self, tables: list[list[int]], lengths: list[int], new: int) -> int:
        """Free blocks that growing every sequence by `new` tokens takes. Sequences sharing a
        partly filled last block copy it in turn, and the last holder of it writes in place."""
        total, holders = 0, {}
        for table, length in zip(tables, lengths):
            total += self.blocks_for(length + new) - len(table)
            if length % self.block_size and self._refs[table[-1]] > 1:
                holders[table[-1]] = holders.get(table[-1], 0) + 1
        return total + sum(n if self._refs[block] > n else n - 1 for block, n in holders.items())

    def grow(self, table: list[int], length: int, new: int) -> None:
        """Make room for `new` tokens after the `length` already held by the sequence whose
        blocks are `table` (changed in place): a shared last block that is partly filled is
        copied first, then new blocks are appended. Raises OutOfBlocks, changing nothing, when
        the pool has too few free blocks."""
        room = len(table) * self.block_size
        if length % self.block_size and room >= length + new and self._refs[table[-1]] == 1:
            return  # the common decoding step: the last block is the sequence's own and has room
        if len(table) != self.blocks_for(length):
            raise ValueError(f"a table of {len(table)} blocks for {length} tokens")
        if self.blocks_needed(table, length, new) > self.num_free:
            raise OutOfBlocks(f"{self.blocks_needed(table, length, new)} blocks needed, {self.num_free} free")
        if length % self.block_size and self._refs[table[-1]] > 1:  # copy on write
            shared, own = table[-1], self._take()
            self.k[:, own] = self.k[:, shared]
            self.v[:, own] = self.v[:, shared]
            self.copies += 1
            self._refs[shared] -= 1
            table[-1] = own
        while len(table) < self.blocks_for(length + new):
            table.append(self._take())

    def fork(self, table: list[int]) -> list[int]:
        """A table for a new sequence that shares every block of `table`."""
        for block in table:
            self._refs[block] += 1
        return list(table)

    def release(self, table: list[int]) -> None:
        """The sequence whose blocks are `table` is gone: blocks no other sequence holds are freed."""
        for block in reversed(table):  # the last-freed block is reused first: keep early blocks early
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None  # kept for a later prefix, evicted last-released last
                else:
                    self._free.append(block)
        table.clear()

    # ------------------------------------------------------------- prefix caching
    def match(self, tokens: list[int], namespace: object = None, *, limit: int | None = None) -> tuple[list[int], list[int]]:
        """The cached blocks that hold `tokens`' longest prefix of whole blocks (at most `limit`
        tokens), and their serials: ([], []) when none or when prefix caching is off. The
        blocks are not yet the caller's: `acquire` them before anything takes a block."""
        blocks, serials = [], []
        if not self.prefix_caching:
            return blocks, serials
        bs, parent = self.block_size, 0
        n = len(tokens) if limit is None else min(limit, len(tokens))
        for i in range(n // bs):
            found = self._by_key.get((parent, tuple(tokens[i * bs:(i + 1) * bs]), namespace))
            if found is None:
                break
            blocks.append(found[0])
            serials.append(parent := found[1])
        return blocks, serials

    def acquire(self, blocks: list[int]) -> list[int]:
        """Blocks found by `match` become a new sequence's (shared with any other holder); its table."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1
        return list(blocks)

    def register(self, block: int, parent: int, tokens: list[int], namespace: object = None) -> int:
        """A sequence has filled `block` with `tokens` (block_size of them) after the prefix whose
        last block has serial `parent` (0: none); returns the serial under which its content is
        cached. When the same content is already cached in another block, that one's serial."""
        if not self.prefix_caching:
            return 0
        key = (parent, tuple(tokens), namespace)
        found = self._by_key.get(key)
        if found is not None:
            return found[1]
        if block in self._key_of:  # (a block holds one content: only a bug would land here)
            raise ValueError(f"block {block} is cached under another prefix")
        serial = next(self._serials)
        self._by_key[key], self._key_of[block] = (block, serial), key
        return serial

    def clear_prefixes(self) -> None:
        """Forget every cached prefix (the weights that computed them changed)."""
        self._free.extend(sorted(self._cached, reverse=True))
        self._cached.clear()
        self._by_key.clear()
        self._key_of.clear()

    def tables(self, tables: list[list[int]]) -> torch.Tensor:
        """(B, longest table) int64 on the cache's device; a shorter table is padded with its own
        first block (those slots are masked: any written block will do)."""
        width = max(len(t) for t in tables)
        return torch.tensor([t + t[:1] * (width - len(t)) for t in tables], dtype=torch.long, device=self.device)

    def _take(self) -> int:
        if self._free:
            block = self._free.pop()
        else:  # evict the least recently released cached block
            block, _ = self._cached.popitem(last=False)
            del self._by_key[self._key_of.pop(block)]
        self._refs[block] = 1
        if self._written[block]:  # an earlier sequence's values (finite, unless that model's were not)
            self.k[:, block].zero_()
            self.v[:, block].zero_()
        self._written[block] = 1
        return block


class CacheView:
    """B cached sequences extended by one forward pass: row b already holds starts[b] tokens
    and brings counts[b] new ones, right-padded to T = max(counts) in the model's input.

    The model asks for `positions(T)` (B, T), `attention_mask(T, window)` (B, 1, T, S), and
    per layer `update(layer, k, v)`, which stores the new tokens' keys and values (padding
    excluded) and returns every slot of each row's blocks, (B, n_kv_head, S, head_dim) with
    S = blocks per row x block_size. Query i of row b sits at position starts[b] + i and sees
    slot j when j <= starts[b] + i (and, with a sliding window, starts[b] + i - j < window).
    """

    def __init__(self, cache: PagedKVCache, tables: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor) -> None:
        self.cache, self.tables = cache, tables  # (B, nb)
        self.starts, self.counts = starts, counts  # (B,) int64 on the cache's device
        self._slots = None  # (block ids, offsets, batch rows, token columns) of the new tokens

    @property
    def longest(self) -> int:
        """The longest row after this pass (its length must fit the model's context)."""
        return int((self.starts + self.counts).max())

    def positions(self, T: int) -> torch.Tensor:
        return self.starts[:, None] + torch.arange(T, device=self.starts.device)  # (B, T)

    def attention_mask(self, T: int, window: int | None) -> torch.Tensor:
        S = self.tables.shape[1] * self.cache.block_size
        query = self.positions(T)[:, None, :, None]  # (B, 1, T, 1)
        key = torch.arange(S, device=query.device)  # (S,)
        mask = key <= query
        if window is not None:
            mask = mask & (query - key < window)
        return mask  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, n_kv_head, T, head_dim) of the new tokens -> all slots (B, n_kv_head, S, head_dim)."""
        B, K, T, hd = k.shape
        if self._slots is None:
            real = torch.arange(T, device=k.device) < self.counts[:, None]  # (B, T)
            rows, cols = real.nonzero(as_tuple=True)
            pos = self.starts[rows] + cols
            bs = self.cache.block_size
            self._slots = (self.tables[rows, pos // bs], pos % bs, rows, cols)
        blocks, offsets, rows, cols = self._slots
        pool_k, pool_v = self.cache.k[layer], self.cache.v[layer]  # (num_blocks, K, bs, hd)
        pool_k[blocks, :, offsets] = k[rows, :, cols]  # (N, K, hd) for the N real new tokens
        pool_v[blocks, :, offsets] = v[rows, :, cols]
        nb = self.tables.shape[1]
        all_k = pool_k[self.tables].transpose(1, 2).reshape(B, K, nb * self.cache.block_size, hd)
        all_v = pool_v[self.tables].transpose(1, 2).reshape(B, K, nb * self.cache.block_size, hd)
        return all_k, all_v
