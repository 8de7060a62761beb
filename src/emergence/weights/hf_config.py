"""Hugging Face config.json <-> `Config`, for every decoder family emergence reads (FAMILIES).

Both transformers 4.x spellings (`rope_theta`, `rope_scaling`, `rotary_pct`,
`rope_local_base_freq`) and 5.x spellings (`rope_parameters`, per layer type for Gemma 3) are
read; writing emits the 4.x keys, which 5.x still accepts, plus `layer_types` where layers differ.
"""

from __future__ import annotations

from typing import Any

from ..config import FAMILIES, Config
from ..errors import ConfigError

# The LLaMA-shaped config.json fields (hidden_size, num_hidden_layers, ...) and their families.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "gemma2", "gemma3_text", "mixtral",
              "qwen2_moe", "olmoe", "bitnet")

# What each family's config.json implies without recording it: the switch values its blocks have.
_LLAMA_BLOCK = dict(norm="rmsnorm", mlp="swiglu", position="rope", bias=False, qk_norm=None,
                    norm_position="pre", parallel=None, scale_embeddings=False, head_bias=False)
_GEMMA_BLOCK = dict(_LLAMA_BLOCK, mlp="geglu", norm_position="sandwich", scale_embeddings=True)
SIGNATURES: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", mlp="gelu", position="learned", bias=True, qkv_bias=False),
    "llama": dict(_LLAMA_BLOCK, qkv_bias=False), "mistral": dict(_LLAMA_BLOCK, qkv_bias=False),
    "qwen2": dict(_LLAMA_BLOCK, qkv_bias=True), "qwen3": dict(_LLAMA_BLOCK, qkv_bias=False, qk_norm="head"),
    "smollm3": dict(_LLAMA_BLOCK, qkv_bias=False), "phi3": dict(_LLAMA_BLOCK, qkv_bias=False),
    "olmo2": dict(_LLAMA_BLOCK, qkv_bias=False, qk_norm="all", norm_position="post"),
    "gemma2": dict(_GEMMA_BLOCK, qkv_bias=False), "gemma3_text": dict(_GEMMA_BLOCK, qkv_bias=False, qk_norm="head"),
    "gpt_neox": dict(norm="layernorm", position="rope", bias=True, qkv_bias=False, qk_norm=None,
                     norm_position="pre", scale_embeddings=False, head_bias=False),
    "falcon": dict(norm="layernorm", mlp="gelu_exact", position="rope", qkv_bias=False, qk_norm=None,
                   norm_position="pre", scale_embeddings=False, head_bias=False),
    "phi": dict(norm="layernorm", mlp="gelu", position="rope", bias=True, qkv_bias=False, qk_norm=None,
                norm_position="pre", parallel="shared-norm", scale_embeddings=False, head_bias=True),
    "mixtral": dict(_LLAMA_BLOCK, qkv_bias=False), "qwen2_moe": dict(_LLAMA_BLOCK, qkv_bias=True),
    "olmoe": dict(_LLAMA_BLOCK, qkv_bias=False, qk_norm="all"),
    # BitNet's MLP is recorded (hidden_act: relu2 in BitNet b1.58 2B4T, silu in 1bitLLM's models)
    "bitnet": {**{k: v for k, v in _LLAMA_BLOCK.items() if k != "mlp"}, "qkv_bias": False, "sub_norms": True},
}
# hidden_act -> our MLP kind, for BitNet
BITNET_MLPS = {"relu2": "relu2_glu", "silu": "swiglu"}
# A model_type emergence does not read, the nearest family it does and what that family lacks.
NEAREST = {
    "gemma": ("gemma2", "Gemma 1 has neither Gemma 2's post-norms nor its soft-capping"),
    "gemma3": ("gemma3_text", "a multimodal Gemma 3 checkpoint: emergence reads the text-only gemma3_text"),
    "olmo": ("olmo2", "OLMo 1 normalises without a gain and without q/k norms"),
    "qwen3_moe": ("qwen3", "experts (a mixture-of-experts MLP)"), "phimoe": ("phi3", "experts (a mixture-of-experts MLP)"),
    "gptj": ("gpt_neox", "GPT-J's interleaved rotary pairs"), "stablelm": ("phi", "StableLM's separate per-head norms"),
    "cohere": ("llama", "Cohere's parallel block with a logit scale"), "starcoder2": ("gpt2", "rotary positions"),
    "gpt_bigcode": ("gpt2", "multi-query attention"), "bloom": ("falcon", "ALiBi positions"),
    "mpt": ("falcon", "ALiBi positions"), "qwen": ("qwen2", "Qwen 1's fused c_attn layout"),
    "granite": ("llama", "Granite's embedding, residual and logit multipliers"),
}


def _require(hf: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")


def _refuse(hf: dict[str, Any], model_type: str, **unsupported: Any) -> None:
    """One line for the first option whose value emergence has no switch for."""
    for key, bad in unsupported.items():
        if key in hf and hf[key] is not None and (hf[key] == bad if not callable(bad) else bad(hf[key])):
            raise ConfigError(f"unsupported {model_type} option {key}={hf[key]!r}")


def _rope_params(hf: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters / rope_scaling in config.json must be an object")
    if layer_type in params or "full_attention" in params:  # transformers 5: per layer type (Gemma 3)
        params = params.get(layer_type) or {}
    return params


def _rope(hf: dict[str, Any], layer_type: str = "full_attention", default_theta: float = 10000.0
          ) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling or None) from either transformers spelling."""
    params = _rope_params(hf, layer_type)
    theta = hf.get("rope_theta", params.get("rope_theta", default_theta))
    if layer_type == "sliding_attention":
        theta = hf.get("rope_local_base_freq", params.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    _require(params, *keys)
    return float(theta), {k: float(params[k]) for k in keys}


def _rotary_dim(hf: dict[str, Any], head_dim: int, default: float = 1.0) -> int | None:
    """Rotated dimensions per head from partial_rotary_factor / rotary_pct; None for all."""
    factor = hf.get("partial_rotary_factor", hf.get("rotary_pct", _rope_params(hf).get("partial_rotary_factor", default)))
    dim = int(head_dim * float(factor))
    return None if dim == head_dim else dim


def _pattern(flags: list[bool], what: str, model_type: str) -> int | None:
    """k where flags[i] == ((i + 1) % k == 0) for every layer (None: no layer flagged)."""
    if not any(flags):
        return None
    k = flags.index(True) + 1
    if any(f != ((i + 1) % k == 0) for i, f in enumerate(flags)):
        raise ConfigError(f"unsupported {model_type} layout: {what} must fall on every k-th layer, "
                          f"got layers {[i for i, f in enumerate(flags) if f]}")
    return k


def config_from_hf(hf: dict[str, Any]) -> Config:
    model_type = hf.get("model_type")
    readers = {"gpt2": _gpt2_from_hf, "gpt_neox": _gpt_neox_from_hf, "falcon": _falcon_from_hf, "phi": _phi_from_hf}
    if model_type in readers:
        return readers[model_type](hf)
    if model_type in LLAMA_LIKE:
        return _llama_from_hf(hf, model_type)
    if model_type in NEAREST:
        family, missing = NEAREST[model_type]
        raise ConfigError(f"unsupported architecture {model_type!r}: the nearest supported family is {family!r}, "
                          f"which lacks {missing}")
    raise ConfigError(f"unknown architecture {model_type!r}; supported model_type: {', '.join(FAMILIES)}")


def _gpt2_from_hf(hf: dict[str, Any]) -> Config:
    _require(hf, "n_embd", "n_layer", "n_head", "vocab_size")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"unsupported GPT-2 activation {act!r} (supported: gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise ConfigError(f"unsupported GPT-2 option {flag}=true")
    if hf.get("scale_attn_weights") is False:
        raise ConfigError("unsupported GPT-2 option scale_attn_weights=false")
    return Config(
        name=hf.get("_name_or_path") or "gpt2", family="gpt2",
        vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", position="learned",
        bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
        bos_token_id=hf.get("bos_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256),
        pad_token_id=hf.get("pad_token_id"),
    )


def _tokens(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"))


def _llama_from_hf(hf: dict[str, Any], model_type: str) -> Config:
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    gemma, bitnet = model_type in ("gemma2", "gemma3_text"), model_type == "bitnet"
    act = hf.get("hidden_activation" if gemma else "hidden_act", "gelu_pytorch_tanh" if gemma else
                 "relu2" if bitnet else "silu")
    expected = ("gelu_pytorch_tanh", "gelu_new") if gemma else tuple(BITNET_MLPS) if bitnet else ("silu",)
    if act not in expected or (gemma and hf.get("hidden_act", "gelu_pytorch_tanh") not in expected):
        raise ConfigError(f"unsupported activation {act!r} for {model_type} (supported: {', '.join(expected[:2 if bitnet else 1])})")
    if hf.get("mlp_bias"):
        raise ConfigError("unsupported option mlp_bias=true")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ConfigError(f"unsupported option attention_bias=true for {model_type}")
    n_layer = hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    window = hf.get("sliding_window")
    switches: dict[str, Any] = dict(SIGNATURES[model_type])
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        # Qwen configs carry a window size that is off unless use_sliding_window, and then
        # transformers slides it only in layers i >= max_window_layers (default 28).
        first = hf.get("max_window_layers", 28)
        if not hf.get("use_sliding_window", False) or first >= n_layer:
            window = None
        elif window is not None and first > 0:
            raise ConfigError(f"unsupported {model_type} option: a sliding window in layers {first} and up only "
                              "(max_window_layers); emergence slides it in every layer or none")
    if model_type in ("llama", "olmo2", "smollm3", "olmoe"):
        _refuse(hf, model_type, use_sliding_window=True)
        window = None
    if model_type in ("mixtral", "qwen2_moe", "olmoe"):
        switches.update(_experts_from_hf(hf, model_type))
    if model_type == "smollm3":
        no_rope = hf.get("no_rope_layers") or [1] * n_layer
        if len(no_rope) != n_layer:
            raise ConfigError(f"smollm3 no_rope_layers has {len(no_rope)} entries for {n_layer} layers")
        switches["nope_every"] = _pattern([not use for use in no_rope], "layers without RoPE", model_type)
    if gemma:
        types = hf.get("layer_types")
        if types is None:  # transformers 4.x: Gemma 2 alternates, Gemma 3 has sliding_window_pattern
            k = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
            types = ["full_attention" if (i + 1) % k == 0 else "sliding_attention" for i in range(n_layer)]
        if len(types) != n_layer or set(types) - {"full_attention", "sliding_attention"}:
            raise ConfigError(f"{model_type} layer_types must name full_attention or sliding_attention per layer")
        if "sliding_attention" not in types:
            window = None
        if window is not None:
            switches["global_every"] = _pattern([t == "full_attention" for t in types], "global layers", model_type)
        switches.update(attention_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"))
        if model_type == "gemma3_text" and window is not None:
            switches["rope_local_theta"] = _rope(hf, "sliding_attention")[0]
        _refuse(hf, model_type, use_bidirectional_attention=True)
    if model_type == "phi3":
        switches["rotary_dim"] = _rotary_dim(hf, head_dim)
    if bitnet:
        switches["mlp"] = BITNET_MLPS[act]
        if hf.get("quantization_config"):  # microsoft/bitnet-b1.58-2B-4T: 2-bit packed uint8 weights + weight_scale
            method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
            raise ConfigError(f"unsupported bitnet option quantization_config (quant_method={method!r}): emergence "
                              "reads BitNet checkpoints in the plain float layout (bf16/fp32 weights, e.g. the "
                              "-bf16 master weights), not transformers' packed uint8 one")
    theta, scaling = _rope(hf, default_theta=500000.0 if bitnet else 10000.0)
    return Config(
        name=hf.get("_name_or_path") or model_type, family=model_type,
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=n_layer, n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=head_dim,
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", gemma), sliding_window=window,
        **switches, **_tokens(hf))


def _experts_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Mixtral's, Qwen2-MoE's and OLMoE's expert fields -> the MoE switches."""
    experts = hf.get("num_local_experts" if model_type == "mixtral" else "num_experts")
    if not experts:
        raise ConfigError(f"config.json of {model_type} lacks its expert count")
    out = dict(n_experts=experts, experts_per_token=hf.get("num_experts_per_tok", 2),
               norm_topk_prob=model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)))
    if model_type == "mixtral":
        out["router_jitter"] = float(hf.get("router_jitter_noise") or 0.0)
    if model_type == "qwen2_moe":
        _refuse(hf, model_type, mlp_only_layers=lambda v: len(v) > 0)
        out.update(moe_intermediate_size=hf.get("moe_intermediate_size"), moe_every=hf.get("decoder_sparse_step", 1),
                   shared_expert_size=hf.get("shared_expert_intermediate_size") or None)
    if model_type == "olmoe":
        _refuse(hf, model_type, clip_qkv=lambda v: True)
    return out


def _gpt_neox_from_hf(hf: dict[str, Any]) -> Config:
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_fast"):
        raise ConfigError(f"unsupported activation {act!r} for gpt_neox (supported: gelu, gelu_new)")
    _refuse(hf, "gpt_neox", attention_bias=False)
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    theta = hf.get("rotary_emb_base", _rope(hf)[0])
    return Config(
        name=hf.get("_name_or_path") or "gpt_neox", family="gpt_neox", vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        **SIGNATURES["gpt_neox"], mlp="gelu_exact" if act == "gelu" else "gelu",
        norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=float(theta), rotary_dim=_rotary_dim(hf, head_dim, 0.25),
        parallel="two-norms" if hf.get("use_parallel_residual", True) else None,
        tie_embeddings=hf.get("tie_word_embeddings", False), **_tokens(hf))


def _falcon_from_hf(hf: dict[str, Any]) -> Config:
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    _refuse(hf, "falcon", alibi=True)
    act = hf.get("activation", "gelu")
    if act != "gelu":
        raise ConfigError(f"unsupported activation {act!r} for falcon (supported: gelu)")
    n_head, new_arch = hf["num_attention_heads"], hf.get("new_decoder_architecture", False)
    n_kv = hf.get("num_kv_heads") or n_head if new_arch else (1 if hf.get("multi_query", True) else n_head)
    norms = hf.get("num_ln_in_parallel_attn") or 2 if new_arch else 1
    parallel = ("two-norms" if norms == 2 else "shared-norm") if new_arch or hf.get("parallel_attn", True) else None
    return Config(
        name=hf.get("_name_or_path") or "falcon", family="falcon", vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=n_kv, n_embd=hf["hidden_size"], intermediate_size=hf.get("ffn_hidden_size") or 4 * hf["hidden_size"],
        **SIGNATURES["falcon"], bias=bool(hf.get("bias", False)), parallel=parallel,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), rope_theta=_rope(hf)[0],
        tie_embeddings=hf.get("tie_word_embeddings", True), **_tokens(hf))


def _phi_from_hf(hf: dict[str, Any]) -> Config:
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    _refuse(hf, "phi", qk_layernorm=True)
    act = hf.get("hidden_act", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"unsupported activation {act!r} for phi (supported: gelu_new)")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    return Config(
        name=hf.get("_name_or_path") or "phi", family="phi", vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 2048), n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"], **SIGNATURES["phi"],
        norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=_rope(hf)[0], rotary_dim=_rotary_dim(hf, head_dim, 0.5),
        tie_embeddings=hf.get("tie_word_embeddings", False), **_tokens(hf))


_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                  "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "falcon": "FalconForCausalLM",
                  "phi": "PhiForCausalLM", "bitnet": "BitNetForCausalLM"}
# Families whose config.json records a window for every layer (Gemma's alternate; Qwen's is all or none).
_WINDOWED = ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe")


def _check_expressible(c: Config) -> None:
    """Refuse configs whose switches the family's HF layout cannot record, naming the first."""
    wrong = [f"{k}={getattr(c, k)!r}" for k, v in SIGNATURES[c.family].items() if getattr(c, k) != v]
    if c.family == "gpt2" and not (c.n_kv_head == c.n_head and c.n_head * c.head_dim == c.n_embd):
        wrong.append("grouped-query or head_dim shapes")  # GPT-2's config.json records neither
    if c.ternary:
        wrong.append("ternary=True (save_hf writes a ternary-trained model as its ternary checkpoint)")
    if c.sliding_window is not None and c.family not in _WINDOWED:
        wrong.append(f"sliding_window={c.sliding_window}")
    if c.family == "bitnet" and c.mlp not in BITNET_MLPS.values():
        wrong.append(f"mlp={c.mlp!r}")
    if c.family == "bitnet" and c.n_head * c.head_dim != c.n_embd:
        wrong.append(f"head_dim={c.head_dim} (its attention sub-norm is n_embd wide)")
    if c.rope_scaling is not None and c.family not in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "bitnet"):
        wrong.append("rope_scaling")
    if c.family in ("gpt_neox", "phi") and c.n_kv_head != c.n_head:
        wrong.append(f"n_kv_head={c.n_kv_head}" if c.family == "gpt_neox" else "")
    if c.family in ("mixtral", "olmoe") and (c.moe_intermediate_size not in (None, c.intermediate_size)
                                             or c.moe_every != 1 or c.shared_expert_size):
        wrong.append("expert widths, sparse layers or a shared expert")  # their config.json records none
    if (c.family in ("mixtral", "qwen2_moe", "olmoe")) != (c.n_experts > 0):
        wrong.append(f"n_experts={c.n_experts}")
    if c.family == "mixtral" and not c.norm_topk_prob:
        wrong.append("norm_topk_prob=False")
    if c.family == "qwen2_moe" and not c.shared_expert_size:
        wrong.append("no shared expert")  # transformers' Qwen2-MoE block always has one
    if c.family in ("gpt_neox", "falcon", "phi") and c.n_head * c.head_dim != c.n_embd:
        wrong.append(f"head_dim={c.head_dim}")
    if c.family == "falcon" and c.parallel is None and c.n_kv_head not in (1, c.n_head):
        wrong.append(f"n_kv_head={c.n_kv_head} in a sequential block")  # grouped heads come with the parallel one
    if c.family == "gpt_neox" and (c.parallel == "shared-norm" or c.mlp not in ("gelu_exact", "gelu")):
        wrong.append(f"parallel={c.parallel!r}, mlp={c.mlp!r}")
    wrong = [w for w in wrong if w]
    if wrong:
        raise ConfigError(f"this config cannot be written as a Hugging Face {c.family!r} config.json: "
                          f"{', '.join(wrong)}")


def config_to_hf(c: Config) -> dict[str, Any]:
    _check_expressible(c)
    common = dict(architectures=[_ARCHITECTURES[c.family]], model_type=c.family, vocab_size=c.vocab_size,
                  bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_embeddings)
    if c.pad_token_id is not None:
        common["pad_token_id"] = c.pad_token_id
    if c.rope_scaling is not None and "factors" in c.rope_scaling:
        raise ConfigError("per-frequency RoPE divisors (from a GGUF rope_freqs tensor) have no config.json form")
    if c.family == "gpt2":
        return dict(common, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_positions=c.block_size,
                    n_ctx=c.block_size, n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                    activation_function="gelu_new")
    shapes = dict(common, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  intermediate_size=c.intermediate_size, max_position_embeddings=c.block_size, rope_theta=c.rope_theta)
    if c.rotary_dim is not None:
        shapes["partial_rotary_factor"] = c.rotary_dim / c.head_dim
    if c.family == "gpt_neox":
        return dict(shapes, layer_norm_eps=c.norm_eps, hidden_act="gelu" if c.mlp == "gelu_exact" else "gelu_new",
                    use_parallel_residual=c.parallel is not None, rotary_pct=(c.rotary_dim or c.head_dim) / c.head_dim,
                    rotary_emb_base=c.rope_theta, attention_bias=True)
    if c.family == "falcon":
        new_arch = c.n_kv_head not in (1, c.n_head) or c.parallel == "two-norms"
        return dict(shapes, ffn_hidden_size=c.intermediate_size, layer_norm_epsilon=c.norm_eps, bias=c.bias,
                    alibi=False, activation="gelu", multi_query=c.n_kv_head == 1, num_kv_heads=c.n_kv_head,
                    new_decoder_architecture=new_arch, parallel_attn=c.parallel is not None,
                    num_ln_in_parallel_attn=2 if c.parallel == "two-norms" else 1)
    if c.family == "phi":
        return dict(shapes, num_key_value_heads=c.n_kv_head, layer_norm_eps=c.norm_eps, hidden_act="gelu_new",
                    partial_rotary_factor=(c.rotary_dim or c.head_dim) / c.head_dim, qk_layernorm=False)
    gemma = c.family in ("gemma2", "gemma3_text")
    act = {"relu2_glu": "relu2"}.get(c.mlp, "silu")
    hf = dict(shapes, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
              **({"hidden_activation": "gelu_pytorch_tanh"} if gemma else {"hidden_act": act}))
    if c.rope_scaling is not None:
        hf["rope_scaling"] = dict(c.rope_scaling, rope_type="llama3")
        hf["rope_scaling"]["original_max_position_embeddings"] = int(c.rope_scaling["original_max_position_embeddings"])
    if c.family in ("mistral", "phi3", "mixtral"):
        hf["sliding_window"] = c.sliding_window
    if c.family == "mixtral":
        hf.update(num_local_experts=c.n_experts, num_experts_per_tok=c.experts_per_token,
                  router_jitter_noise=c.router_jitter)
    if c.family in ("qwen2_moe", "olmoe"):
        hf.update(num_experts=c.n_experts, num_experts_per_tok=c.experts_per_token, norm_topk_prob=c.norm_topk_prob)
    if c.family == "qwen2_moe":
        hf.update(moe_intermediate_size=c.moe_intermediate_size or c.intermediate_size, decoder_sparse_step=c.moe_every,
                  shared_expert_intermediate_size=c.shared_expert_size, mlp_only_layers=[])
    if c.family in ("qwen2", "qwen3", "qwen2_moe"):
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  max_window_layers=0)  # every layer slides, as in emergence
    if c.family == "smollm3":
        hf.update(no_rope_layers=[int(c.layer_rope(i) is not None) for i in range(c.n_layer)],
                  no_rope_layer_interval=c.nope_every or c.n_layer + 1, use_sliding_window=False)
    if gemma:
        types = ["sliding_attention" if c.layer_window(i) else "full_attention" for i in range(c.n_layer)]
        scalar = (c.attention_scale or c.head_dim ** -0.5) ** -2  # scale = query_pre_attn_scalar ** -0.5
        hf.update(query_pre_attn_scalar=round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                  attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap,
                  sliding_window=c.sliding_window or 4096, layer_types=types)
        if c.family == "gemma3_text":
            hf.update(rope_local_base_freq=c.rope_local_theta or c.rope_theta,
                      sliding_window_pattern=c.global_every or c.n_layer + 1)
    return hf


# ------------------------------------------------------------------------------------- T5
def t5_config_from_hf(hf: dict[str, Any], tied: bool):
    """T5ForConditionalGeneration's config.json -> T5Config. `tied`: the checkpoint has no
    separate lm_head tensor. The head is scaled by d_model ** -0.5 when transformers 5's
    `scale_decoder_outputs` says so, else (older configs) when it is tied (v1.0 is, v1.1 not)."""
    from ..t5 import T5Config

    _require(hf, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    proj = hf.get("feed_forward_proj", "relu")
    mlp = {"relu": "relu", "gated-gelu": "geglu", "gated-gelu_new": "geglu"}.get(proj)
    if mlp is None:
        raise ConfigError(f"unsupported T5 feed_forward_proj {proj!r} (supported: relu, gated-gelu)")
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    return T5Config(
        name=hf.get("_name_or_path") or "t5", vocab_size=hf["vocab_size"], n_embd=hf["d_model"], head_dim=hf["d_kv"],
        intermediate_size=hf["d_ff"], n_encoder_layer=hf["num_layers"],
        n_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
        num_buckets=hf.get("relative_attention_num_buckets", 32),
        max_distance=hf.get("relative_attention_max_distance", 128), mlp=mlp,
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), tie_embeddings=tied, scale_head=bool(scale),
        block_size=hf.get("n_positions", 512), pad_token_id=hf.get("pad_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 1), decoder_start_token_id=hf.get("decoder_start_token_id", 0))


def t5_config_to_hf(c) -> dict[str, Any]:
    return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=c.vocab_size,
                d_model=c.n_embd, d_kv=c.head_dim, d_ff=c.intermediate_size, num_layers=c.n_encoder_layer,
                num_decoder_layers=c.n_layer, num_heads=c.n_head, relative_attention_num_buckets=c.num_buckets,
                relative_attention_max_distance=c.max_distance,
                feed_forward_proj="relu" if c.mlp == "relu" else "gated-gelu", layer_norm_epsilon=c.norm_eps,
                tie_word_embeddings=c.tie_embeddings, scale_decoder_outputs=c.scale_head, n_positions=c.block_size,
                is_encoder_decoder=True, pad_token_id=c.pad_token_id, eos_token_id=c.eos_token_id,
                decoder_start_token_id=c.decoder_start_token_id)
