"""llama2.c checkpoints (the legacy "v0" fp32 `.bin` written by its export.py).

Layout: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means the classifier is not shared with the embedding), then
float32 arrays in this order: token embedding, per-layer attention norms, wq, wk, wv, wo,
ffn norms, w1, w2, w3, final norm, the RoPE cos/sin tables (skipped), and the classifier
when unshared. Each matrix is stored as a PyTorch Linear weight (out, in).

llama2.c rotates interleaved pairs (0,1), (2,3)... while `model.py` rotates the halves
(i, i + hd/2), so wq and wk rows are permuted on import: the same permutation Hugging Face's
LLaMA converter applies.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import CheckpointError
from ..model import Transformer, empty_model, finish_loading

HEADER = struct.Struct("<7i")
V1_MAGIC = 0x616B3432  # "ak42": the newer llama2.c export versions, not the v0 layout


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (n_heads * hd, dim) from pair-interleaved to rotate-half RoPE."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _plausible(raw: bytes) -> bool:
    """Whether 28 header bytes read as a v0 llama2.c header of sane sizes."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack(raw[:HEADER.size])
    vocab = abs(vocab)
    return (0 < dim <= 65536 and 0 < hidden <= 262144 and 0 < n_layers <= 1024 and 0 < n_heads <= dim
            and 0 < n_kv_heads <= n_heads and 0 < vocab <= 1 << 20 and 0 < seq_len <= 1 << 20
            and dim % n_heads == 0 and n_heads % n_kv_heads == 0 and (dim // n_heads) % 2 == 0)


def looks_like_llama2c(path: Path) -> bool:
    """A file whose header is a plausible v0 llama2.c header, or a newer llama2.c export's magic
    (any other file is not one: a text file, an image, a pickle...)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except OSError:
        return False
    return len(raw) == HEADER.size and (_plausible(raw) or HEADER.unpack(raw)[0] == V1_MAGIC)


def read_header(path: Path) -> tuple[Config, bool, int]:
    """(config, shared classifier, expected file size) from a v0 header, validated against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
    except FileNotFoundError:
        raise CheckpointError(f"llama2.c checkpoint not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) < HEADER.size:
        raise CheckpointError(f"{path} is too short to be a llama2.c checkpoint ({size} bytes)")
    if raw[:4] == b"GGUF":
        raise CheckpointError(f"{path} is a GGUF file, not a llama2.c checkpoint")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack(raw)
    if dim == V1_MAGIC:
        raise CheckpointError(f"{path} is a newer llama2.c export (version header); only the v0 layout is supported")
    shared = vocab > 0
    vocab = abs(vocab)
    if not _plausible(raw):
        raise CheckpointError(f"{path} is not a llama2.c checkpoint (implausible header "
                              f"dim={dim} hidden={hidden} layers={n_layers} heads={n_heads}/{n_kv_heads} "
                              f"vocab={vocab} seq_len={seq_len})")
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim
    floats = (vocab * dim + n_layers * (2 * dim + dim * dim * 2 + dim * kv_dim * 2 + 3 * dim * hidden)
              + dim + seq_len * head_dim + (0 if shared else vocab * dim))
    expected = HEADER.size + 4 * floats
    if size != expected:
        raise CheckpointError(f"{path} has {size} bytes but its header implies {expected} (truncated or not v0?)")
    config = Config(name=path.stem, family="llama", vocab_size=vocab, block_size=seq_len, n_layer=n_layers,
                    n_head=n_heads, n_kv_head=n_kv_heads, n_embd=dim, intermediate_size=hidden,
                    norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=shared,
                    # llama2.c models delimit stories with BOS; stop there too, as run.c does.
                    bos_token_id=1, eos_token_id=[2, 1])
    return config, shared, expected


def load_llama2c(path: str | os.PathLike) -> tuple[Transformer, Config]:
    path = Path(path)
    config, shared, _ = read_header(path)
    data = np.memmap(path, dtype=np.float32, mode="r", offset=HEADER.size)
    cursor = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal cursor
        n = int(np.prod(shape))
        out = torch.from_numpy(np.array(data[cursor:cursor + n])).view(*shape)
        cursor += n
        return out

    c = config
    L, D, F, hd = c.n_layer, c.n_embd, c.intermediate_size, c.head_dim
    kv = c.n_kv_head * hd
    state = {"tok_embeddings.weight": take(c.vocab_size, D)}
    attn_norm, wq, wk, wv, wo = take(L, D), take(L, D, D), take(L, kv, D), take(L, kv, D), take(L, D, D)
    mlp_norm, w1, w2, w3 = take(L, D), take(L, F, D), take(L, D, F), take(L, F, D)  # w1 gate, w2 down, w3 up
    state["norm.weight"] = take(D)
    cursor += c.block_size * hd  # precomputed RoPE cos/sin tables: recomputed by the model instead
    if not shared:
        state["lm_head.weight"] = take(c.vocab_size, D)
    for i in range(L):
        q, k = interleaved_to_half(wq[i], c.n_head), interleaved_to_half(wk[i], c.n_kv_head)
        state.update({
            f"layers.{i}.attn_norm.weight": attn_norm[i],
            f"layers.{i}.attn.qkv_proj.weight": torch.cat([q, k, wv[i]]),
            f"layers.{i}.attn.o_proj.weight": wo[i],
            f"layers.{i}.mlp_norm.weight": mlp_norm[i],
            f"layers.{i}.mlp.gate_up_proj.weight": torch.cat([w1[i], w3[i]]),
            f"layers.{i}.mlp.down_proj.weight": w2[i],
        })
    model = empty_model(config)
    return finish_loading(model, state), config
