"""Hugging Face config.json <-> `Config`, for the GPT-2, LLaMA, Mistral and Qwen2 families.

Both transformers 4.x spellings (`rope_theta`, `rope_scaling`) and 5.x spellings
(`rope_parameters`) are read; writing emits the 4.x keys, which 5.x still accepts.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import ConfigError

LLAMA_LIKE = ("llama", "mistral", "qwen2")


def _require(hf: dict[str, Any], *keys: str) -> None:
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """(rope_theta, llama3 scaling or None) from either transformers spelling."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_parameters / rope_scaling in config.json must be an object")
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    _require(params, *keys)
    return float(theta), {k: float(params[k]) for k in keys}


def config_from_hf(hf: dict[str, Any]) -> Config:
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_from_hf(hf)
    if model_type in LLAMA_LIKE:
        return _llama_from_hf(hf, model_type)
    raise ConfigError(f"unknown architecture {model_type!r}; supported model_type: gpt2, {', '.join(LLAMA_LIKE)}")


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


def _llama_from_hf(hf: dict[str, Any], model_type: str) -> Config:
    _require(hf, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported activation {act!r} for {model_type} (supported: silu)")
    if hf.get("mlp_bias"):
        raise ConfigError("unsupported option mlp_bias=true")
    qkv_bias = model_type == "qwen2"  # Qwen2 always has q/k/v biases
    if model_type == "llama" and hf.get("attention_bias"):
        raise ConfigError("unsupported option attention_bias=true")
    window = hf.get("sliding_window")
    if model_type == "qwen2":
        # Qwen2 configs carry a window size that is off unless use_sliding_window, and then
        # transformers slides it only in layers i >= max_window_layers (default 28).
        first = hf.get("max_window_layers", 28)
        if not hf.get("use_sliding_window", False) or first >= hf["num_hidden_layers"]:
            window = None
        elif window is not None and first > 0:
            raise ConfigError(f"unsupported Qwen2 option: a sliding window in layers {first} and up only "
                              "(max_window_layers); emergence slides it in every layer or none")
    if model_type == "llama":
        window = None
    theta, scaling = _rope(hf)
    return Config(
        name=hf.get("_name_or_path") or model_type, family=model_type,
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        mlp="swiglu", position="rope", rope_theta=theta, rope_scaling=scaling, qkv_bias=qkv_bias,
        tie_embeddings=hf.get("tie_word_embeddings", False), sliding_window=window,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _check_expressible(c: Config) -> None:
    """Refuse configs whose switches the family's HF layout cannot record."""
    gpt2_like = (c.norm, c.mlp, c.position, c.bias) == ("layernorm", "gelu", "learned", True)
    llama_like = (c.norm, c.mlp, c.position, c.bias) == ("rmsnorm", "swiglu", "rope", False)
    gpt2_shapes = c.n_kv_head == c.n_head and c.n_head * c.head_dim == c.n_embd  # GPT-2 records neither
    ok = {"gpt2": gpt2_like and gpt2_shapes and not c.qkv_bias and c.sliding_window is None and c.rope_scaling is None,
          "llama": llama_like and not c.qkv_bias and c.sliding_window is None,
          "mistral": llama_like and not c.qkv_bias,
          "qwen2": llama_like and c.qkv_bias}[c.family]
    if not ok:
        raise ConfigError(f"this config cannot be written as a Hugging Face {c.family!r} config.json")


def config_to_hf(c: Config) -> dict[str, Any]:
    _check_expressible(c)
    common = dict(architectures=[_ARCHITECTURES[c.family]], model_type=c.family, vocab_size=c.vocab_size,
                  bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, tie_word_embeddings=c.tie_embeddings)
    if c.pad_token_id is not None:
        common["pad_token_id"] = c.pad_token_id
    if c.family == "gpt2":
        return dict(common, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_positions=c.block_size,
                    n_ctx=c.block_size, n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps,
                    activation_function="gelu_new")
    hf = dict(common, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
              num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
              max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, hidden_act="silu",
              rope_theta=c.rope_theta)
    if c.rope_scaling is not None and "factors" in c.rope_scaling:
        raise ConfigError("per-frequency RoPE divisors (from a GGUF rope_freqs tensor) have no config.json form")
    if c.rope_scaling is not None:
        hf["rope_scaling"] = dict(c.rope_scaling, rope_type="llama3")
        hf["rope_scaling"]["original_max_position_embeddings"] = int(c.rope_scaling["original_max_position_embeddings"])
    if c.family == "mistral":
        hf["sliding_window"] = c.sliding_window
    if c.family == "qwen2":
        hf.update(use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
                  max_window_layers=0)  # every layer slides, as in emergence
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
