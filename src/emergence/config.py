"""One `Config` dataclass describes every decoder emergence builds.

The GPT-2 and LLaMA families (Mistral, Qwen2, SmolLM, TinyLlama...) differ only in a handful
of switches: how positions enter (learned table or RoPE), which norm, which MLP, where biases
sit, whether the output head is tied to the embedding, and an optional sliding window. The
families people run today add a few more (the "family switches" below): q/k norms (Qwen3,
OLMo 2, Gemma 3), norms after each sublayer (OLMo 2, Gemma), soft-capped logits and
alternating local/global layers (Gemma), parallel attention and MLP with partial rotary
dimensions (GPT-NeoX, Falcon, Phi-2), layers without RoPE (SmolLM3), RMSNorms inside the
sublayers before their output projections with a ReLU^2-gated MLP (BitNet).
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

# Hugging Face model_type names: the checkpoint naming schemes emergence reads and writes.
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox",
            "falcon", "phi", "smollm3", "mixtral", "qwen2_moe", "olmoe", "bitnet")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "olmoe")

# The family switches, with the families whose checkpoints use each (a switch set on a model of
# another family is a combination no family has: refused, with this table as the reason).
SWITCH_FAMILIES: dict[str, tuple[str, ...]] = {
    "qk_norm": ("qwen3", "olmo2", "gemma3_text", "olmoe"),
    "norm_position": ("olmo2", "gemma2", "gemma3_text"),
    "parallel": ("gpt_neox", "falcon", "phi"),
    "rotary_dim": ("gpt_neox", "phi", "phi3"),
    "scale_embeddings": ("gemma2", "gemma3_text"),
    "attn_softcap": ("gemma2", "gemma3_text"),
    "final_softcap": ("gemma2", "gemma3_text"),
    "attention_scale": ("gemma2", "gemma3_text"),
    "global_every": ("gemma2", "gemma3_text"),
    "rope_local_theta": ("gemma3_text",),
    "nope_every": ("smollm3",),
    "head_bias": ("phi",),
    "n_experts": MOE_FAMILIES,
    "shared_expert_size": ("qwen2_moe",),
    "sub_norms": ("bitnet",),
}
# MLP kinds only some families have (a model of another family is refused, as for the switches).
MLP_FAMILIES: dict[str, tuple[str, ...]] = {"relu2_glu": ("bitnet",)}
MLPS = ("swiglu", "geglu", "gelu", "gelu_exact", "relu2_glu")


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
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # a LayerNorm always has a bias
    norm_eps: float = 1e-5
    # gelu: GPT-2's tanh approximation; gelu_exact: the erf GELU (GPT-NeoX, Falcon); geglu: gated
    # tanh GELU (Gemma); relu2_glu: relu(gate)^2 * up (BitNet b1.58 2B4T)
    mlp: Literal["swiglu", "geglu", "gelu", "gelu_exact", "relu2_glu"] = "swiglu"
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    bias: bool = False  # biases on every linear layer of the blocks (GPT-2)
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2)
    tie_embeddings: bool = False  # output head shares the token embedding matrix
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    # ---- family switches (SWITCH_FAMILIES); the defaults are the LLaMA block
    qk_norm: Literal["head", "all"] | None = None  # RMSNorm on q and k: per head, or over all heads' width
    norm_position: Literal["pre", "post", "sandwich"] = "pre"  # norm before a sublayer, after it, or both
    parallel: Literal["shared-norm", "two-norms"] | None = None  # x + attn(n(x)) + mlp(n'(x)), one norm or two
    rotary_dim: int | None = None  # RoPE on the first rotary_dim of each head's dimensions; None: all
    scale_embeddings: bool = False  # token embeddings * sqrt(n_embd)
    attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    attention_scale: float | None = None  # q.k scaling; None: 1/sqrt(head_dim)
    global_every: int | None = None  # with a window, layers i with (i + 1) % global_every == 0 see everything
    rope_local_theta: float | None = None  # RoPE base of the windowed layers (others use rope_theta)
    nope_every: int | None = None  # layers i with (i + 1) % nope_every == 0 use no RoPE
    head_bias: bool = False  # a bias on the output head
    sub_norms: bool = False  # RMSNorm of the attention output before o_proj and of the MLP's hidden before down_proj
    # ---- mixture of experts (model.MoE): n_experts > 0 replaces the MLP of layers i with
    # (i + 1) % moe_every == 0 by experts_per_token of n_experts MLPs, picked per token by a router
    n_experts: int = 0
    experts_per_token: int = 2
    moe_intermediate_size: int | None = None  # an expert's MLP width; None: intermediate_size
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights (Mixtral) or not (Qwen2-MoE, OLMoE)
    shared_expert_size: int | None = None  # a shared expert's width, gated by a sigmoid (Qwen2-MoE)
    moe_every: int = 1
    router_jitter: float = 0.0  # training: inputs times uniform(1 - j, 1 + j) noise (Mixtral)
    capacity_factor: float | None = None  # training: an expert takes at most this x its fair share (Switch)
    # BitNet b1.58: the blocks' linear layers train with ternary weights and 8-bit activations
    # (model.BitLinear); embeddings and the output head stay in full precision
    ternary: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    is_encoder_decoder = False  # a class constant (T5Config sets its own)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head <= 0 or self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        # canonical form: a layer pattern longer than the model marks no layer
        for name in ("global_every", "nope_every"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(self.n_layer, int) \
                    and value > self.n_layer:
                setattr(self, name, None)
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
        choices = {"norm": ("rmsnorm", "layernorm"), "mlp": MLPS,
                   "position": ("rope", "learned")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config field {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive, got {self.sliding_window}")
        self._validate_switches()
        self._validate_experts()

    def _validate_experts(self) -> None:
        for name in ("n_experts", "experts_per_token", "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n_experts" else 1):
                raise ConfigError(f"config field {name} must be a {'non-negative' if name == 'n_experts' else 'positive'} "
                                  f"integer, got {value!r}")
        if self.n_experts and self.experts_per_token > self.n_experts:
            raise ConfigError(f"experts_per_token={self.experts_per_token} exceeds n_experts={self.n_experts}")
        for name in ("moe_intermediate_size", "shared_expert_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"config field {name} must be a positive integer or null, got {value!r}")
        if not 0 <= self.router_jitter < 1:
            raise ConfigError(f"router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be positive or null, got {self.capacity_factor}")
        if self.n_experts and self.mlp not in ("swiglu", "geglu"):
            raise ConfigError(f"experts are gated MLPs (swiglu or geglu), not {self.mlp!r}")
        if self.n_experts == 0 and self.shared_expert_size is not None:
            raise ConfigError("shared_expert_size needs n_experts")
        if not isinstance(self.ternary, bool):
            raise ConfigError(f"config field ternary must be true or false, got {self.ternary!r}")
        if self.ternary and self.n_experts:
            raise ConfigError("ternary (BitNet b1.58) training covers dense blocks; experts stay full precision "
                              "(set n_experts to 0)")

    def _validate_switches(self) -> None:
        allowed = {"qk_norm": (None, "head", "all"), "norm_position": ("pre", "post", "sandwich"),
                   "parallel": (None, "shared-norm", "two-norms")}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ConfigError(f"config field {name} must be one of {values}, got {getattr(self, name)!r}")
        for name in ("rotary_dim", "global_every", "nope_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"config field {name} must be a positive integer or null, got {value!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(Config)}
        for name, families in SWITCH_FAMILIES.items():
            if getattr(self, name) != defaults[name] and self.family not in families:
                raise ConfigError(f"{name}={getattr(self, name)!r} is a switch of {', '.join(families)}; "
                                  f"a {self.family!r} model has none (no family combines them)")
        if self.family not in MLP_FAMILIES.get(self.mlp, (self.family,)):
            raise ConfigError(f"mlp={self.mlp!r} is an MLP of {', '.join(MLP_FAMILIES[self.mlp])}; a {self.family!r} "
                              "model has none (no family combines them)")
        if self.rotary_dim is not None and (self.position != "rope" or self.rotary_dim % 2
                                            or self.rotary_dim > self.head_dim):
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and at most head_dim={self.head_dim}, "
                              "with RoPE positions")
        if self.parallel and self.norm_position != "pre":
            raise ConfigError("a parallel block normalises its input: norm_position must be 'pre'")
        if self.global_every == 1:
            raise ConfigError("global_every=1 makes every layer global: leave sliding_window unset instead")
        if (self.global_every or self.rope_local_theta) and self.sliding_window is None:
            raise ConfigError("global_every and rope_local_theta describe windowed layers: set sliding_window")
        for name in ("attn_softcap", "final_softcap", "attention_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"config field {name} must be positive or null, got {value!r}")

    # ------------------------------------------------------------------------- per layer
    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0

    def layer_window(self, i: int) -> int | None:
        """The window layer i attends within (None: every earlier key)."""
        if self.sliding_window is None or (self.global_every and (i + 1) % self.global_every == 0):
            return None
        return self.sliding_window

    def layer_rope(self, i: int) -> Literal["global", "local"] | None:
        """Which RoPE table layer i uses: "local" (rope_local_theta, windowed layers), "global", or none."""
        if self.position != "rope" or (self.nope_every and (i + 1) % self.nope_every == 0):
            return None
        return "local" if self.rope_local_theta is not None and self.layer_window(i) is not None else "global"

    # ----------------------------------------------------------------------------- derived
    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids (Llama 3 has several)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count implied by the shapes (tied weights counted once); `active`: those one
        token runs through (of a mixture of experts, only the experts_per_token it is routed to)."""
        d, hd = self.n_embd, self.head_dim
        q, kv = self.n_head * hd, self.n_kv_head * hd
        norm = d * (2 if self.norm == "layernorm" else 1)
        attn = d * (q + 2 * kv) + q * d
        attn += {None: 0, "head": 2 * hd, "all": q + kv}[self.qk_norm]
        if self.bias:
            attn += q + 2 * kv + d
        elif self.qkv_bias:
            attn += q + 2 * kv
        n_mats = 3 if self.mlp in ("swiglu", "geglu", "relu2_glu") else 2
        mlp = n_mats * d * self.intermediate_size
        if self.sub_norms:
            attn, mlp = attn + q, mlp + self.intermediate_size
        if self.bias:
            mlp += self.intermediate_size + d
        experts = self.experts_per_token if active else self.n_experts
        moe = d * self.n_experts + experts * 3 * d * (self.moe_intermediate_size or self.intermediate_size)
        if self.shared_expert_size:
            moe += 3 * d * self.shared_expert_size + d
        norms = 1 if self.parallel == "shared-norm" else 4 if self.norm_position == "sandwich" else 2
        total = sum(attn + (moe if self.is_moe_layer(i) else mlp) + norms * norm for i in range(self.n_layer))
        total += norm + self.vocab_size * d + (self.vocab_size if self.head_bias else 0)
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
_GEMMA = dict(norm="rmsnorm", mlp="geglu", position="rope", norm_position="sandwich", scale_embeddings=True,
              tie_embeddings=True, norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0)

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
    # The families of issue 16 (shapes from each model's config.json; parameter counts checked
    # against transformers and the published figures in tests/test_families.py).
    "qwen3-0.6b": dict(_LLAMA, family="qwen3", vocab_size=151936, block_size=40960, n_layer=28, n_head=16,
                       n_kv_head=8, head_dim=128, n_embd=1024, intermediate_size=3072, norm_eps=1e-6,
                       rope_theta=1000000.0, qk_norm="head", tie_embeddings=True, bos_token_id=151643,
                       eos_token_id=151645),
    "gemma-2-2b": dict(_GEMMA, family="gemma2", vocab_size=256000, block_size=8192, n_layer=26, n_head=8,
                       n_kv_head=4, head_dim=256, n_embd=2304, intermediate_size=9216, sliding_window=4096,
                       global_every=2, attn_softcap=50.0, final_softcap=30.0, attention_scale=256 ** -0.5),
    "gemma-3-1b": dict(_GEMMA, family="gemma3_text", vocab_size=262144, block_size=32768, n_layer=26, n_head=4,
                       n_kv_head=1, head_dim=256, n_embd=1152, intermediate_size=6912, sliding_window=512,
                       global_every=6, qk_norm="head", rope_theta=1000000.0, rope_local_theta=10000.0,
                       attention_scale=256 ** -0.5, eos_token_id=[1, 106]),
    "phi-3-mini": dict(_LLAMA, family="phi3", vocab_size=32064, block_size=4096, n_layer=32, n_head=32,
                       n_embd=3072, intermediate_size=8192, sliding_window=2047, bos_token_id=1,
                       eos_token_id=32000, pad_token_id=32000),
    "olmo-2-1b": dict(_LLAMA, family="olmo2", vocab_size=100352, block_size=4096, n_layer=16, n_head=16,
                      n_embd=2048, intermediate_size=8192, norm_eps=1e-6, rope_theta=500000.0, qk_norm="all",
                      norm_position="post", bos_token_id=None, eos_token_id=100257, pad_token_id=100277),
    "pythia-160m": dict(family="gpt_neox", norm="layernorm", mlp="gelu_exact", position="rope", bias=True,
                        parallel="two-norms", vocab_size=50304, block_size=2048, n_layer=12, n_head=12, n_embd=768,
                        intermediate_size=3072, rotary_dim=16, bos_token_id=0, eos_token_id=0),
    "falcon-7b": dict(family="falcon", norm="layernorm", mlp="gelu_exact", position="rope", parallel="shared-norm",
                      vocab_size=65024, block_size=2048, n_layer=32, n_head=71, n_kv_head=1, n_embd=4544,
                      intermediate_size=18176, tie_embeddings=True, bos_token_id=11, eos_token_id=11),
    "phi-2": dict(family="phi", norm="layernorm", mlp="gelu", position="rope", bias=True, parallel="shared-norm",
                  head_bias=True, vocab_size=51200, block_size=2048, n_layer=32, n_head=32, n_embd=2560,
                  intermediate_size=10240, rotary_dim=32, bos_token_id=50256, eos_token_id=50256),
    "smollm3-3b": dict(_LLAMA, family="smollm3", vocab_size=128256, block_size=65536, n_layer=36, n_head=16,
                       n_kv_head=4, n_embd=2048, intermediate_size=11008, norm_eps=1e-6, rope_theta=5000000.0,
                       nope_every=4, tie_embeddings=True, bos_token_id=128000, eos_token_id=128012,
                       pad_token_id=128004),
    # Mixtures of experts (issue 15; total and active counts checked against the published ones).
    "mixtral-8x7b": dict(_LLAMA, family="mixtral", vocab_size=32000, block_size=32768, n_layer=32, n_head=32,
                         n_kv_head=8, n_embd=4096, intermediate_size=14336, rope_theta=1000000.0, n_experts=8,
                         experts_per_token=2),
    "qwen1.5-moe-a2.7b": dict(_LLAMA, family="qwen2_moe", vocab_size=151936, block_size=8192, n_layer=24, n_head=16,
                              n_embd=2048, intermediate_size=5632, norm_eps=1e-6, rope_theta=1000000.0,
                              qkv_bias=True, n_experts=60, experts_per_token=4, moe_intermediate_size=1408,
                              shared_expert_size=5632, norm_topk_prob=False, bos_token_id=151643,
                              eos_token_id=151643),
    "olmoe-1b-7b": dict(_LLAMA, family="olmoe", vocab_size=50304, block_size=4096, n_layer=16, n_head=16,
                        n_embd=2048, intermediate_size=1024, qk_norm="all", n_experts=64, experts_per_token=8,
                        norm_topk_prob=False, bos_token_id=None, eos_token_id=50279, pad_token_id=1),
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
