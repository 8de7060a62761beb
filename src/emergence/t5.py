"""T5: (source tokens, target tokens) -> logits, the text-to-text encoder-decoder.

Built from the decoder's own parts (model.py's RMSNorm, Attention, MLP and Block, the paged
KV cache); what differs from the decoder-only Transformer is all here:

- two stacks: an encoder (bidirectional self-attention over the source) and a decoder
  (causal self-attention over the target, then cross-attention to the encoder's output);
- no position embeddings: a learned relative position bias, one scalar per head and
  distance bucket (32 buckets, exact up to 8 (decoder: 16), logarithmic up to 128),
  computed once per stack from the first layer's table and added to every layer's scores;
  bidirectional buckets in the encoder, causal ones in the decoder;
- unscaled attention (T5's initialisation folds 1/sqrt(d) into the weights);
- "T5 LayerNorm" is RMSNorm without a bias (eps 1e-6);
- a ReLU MLP (v1.0) or a gated-GELU one (v1.1, Flan-T5);
- the head is tied to the embedding with the decoder output scaled by d_model ** -0.5
  (v1.0), or untied and unscaled (v1.1).

Cross-attention keys and values depend only on the source: `encode` computes them once per
sequence (`CrossStates`), and every decoding step of every beam reads them.

Shapes: B batch, S source tokens, T target tokens, D d_model, H heads, hd d_kv, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config
from .errors import ConfigError, InvalidArgument
from .kernels import SmallBatchLinear
from .model import Block, Placed, RMSNorm, _SkipInit


@dataclass
class T5Config:
    """T5's shapes, under the names model.py's parts and the KV cache read (n_embd is d_model,
    head_dim d_kv, intermediate_size d_ff, n_layer the decoder's layers: those with a KV cache)."""

    name: str = "custom"
    vocab_size: int = 32128
    n_embd: int = 512
    head_dim: int = 64
    intermediate_size: int = 2048
    n_encoder_layer: int = 6
    n_layer: int = 6  # decoder layers
    n_head: int = 8
    num_buckets: int = 32
    max_distance: int = 128
    mlp: Literal["relu", "geglu"] = "relu"  # T5 v1.0 / v1.1 ("gated-gelu")
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    scale_head: bool = True  # decoder output * d_model ** -0.5 before the head (v1.0)
    block_size: int = 512  # the longest source and target
    pad_token_id: int = 0
    eos_token_id: int | list[int] | None = 1
    decoder_start_token_id: int = 0
    bos_token_id: int | None = None
    family: str = "t5"

    # fixed for T5: what model.py's parts ask of a config
    is_encoder_decoder = True
    n_kv_head = property(lambda self: self.n_head)
    norm, bias, qkv_bias, sliding_window, attention_scale = "rmsnorm", False, False, None, 1.0
    qk_norm, attn_softcap, norm_position, parallel = None, None, "pre", None  # none of the family switches

    def layer_window(self, i: int) -> None:  # every layer sees its whole (masked) sequence
        return None

    def is_moe_layer(self, i: int) -> bool:  # dense MLPs only
        return False

    def layer_rope(self, i: int) -> None:  # positions enter as the relative bias
        return None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "head_dim", "intermediate_size", "n_encoder_layer", "n_layer", "n_head",
                     "num_buckets", "max_distance", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.mlp not in ("relu", "geglu"):
            raise ConfigError(f"a T5 MLP is relu or geglu (gated-gelu), got {self.mlp!r}")
        if self.num_buckets < 4:
            raise ConfigError(f"num_buckets must be at least 4, got {self.num_buckets}")

    eos_token_ids = Config.eos_token_ids  # the same property: all end-of-sequence ids

    def num_parameters(self) -> int:
        d, inner, f = self.n_embd, self.n_head * self.head_dim, self.intermediate_size
        attn = 4 * d * inner
        mlp = (3 if self.mlp == "geglu" else 2) * d * f
        bias = self.num_buckets * self.n_head
        encoder = self.n_encoder_layer * (attn + mlp + 2 * d) + bias + d
        decoder = self.n_layer * (2 * attn + mlp + 3 * d) + bias + d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return embeddings + encoder + decoder

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> T5Config:
        if name not in T5_PRESETS:
            raise ConfigError(f"unknown T5 preset {name!r}; known: {', '.join(sorted(T5_PRESETS))}")
        return cls(**{**T5_PRESETS[name], "name": name, **overrides})


# Real shapes of the published checkpoints (their config.json), and a tiny one for tests.
T5_PRESETS: dict[str, dict[str, Any]] = {
    "t5-small": dict(n_embd=512, head_dim=64, intermediate_size=2048, n_encoder_layer=6, n_layer=6, n_head=8),
    "t5-base": dict(n_embd=768, head_dim=64, intermediate_size=3072, n_encoder_layer=12, n_layer=12, n_head=12),
    "flan-t5-base": dict(n_embd=768, head_dim=64, intermediate_size=2048, n_encoder_layer=12, n_layer=12, n_head=12,
                         mlp="geglu", tie_embeddings=False, scale_head=False),
    "tiny-t5": dict(vocab_size=256, n_embd=64, head_dim=16, intermediate_size=128, n_encoder_layer=2, n_layer=2,
                    n_head=4, block_size=256),
}


# ------------------------------------------------------------------ relative position bias
def relative_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """relative = key position - query position -> bucket ids (same shape), as Mesh TensorFlow's T5.

    Half the buckets (all, when causal) hold exact distances up to num_buckets // 2 (// 4 when
    bidirectional); the rest cover distances up to max_distance logarithmically, and all
    longer ones share the last. Bidirectional buckets give keys after the query their own half."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # only keys at or before the query are ever seen
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativeBias(nn.Module):
    """One learned scalar per (distance bucket, head): query positions (B or 1, T) and key
    positions (S,) -> the bias added to the attention scores, (B or 1, H, T, S)."""

    def __init__(self, config: T5Config, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, config.num_buckets, config.max_distance
        self.weight = nn.Parameter(torch.zeros(config.num_buckets, config.n_head))

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        bucket = relative_bucket(key[None, None, :] - query[:, :, None], self.bidirectional, self.num_buckets,
                                 self.max_distance)  # (B, T, S)
        return F.embedding(bucket, self.weight).permute(0, 3, 1, 2)  # (B, H, T, S)


def _additive(bias: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """The float mask SDPA adds to the scores: the bias where a key is visible, -inf elsewhere."""
    return bias.masked_fill(~visible, float("-inf"))


# ----------------------------------------------------------------------------- the blocks
class CrossAttention(nn.Module):
    """Decoder queries over the encoder's output; its keys and values come precomputed."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        inner = config.n_head * config.head_dim
        self.q_proj = SmallBatchLinear(config.n_embd, inner, bias=False)
        self.kv_proj = nn.Linear(config.n_embd, 2 * inner, bias=False)  # k and v in one matmul, once per source
        self.o_proj = SmallBatchLinear(inner, config.n_embd, bias=False)

    def keys_values(self, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encoded (B, S, D) -> k, v (B, H, S, hd)."""
        B, S, _ = encoded.shape
        k, v = (t.view(B, S, self.n_head, self.head_dim).transpose(1, 2) for t in self.kv_proj(encoded).chunk(2, -1))
        return k, v

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); k, v (B, H, S, hd); mask (B, 1, 1, S) bool (False: source padding) or None."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class DecoderBlock(Block):
    """model.Block with cross-attention between self-attention and the MLP. An fp32 T5's decode
    steps run natively in one call (kernels/decode.cpp's plan: the relative bias by distance,
    cross-attention over each sequence's states); elsewhere (bf16, a quantized T5, training)
    the projections a step runs on its few rows are kernels.SmallBatchLinear (the native
    batched GEMM)."""

    def __init__(self, config: T5Config, layer: int) -> None:
        super().__init__(config, layer, linear=SmallBatchLinear)
        self.cross_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.cross_attn = CrossAttention(config)

    def forward(self, x, mask, cache, cross_kv, cross_mask):
        x = x + self.attn(self.attn_norm(x), None, mask, cache)
        x = x + self.cross_attn(self.cross_norm(x), *cross_kv, cross_mask)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class CrossStates:
    """One source's cross-attention keys and values for every decoder layer, (L, H, S, hd)
    each: computed once, shared by every beam and sample of the sequence, never written."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


# ----------------------------------------------------------------------------- the model
class T5(Placed, nn.Module):
    is_encoder_decoder = True

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)  # shared by both stacks
        self.encoder_layers = nn.ModuleList(Block(config, i) for i in range(config.n_encoder_layer))
        self.encoder_bias = RelativeBias(config, bidirectional=True)
        self.encoder_norm = RMSNorm(config.n_embd, config.norm_eps)
        # The decoder's layers are `layers` (as in the Transformer): the KV cache's layer indices.
        self.layers = nn.ModuleList(DecoderBlock(config, i) for i in range(config.n_layer))
        self.decoder_bias = RelativeBias(config, bidirectional=False)
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = SmallBatchLinear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    # ---------------------------------------------------------------------- encoder
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder output (B, S, D). attention_mask (B, S): 1 = token, 0 =
        right padding (the padding's keys are hidden; positions are slots, as in transformers)."""
        B, S = input_ids.shape
        if S > self.config.block_size:
            raise InvalidArgument(f"a source of {S} tokens exceeds the encoder's context of {self.config.block_size}")
        slots = torch.arange(S, device=input_ids.device)
        bias = self.encoder_bias(slots[None], slots)  # (1, H, S, S)
        if attention_mask is not None:
            bias = _additive(bias, attention_mask.bool()[:, None, None, :])  # (B, H, S, S)
        x = self.tok_embeddings(input_ids)
        for block in self.encoder_layers:
            x = block(x, None, bias, None)
        return self.encoder_norm(x)

    def cross_states(self, encoded: torch.Tensor) -> list[CrossStates]:
        """encoded (B, S, D) -> each row's cross-attention keys and values (row b's first
        `lengths[b]` source slots are the caller's to keep)."""
        kv = [layer.cross_attn.keys_values(encoded) for layer in self.layers]  # L x ((B, H, S, hd) x 2)
        k, v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)  # (B, L, H, S, hd)
        return [CrossStates(k[b], v[b]) for b in range(encoded.shape[0])]

    # ---------------------------------------------------------------------- decoder
    def decoder_states(self, input_ids: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor,
                       cross_mask: torch.Tensor | None, cache=None) -> torch.Tensor:
        """Target tokens (B, T) -> hidden states (B, T, D), ready for lm_head (scaled for a tied
        head). cross_k, cross_v (B, L, H, S, hd); cross_mask (B, 1, 1, S) bool or None; cache: a
        kv_cache.CacheView (decoding), or None (the whole target at once: training, scoring)."""
        B, T = input_ids.shape
        if cache is not None:
            positions = cache.positions(T)  # (B, T)
            visible = cache.attention_mask(T, None)  # (B, 1, T, S)
            keys = torch.arange(visible.shape[-1], device=input_ids.device)
        else:
            positions = keys = torch.arange(T, device=input_ids.device)
            positions = positions[None]
            visible = (keys[None, :] <= keys[:, None])[None, None]  # causal (1, 1, T, T)
        longest = cache.longest if cache is not None else T
        if longest > self.config.block_size:
            raise InvalidArgument(f"{longest} target tokens exceed the decoder's context of {self.config.block_size}")
        mask = _additive(self.decoder_bias(positions, keys), visible)  # (B, H, T, S)
        x = self.tok_embeddings(input_ids)
        for i, block in enumerate(self.layers):
            x = block(x, mask, cache, (cross_k[:, i], cross_v[:, i]), cross_mask)
        x = self.norm(x)
        return x * self.config.n_embd ** -0.5 if self.config.scale_head else x

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source (B, S) and target (B, T) -> logits (B, T, V): teacher forcing, no cache."""
        encoded = self.encode(input_ids, attention_mask)
        kv = [layer.cross_attn.keys_values(encoded) for layer in self.layers]
        k, v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)
        cross_mask = attention_mask.bool()[:, None, None, :] if attention_mask is not None else None
        return self.head(self.decoder_states(decoder_input_ids, k, v, cross_mask))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., D) -> logits (..., V), as the decoder-only model's head()."""
        return self.lm_head(h)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def batch_cross_states(states: list[CrossStates]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows' cross states -> k, v (B, L, H, S, hd) and the source mask (B, 1, 1, S) (None when no
    row is padded). Rows sharing one source (beams, samples) are expanded, not copied."""
    if all(s is states[0] for s in states):
        B = len(states)
        return states[0].k[None].expand(B, -1, -1, -1, -1), states[0].v[None].expand(B, -1, -1, -1, -1), None
    S = max(s.length for s in states)
    if all(s.length == S for s in states):
        return torch.stack([s.k for s in states]), torch.stack([s.v for s in states]), None
    k = states[0].k.new_zeros((len(states), *states[0].k.shape[:2], S, states[0].k.shape[-1]))
    v = torch.zeros_like(k)
    mask = torch.zeros(len(states), 1, 1, S, dtype=torch.bool, device=k.device)
    for b, s in enumerate(states):
        k[b, :, :, :s.length], v[b, :, :, :s.length] = s.k, s.v
        mask[b, ..., :s.length] = True
    return k, v, mask


def empty_t5(config: T5Config) -> T5:
    """The model's skeleton on the meta device (weights come from a checkpoint)."""
    with torch.device("meta"), _SkipInit():
        return T5(config)


def init_t5(config: T5Config, seed: int = 0) -> T5:
    """A T5 with random weights (T5's initialisation)."""
    model = T5(config)
    initialize_t5(model, generator=torch.Generator().manual_seed(seed))
    return model


def initialize_t5(model: T5, *, generator: torch.Generator | None = None) -> None:
    """Mesh TensorFlow's initialisation, as transformers' T5 _init_weights: embeddings N(0, 1),
    queries N(0, (d hd) ** -0.5) (the attention's missing 1/sqrt(hd)), keys and values
    N(0, d ** -0.5), outputs by their fan-in, norms 1."""
    c = model.config
    d, hd, H, f = c.n_embd, c.head_dim, c.n_head, c.intermediate_size
    std = {"q_proj": (d * hd) ** -0.5, "kv_proj": d ** -0.5, "o_proj": (H * hd) ** -0.5, "up_proj": d ** -0.5,
           "gate_up_proj": d ** -0.5, "down_proj": f ** -0.5, "lm_head": d ** -0.5, "tok_embeddings": 1.0,
           "encoder_bias": d ** -0.5, "decoder_bias": d ** -0.5}
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = name.split(".")[-2]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif kind == "qkv_proj":  # q (the first H hd rows) as a query, k and v as keys
                p[:H * hd].normal_(0, (d * hd) ** -0.5, generator=generator)
                p[H * hd:].normal_(0, d ** -0.5, generator=generator)
            else:
                p.normal_(0, std[kind], generator=generator)


def t5_config_of(spec: Any) -> T5Config | None:
    """A T5Config from a T5Config, a T5 preset name, or a JSON file (T5Config fields, or a
    transformers T5 config.json); None when `spec` is none of these."""
    from pathlib import Path

    from .config import read_json

    if isinstance(spec, T5Config):
        return T5Config(**spec.to_dict())
    if isinstance(spec, str) and spec in T5_PRESETS:
        return T5Config.from_name(spec)
    if isinstance(spec, (str, Path)) and Path(spec).is_file() and str(spec).endswith(".json"):
        raw = read_json(Path(spec))
        if raw.get("model_type") == "t5":
            from .weights.hf_config import t5_config_from_hf

            return t5_config_from_hf(raw, tied=raw.get("tie_word_embeddings", True))
        if raw.get("family") == "t5":
            return T5Config(**raw)
    return None


def build_model(config) -> nn.Module:
    """The model a config describes: a T5 for a T5Config, else the decoder-only Transformer."""
    from .model import Transformer

    return T5(config) if config.is_encoder_decoder else Transformer(config)
