"""A preallocated key/value cache for incremental decoding.

Keys and values for every layer live in tensors allocated once, of shape
(batch, n_kv_head, max_len, head_dim); each forward pass writes its new positions at
`length` and attends over slots [0, length + T). Prompts of different lengths are
left-padded, so every row shares one write position; `pad` records how many leading slots
of each row are padding, which gives both the attention mask and the position ids.
"""

from __future__ import annotations

import torch

from .config import Config


class KVCache:
    def __init__(self, config: Config, batch_size: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0  # slots filled so far (the same for every row)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) leading pad slots
        self.has_padding = False

    def set_padding(self, attention_mask: torch.Tensor) -> None:
        """Record left padding from a (B, T) prompt mask (1 = token, 0 = pad) before prefill."""
        self.pad = (attention_mask == 0).sum(dim=1).to(self.pad.device)
        self.has_padding = bool(self.pad.any())

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at the current slots; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only (or reorder to) the given batch rows, e.g. to drop finished sequences."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.pad = self.pad.index_select(0, rows)
        self.has_padding = bool(self.pad.any())
