"""Config: presets against published parameter counts and transformers, the config.json mapping
(both transformers spellings) in both directions, and the errors bad configs raise."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from emergence.config import FAMILIES, PRESETS, Config
from emergence.weights.hf_config import SIGNATURES
from emergence.errors import ConfigError, EmergenceError
from emergence.model import Transformer

# Parameter counts published for (or computed by transformers from) the real checkpoints.
PUBLISHED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "llama-2-7b": 6_738_415_616,
    "llama-3.2-1b": 1_235_814_400,
    "tinyllama-1.1b": 1_100_048_384,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen3-0.6b": 596_049_920,
    "gemma-2-2b": 2_614_341_888,
    "gemma-3-1b": 999_885_952,
    "phi-3-mini": 3_821_079_552,
    "olmo-2-1b": 1_484_916_736,
    "pythia-160m": 162_322_944,
    "falcon-7b": 6_921_720_704,
    "phi-2": 2_779_683_840,
    "smollm3-3b": 3_075_098_624,
    "mixtral-8x7b": 46_702_792_704,
    "qwen1.5-moe-a2.7b": 14_315_784_192,
    "olmoe-1b-7b": 6_919_161_856,
}


def unique_numel(module: torch.nn.Module) -> int:
    """Parameters counted once each, however many modules share them (tied heads)."""
    return sum(p.numel() for p in {id(p): p for _, p in module.named_parameters(remove_duplicate=False)}.values())


def hf_model_on_meta(config: Config):
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def without_name(c: Config) -> Config:
    return dataclasses.replace(c, name="-")


# ------------------------------------------------------------------------------- presets
def test_every_real_preset_has_a_published_count():
    # tiny-* test shapes and our own training shapes (emergence-*, nanogpt-small) have no published count
    real = {name for name in PRESETS if not name.startswith(("tiny-", "emergence-", "nanogpt-"))}
    assert real == set(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(name):
    config = Config.from_name(name)
    assert config.name == name
    with torch.device("meta"):
        model = Transformer(config)
    assert all(p.is_meta for p in model.parameters())
    count = unique_numel(model)
    if name in PUBLISHED:
        assert count == PUBLISHED[name]
    assert config.num_parameters() == count
    assert model.num_parameters() == count
    assert (model.lm_head.weight is model.tok_embeddings.weight) == config.tie_embeddings


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_to_hf_builds_the_same_transformers_model(name):
    config = Config.from_name(name)
    hf = hf_model_on_meta(config)
    assert type(hf).__name__ == config.to_hf()["architectures"][0]
    assert unique_numel(hf) == config.num_parameters()
    if name in PUBLISHED:
        assert unique_numel(hf) == PUBLISHED[name]
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert tied == config.tie_embeddings
    # transformers' own (5.x spelling, rope_parameters) config.json reads back to the same Config
    assert without_name(Config.from_hf(hf.config.to_dict())) == without_name(config)


def test_llama3_scaling_reaches_transformers():
    hf = hf_model_on_meta(Config.from_name("llama-3.2-1b")).config
    rope = hf.rope_parameters
    assert rope["rope_type"] == "llama3"
    assert rope["rope_theta"] == 500000.0
    assert (rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == (32.0, 1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192


def test_mistral_window_reaches_transformers():
    hf = hf_model_on_meta(Config.from_name("mistral-7b")).config
    assert hf.sliding_window == 4096
    assert hf.num_key_value_heads == 8


def test_qwen2_window_reaches_every_transformers_layer():
    """emergence slides the window in every layer; transformers' Qwen2 slides it only in layers
    i >= max_window_layers, so config.json must say max_window_layers=0."""
    config = Config.from_name("tiny-llama", family="qwen2", qkv_bias=True, sliding_window=16)
    hf = hf_model_on_meta(config).config
    assert hf.sliding_window == 16
    assert hf.layer_types == ["sliding_attention"] * config.n_layer


def test_qwen2_without_window_is_full_attention_in_transformers():
    hf = hf_model_on_meta(Config.from_name("qwen2.5-0.5b")).config
    assert hf.sliding_window is None
    assert set(hf.layer_types) == {"full_attention"}


# ------------------------------------------------------------------ from_hf, hand-written
# config.json files as published (abridged only of training-time fields).
GPT2_JSON = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
    "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257,
}
LLAMA32_1B_JSON_V4 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
MISTRAL_7B_JSON = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 32000,
}
QWEN25_05B_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def llama32_json_v5() -> dict:
    """The same model in the transformers 5.x spelling: theta and scaling in rope_parameters."""
    hf = {k: v for k, v in LLAMA32_1B_JSON_V4.items() if k not in ("rope_scaling", "rope_theta")}
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return hf


def test_from_hf_gpt2():
    c = Config.from_hf(GPT2_JSON)
    assert c == Config.from_name("gpt2")  # the preset is named "gpt2" too
    assert (c.family, c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim) == ("gpt2", 768, 12, 12, 12, 64)
    assert (c.vocab_size, c.block_size, c.intermediate_size, c.norm_eps) == (50257, 1024, 3072, 1e-5)
    assert (c.norm, c.mlp, c.position, c.bias, c.qkv_bias) == ("layernorm", "gelu", "learned", True, False)
    assert c.tie_embeddings is True and c.sliding_window is None and c.rope_scaling is None
    assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (50256, [50256], None)


def test_from_hf_gpt2_optional_fields():
    c = Config.from_hf(dict(GPT2_JSON, n_inner=1000, layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                            pad_token_id=50256, n_positions=2048, _name_or_path="my-gpt"))
    assert (c.name, c.intermediate_size, c.norm_eps, c.tie_embeddings, c.pad_token_id, c.block_size) == (
        "my-gpt", 1000, 1e-6, False, 50256, 2048)
    mlp_change = 12 * ((2 * 768 * 1000 + 1000) - (2 * 768 * 3072 + 3072))  # two matrices + up bias per layer
    assert c.num_parameters() == 124_439_808 + mlp_change + 1024 * 768 + 50257 * 768  # + positions + own head


@pytest.mark.parametrize("spelling", ["transformers4", "transformers5"])
def test_from_hf_llama3_rope_scaling(spelling):
    hf = LLAMA32_1B_JSON_V4 if spelling == "transformers4" else llama32_json_v5()
    c = Config.from_hf(hf)
    assert c.name == "llama" and c.family == "llama"
    assert without_name(c) == without_name(Config.from_name("llama-3.2-1b"))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192.0}
    assert (c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size) == (2048, 16, 32, 8, 64, 8192)
    assert (c.vocab_size, c.block_size, c.norm_eps, c.tie_embeddings) == (128256, 131072, 1e-5, True)
    assert (c.norm, c.mlp, c.position, c.bias, c.qkv_bias, c.sliding_window) == (
        "rmsnorm", "swiglu", "rope", False, False, None)
    assert (c.bos_token_id, c.eos_token_ids) == (128000, [128001])


def test_from_hf_llama_plain_rope_both_spellings():
    base = {k: v for k, v in LLAMA32_1B_JSON_V4.items() if k not in ("rope_scaling", "rope_theta")}
    v4 = Config.from_hf(dict(base, rope_theta=250000.0, rope_scaling=None))
    v5 = Config.from_hf(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 250000.0}))
    assert v4 == v5
    assert (v4.rope_theta, v4.rope_scaling) == (250000.0, None)
    assert Config.from_hf(base).rope_theta == 10000.0  # neither spelling: the LLaMA default


def test_from_hf_llama_eos_list_and_defaults():
    hf = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "intermediate_size": 128, "vocab_size": 100, "eos_token_id": [5, 6, 7], "bos_token_id": 4}
    c = Config.from_hf(hf)
    assert c.eos_token_ids == [5, 6, 7]
    assert (c.n_kv_head, c.head_dim, c.block_size, c.norm_eps, c.rope_theta, c.tie_embeddings) == (
        4, 16, 2048, 1e-6, 10000.0, False)


def test_from_hf_mistral_sliding_window():
    c = Config.from_hf(MISTRAL_7B_JSON)
    assert c.name == "mistral"
    assert without_name(c) == without_name(Config.from_name("mistral-7b"))
    assert (c.family, c.sliding_window, c.n_kv_head, c.intermediate_size, c.block_size) == (
        "mistral", 4096, 8, 14336, 32768)
    assert (c.qkv_bias, c.tie_embeddings, c.rope_scaling, c.rope_theta) == (False, False, None, 10000.0)
    # Mistral v0.2+ turned the window off with null
    assert Config.from_hf(dict(MISTRAL_7B_JSON, sliding_window=None)).sliding_window is None


def test_from_hf_qwen2_window_off():
    c = Config.from_hf(QWEN25_05B_JSON)
    assert c.name == "qwen2"
    assert without_name(c) == without_name(Config.from_name("qwen2.5-0.5b"))
    assert (c.family, c.sliding_window, c.qkv_bias, c.bias, c.tie_embeddings) == ("qwen2", None, True, False, True)
    assert (c.n_head, c.n_kv_head, c.head_dim, c.norm_eps, c.rope_theta) == (14, 2, 64, 1e-6, 1000000.0)
    # a window size without use_sliding_window is ignored, as transformers does
    assert Config.from_hf(dict(QWEN25_05B_JSON, sliding_window=4096)).sliding_window is None


def test_from_hf_qwen2_window_on_in_every_layer():
    c = Config.from_hf(dict(QWEN25_05B_JSON, use_sliding_window=True, sliding_window=4096, max_window_layers=0))
    assert c.sliding_window == 4096
    assert without_name(c) == without_name(Config.from_name("qwen2.5-0.5b", sliding_window=4096))


def test_from_hf_qwen2_window_on_but_no_layer_slides():
    """transformers slides the window only in layers i >= max_window_layers: with
    max_window_layers >= num_hidden_layers (24 here, as in the published file) no layer does."""
    c = Config.from_hf(dict(QWEN25_05B_JSON, use_sliding_window=True, sliding_window=4096))
    assert c.sliding_window is None


def test_from_hf_qwen2_window_in_some_layers_only_is_refused():
    with pytest.raises(ConfigError):
        Config.from_hf(dict(QWEN25_05B_JSON, use_sliding_window=True, sliding_window=4096, max_window_layers=12))


def test_from_hf_reads_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MISTRAL_7B_JSON), encoding="utf-8")
    assert Config.from_hf(path) == Config.from_hf(MISTRAL_7B_JSON)
    assert Config.from_hf(str(path)) == Config.from_hf(MISTRAL_7B_JSON)


# ---------------------------------------------------------------------- to_hf -> from_hf
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trip(name):
    config = Config.from_name(name)
    hf = config.to_hf()
    assert json.loads(json.dumps(hf)) == hf  # plain JSON
    assert without_name(Config.from_hf(hf)) == without_name(config)


@st.composite
def configs(draw) -> Config:
    family = draw(st.sampled_from(FAMILIES))
    n_head = draw(st.integers(1, 8))
    head_dim = 2 * draw(st.integers(1, 12))
    ids = st.none() | st.integers(0, 63)
    common = dict(
        family=family, vocab_size=draw(st.integers(1, 64)) * 2, block_size=draw(st.integers(1, 4096)),
        n_layer=draw(st.integers(1, 64)), n_head=n_head, intermediate_size=draw(st.integers(1, 4096)),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12, 3e-7])), tie_embeddings=draw(st.booleans()),
        bos_token_id=draw(ids), eos_token_id=draw(ids | st.lists(st.integers(0, 63), min_size=1, max_size=3)),
        pad_token_id=draw(ids),
    )
    if family == "gpt2":
        return Config(**common, n_embd=n_head * head_dim, norm="layernorm", mlp="gelu", position="learned",
                      bias=True)
    n_kv_head = draw(st.sampled_from([d for d in range(1, n_head + 1) if n_head % d == 0]))
    theta = draw(st.sampled_from([10000.0, 500000.0, 1e6, 1234.5]))
    if family in ("gpt_neox", "falcon", "phi"):  # head_dim = n_embd / n_head, LayerNorm, GELU
        switches = dict(SIGNATURES[family], n_embd=n_head * head_dim, head_dim=head_dim, rope_theta=theta)
        if family == "gpt_neox":
            switches.update(mlp=draw(st.sampled_from(["gelu_exact", "gelu"])), parallel=draw(st.sampled_from([None, "two-norms"])))
        if family == "falcon":
            parallel = draw(st.sampled_from([None, "shared-norm", "two-norms"]))  # grouped heads: parallel only
            kv = n_kv_head if parallel else draw(st.sampled_from([1, n_head]))
            switches.update(n_kv_head=kv, bias=draw(st.booleans()), parallel=parallel)
        if family == "phi":
            switches["n_kv_head"] = n_kv_head
        if family != "falcon":
            switches["rotary_dim"] = draw(st.none() | st.integers(1, head_dim // 2).map(lambda k: 2 * k))
            if switches["rotary_dim"] == head_dim:
                switches["rotary_dim"] = None
        return Config(**common, **switches)
    scaling = draw(st.none() | st.fixed_dictionaries({
        "factor": st.sampled_from([2.0, 8.0, 32.0]), "low_freq_factor": st.sampled_from([1.0, 2.0]),
        "high_freq_factor": st.sampled_from([4.0, 8.0]),
        "original_max_position_embeddings": st.sampled_from([512.0, 8192.0])}))
    if family in ("phi3", "olmo2", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "olmoe"):
        scaling = None
    windowed = ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe")
    window = draw(st.none() | st.integers(1, 8192)) if family in windowed else None
    switches = dict(SIGNATURES[family])
    if family in ("gemma2", "gemma3_text"):
        switches.update(attention_scale=draw(st.integers(1, 512)) ** -0.5,
                        attn_softcap=draw(st.none() | st.sampled_from([50.0, 3.5])),
                        final_softcap=draw(st.none() | st.sampled_from([30.0, 0.25])))
        if window is not None:
            switches["global_every"] = draw(st.none() | st.integers(2, 7))
            if family == "gemma3_text":
                switches["rope_local_theta"] = draw(st.sampled_from([10000.0, 100.0]))
    if family == "smollm3":
        switches["nope_every"] = draw(st.none() | st.integers(1, 5))
    if family in ("mixtral", "qwen2_moe", "olmoe"):
        n_experts = draw(st.integers(1, 16))
        switches.update(n_experts=n_experts, experts_per_token=draw(st.integers(1, n_experts)),
                        norm_topk_prob=family == "mixtral" or draw(st.booleans()))
        if family == "mixtral":
            switches["router_jitter"] = draw(st.sampled_from([0.0, 0.01]))
        if family == "qwen2_moe":
            switches.update(moe_intermediate_size=draw(st.integers(1, 512)), moe_every=draw(st.integers(1, 3)),
                            shared_expert_size=draw(st.integers(1, 512)))
    if family == "phi3":
        switches["rotary_dim"] = draw(st.none() | st.integers(1, head_dim // 2 - 1).map(lambda k: 2 * k)) \
            if head_dim > 2 else None
    n_embd = n_head * head_dim if family == "bitnet" else draw(st.integers(1, 256)) * 2  # BitNet: n_embd-wide sub-norm
    if family == "bitnet":
        switches["mlp"] = draw(st.sampled_from(["relu2_glu", "swiglu"]))
    return Config(**common, n_embd=n_embd, n_kv_head=n_kv_head, head_dim=head_dim,
                  rope_theta=theta, rope_scaling=scaling, sliding_window=window, **switches)


@settings(max_examples=300, deadline=None)
@given(configs())
def test_round_trip_is_identity(config):
    hf = config.to_hf()
    assert json.loads(json.dumps(hf)) == hf
    assert without_name(Config.from_hf(hf)) == without_name(config)


@pytest.mark.parametrize("change", [dict(n_kv_head=2), dict(head_dim=32)], ids=["gqa", "head_dim"])
def test_to_hf_refuses_gpt2_shapes_config_json_cannot_record(change):
    """GPT-2's config.json has no num_key_value_heads or head_dim: writing such a config would
    silently produce a model of other shapes (neither transformers nor load_hf could read it back)."""
    config = Config.from_name("tiny-gpt2", **change)
    with pytest.raises(ConfigError):
        config.to_hf()


@pytest.mark.parametrize("change", [
    dict(family="llama", sliding_window=8),  # LLaMA's config.json has no window
    dict(family="llama", qkv_bias=True),
    dict(family="qwen2", qkv_bias=False),  # Qwen2 always has q/k/v biases
    dict(family="mistral", norm="layernorm"),
    dict(family="gpt2"),  # a LLaMA-style model cannot be written as GPT-2
], ids=["llama-window", "llama-qkv-bias", "qwen2-no-bias", "mistral-layernorm", "gpt2-rope"])
def test_to_hf_refuses_what_the_family_cannot_express(change):
    config = Config.from_name("tiny-llama", **change)
    with pytest.raises(ConfigError, match="cannot be written"):
        config.to_hf()


# -------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embd=100, n_head=12), "not divisible"),
    (dict(n_embd=768, n_head=12, n_kv_head=5), "not a multiple"),
    (dict(n_embd=768, n_head=12, n_kv_head=8), "not a multiple"),
    (dict(family="bloom"), "unknown model family"),
    (dict(n_head=0), "not divisible"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=-1), "n_layer"),
    (dict(n_embd=96, n_head=32), "even head_dim"),  # head_dim 3: RoPE rotates pairs
    (dict(norm="batchnorm"), "norm"),
    (dict(sliding_window=0), "sliding_window"),
])
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


def test_config_error_is_an_emergence_error():
    assert issubclass(ConfigError, EmergenceError)


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="unknown preset"):
        Config.from_name("gpt5")
    with pytest.raises(ConfigError, match="unknown config fields: n_heads"):
        Config.from_dict(dict(Config().to_dict(), n_heads=3))
    assert Config.from_dict(Config.from_name("llama-3.2-1b").to_dict()) == Config.from_name("llama-3.2-1b")


LLAMA_SMALL = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 128, "vocab_size": 100}


@pytest.mark.parametrize("hf, match", [
    (dict(LLAMA_SMALL, model_type="bert"), "unknown architecture 'bert'"),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "model_type"}, "unknown architecture None"),
    (dict(LLAMA_SMALL, model_type="mamba"), "unknown architecture"),
    (dict(LLAMA_SMALL, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
     "unsupported rope scaling type 'yarn'"),
    (dict(LLAMA_SMALL, rope_scaling={"type": "linear", "factor": 2.0}), "unsupported rope scaling type 'linear'"),
    (dict(LLAMA_SMALL, rope_scaling={"type": "dynamic", "factor": 2.0}), "unsupported rope scaling type 'dynamic'"),
    (dict(LLAMA_SMALL, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "unsupported rope scaling type 'yarn'"),
    (dict(LLAMA_SMALL, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks required field"),
    ({k: v for k, v in LLAMA_SMALL.items() if k != "intermediate_size"}, "intermediate_size"),
    (dict(LLAMA_SMALL, num_key_value_heads=3), "not a multiple"),
    (dict(LLAMA_SMALL, hidden_act="gelu"), "unsupported activation"),
    (dict(LLAMA_SMALL, attention_bias=True), "attention_bias"),
    (dict(LLAMA_SMALL, mlp_bias=True), "mlp_bias"),
    (dict(GPT2_JSON, n_embd=100), "not divisible"),
    (dict(GPT2_JSON, activation_function="relu"), "unsupported GPT-2 activation"),
    (dict(GPT2_JSON, scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])
def test_invalid_hf_config_raises(hf, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_hf(hf)


def test_bad_config_files_raise(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Config.from_hf(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_hf(bad)
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        Config.from_hf(bad)
