"""One `Config` dataclass describes every decoder emergence builds.

The GPT-2 and LLaMA families (Mistral, Qwen2, SmolLM, TinyLlama...) differ only in a handful
of switches: how positions enter (learned table or RoPE), which norm, which MLP, where biases
sit, whether the output head is tied to the embedding, and an optional sliding window.
Those switches are fields here; `model.py` reads them and never looks at a model's name.

`family` names the checkpoint naming scheme (Hugging Face `model_type`) used by the
checkpoint code to read and write tensors; the model itself ignores it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


@dataclass
class Config:
    name: str = "custom"
    family: str = "llama"  # checkpoint naming scheme: one of FAMILIES
    vocab_size: int = 32000
    block_size: int = 2048  # longest context the model supports (max_position_embeddings)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None  # grouped-query attention; None means n_head (plain MHA)
    head_dim: int | None = None  # None means n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; None means 4 * n_embd
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: Literal["swiglu", "gelu"] = "swiglu"  # gelu = GPT-2's tanh approximation
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    bias: bool = False  # biases on every linear layer and norm (GPT-2)
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2)
    tie_embeddings: bool = False  # output head shares the token embedding matrix
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    # class constants (T5Config sets its own): not an encoder-decoder; SDPA's 1/sqrt(head_dim) scaling
    is_encoder_decoder = False
    attention_scale = None

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_kv_head",
                    "head_dim", "intermediate_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"RoPE needs an even head_dim, got {self.head_dim}")
        choices = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu"), "position": ("rope", "learned")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")

    # ----------------------------------------------------------------------------- derived
    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids (Llama 3 has several)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self) -> int:
        """Parameter count implied by the shapes (tied weights counted once)."""
        d, hd = self.n_embd, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_head * hd
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = d * (q + 2 * kv) + q * d
        if self.bias:
            attn += q + 2 * kv + d
        elif self.qkv_bias:
            attn += q + 2 * kv
        n_mats = 3 if self.mlp == "swiglu" else 2
        mlp = n_mats * d * self.intermediate_size
        if self.bias:
            mlp += self.intermediate_size + d
        per_layer = attn + mlp + 2 * norm
        total = self.n_layer * per_layer + norm + self.vocab_size * d
        if self.position == "learned":
            total += self.block_size * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        return total

    # ----------------------------------------------------------------------- constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from None

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "Config":
        """Map a Hugging Face config.json (path or dict) of the GPT-2 / LLaMA / Mistral / Qwen2 families."""
        if not isinstance(source, dict):
            source = read_json(Path(source))
        from .weights.hf_config import config_from_hf  # the mapping lives beside the name tables

        return config_from_hf(source)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face config.json for this model (loadable by transformers)."""
        from .weights.hf_config import config_to_hf

        return config_to_hf(self)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} does not hold a JSON object")
    return data


# ---------------------------------------------------------------------------------- presets
# Real shapes of published models (from their Hugging Face config.json), plus tiny ones for tests.
_GPT2 = dict(family="gpt2", norm="layernorm", mlp="gelu", position="learned", bias=True,
             tie_embeddings=True, vocab_size=50257, block_size=1024, bos_token_id=50256, eos_token_id=50256)
_LLAMA = dict(family="llama", norm="rmsnorm", mlp="swiglu", position="rope")

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "llama-2-7b": dict(_LLAMA, vocab_size=32000, block_size=4096, n_layer=32, n_head=32, n_embd=4096,
                       intermediate_size=11008),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8,
                         n_embd=2048, intermediate_size=8192, rope_theta=500000.0, tie_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192),
                         bos_token_id=128000, eos_token_id=128001),
    "tinyllama-1.1b": dict(_LLAMA, vocab_size=32000, block_size=2048, n_layer=22, n_head=32, n_kv_head=4,
                           n_embd=2048, intermediate_size=5632),
    "smollm2-135m": dict(_LLAMA, vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3,
                         n_embd=576, intermediate_size=1536, rope_theta=100000.0, tie_embeddings=True,
                         bos_token_id=0, eos_token_id=0),
    "smollm2-360m": dict(_LLAMA, vocab_size=49152, block_size=8192, n_layer=32, n_head=15, n_kv_head=5,
                         n_embd=960, intermediate_size=2560, rope_theta=100000.0, tie_embeddings=True,
                         bos_token_id=0, eos_token_id=0),
    "mistral-7b": dict(_LLAMA, family="mistral", vocab_size=32000, block_size=32768, n_layer=32, n_head=32,
                       n_kv_head=8, n_embd=4096, intermediate_size=14336, sliding_window=4096),
    "qwen2.5-0.5b": dict(_LLAMA, family="qwen2", vocab_size=151936, block_size=32768, n_layer=24, n_head=14,
                         n_kv_head=2, n_embd=896, intermediate_size=4864, norm_eps=1e-6, rope_theta=1000000.0,
                         qkv_bias=True, tie_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    # Small LLaMA-architecture models trained from scratch by bench/train_models.py (4,096-token
    # BPE, context 512); emergence-6m ships inside the package. nanogpt-small is nanoGPT's
    # Shakespeare config (GPT-2 shapes, 6 x 6 heads x 384, context 256) for the training benchmark.
    "emergence-1m": dict(_LLAMA, vocab_size=4096, block_size=512, n_layer=4, n_head=4, n_embd=128,
                         intermediate_size=352, tie_embeddings=True, bos_token_id=None, eos_token_id=0),
    "emergence-6m": dict(_LLAMA, vocab_size=4096, block_size=512, n_layer=6, n_head=4, n_embd=256,
                         intermediate_size=704, tie_embeddings=True, bos_token_id=None, eos_token_id=0),
    "emergence-16m": dict(_LLAMA, vocab_size=4096, block_size=512, n_layer=8, n_head=6, n_embd=384,
                          intermediate_size=1024, tie_embeddings=True, bos_token_id=None, eos_token_id=0),
    "nanogpt-small": dict(_GPT2, vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384),
    # Tiny configs: fast tests of every code path.
    "tiny-gpt2": dict(_GPT2, vocab_size=256, block_size=128, n_layer=2, n_head=4, n_embd=64),
    "tiny-llama": dict(_LLAMA, vocab_size=256, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                       intermediate_size=128),
}
