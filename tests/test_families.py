"""The model families beyond GPT-2/LLaMA as Config switches, against transformers: Qwen3, Gemma 2
and 3, Phi-3, OLMo 2, GPT-NeoX, Falcon (7B's multi-query and 40B's grouped two-norm block),
Phi-2 and SmolLM3. Each tiny random config exercises its family's switches (Gemma's windows
are shorter than the test sequence, its soft-caps are small enough to bend the values); logits
must equal transformers' within 1e-4 (fp32), greedy 64 tokens must be identical, and the
checkpoint must survive emergence -> HF -> transformers and back. The presets' parameter
counts equal transformers' on the published configs."""

from __future__ import annotations

import json

import pytest
import torch

from emergence import load
from emergence.config import PRESETS, Config
from emergence.errors import ConfigError, InvalidArgument
from emergence.weights.hf import load_hf, save_hf
from emergence.weights.hf_config import config_from_hf

from conftest import VOCAB, assert_as_exact_as_peft, save_random_hf  # noqa: E402

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_configs() -> dict:
    import transformers as tf

    four = dict(COMMON, num_hidden_layers=4)
    return {
        "qwen3": tf.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
        "gemma2": tf.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
        "gemma3_text": tf.Gemma3TextConfig(**four, num_key_value_heads=1, head_dim=32, sliding_window=8,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                        "sliding_attention"],
                                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                            "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                                           query_pre_attn_scalar=16, final_logit_softcapping=4.0),
        "phi3": tf.Phi3Config(**COMMON, num_key_value_heads=2, sliding_window=8, partial_rotary_factor=0.5),
        "olmo2": tf.Olmo2Config(**COMMON, num_key_value_heads=2),
        "gpt_neox": tf.GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=True),
        "falcon": tf.FalconConfig(**{k: v for k, v in COMMON.items() if k != "intermediate_size"},
                                  multi_query=True, parallel_attn=True),
        "falcon-grouped": tf.FalconConfig(**{k: v for k, v in COMMON.items() if k != "intermediate_size"},
                                          new_decoder_architecture=True, num_kv_heads=2, bias=True),
        "phi": tf.PhiConfig(**COMMON, partial_rotary_factor=0.4),
        "smollm3": tf.SmolLM3Config(**four, num_key_value_heads=2, no_rope_layer_interval=2, tie_word_embeddings=True,
                                    no_rope_layers=[1, 0, 1, 0]),
    }


CASES = list(tiny_configs())
_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module", params=CASES)
def family_model(request, tmp_path_factory):
    """(case, transformers model, folder with its checkpoint and a tokenizer)."""
    case = request.param
    if case not in _CACHE:
        folder = tmp_path_factory.mktemp(case)
        _CACHE[case] = (case, save_random_hf(tiny_configs()[case], CASES.index(case), folder), folder)
    return _CACHE[case]


def test_logits_match_transformers(family_model):
    case, hf, folder = family_model
    model, config = load_hf(folder)
    assert config.family == case.split("-")[0]
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 40))  # 40 > the windows of 8
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (3, 40, VOCAB)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_the_switches_are_active(family_model):
    """Each case really exercises what it names (a config that silently fell back would pass)."""
    case, _, folder = family_model
    c = load_hf(folder)[1]
    expected = {
        "qwen3": dict(qk_norm="head", head_dim=32),
        "gemma2": dict(norm_position="sandwich", mlp="geglu", scale_embeddings=True, attn_softcap=3.0,
                       final_softcap=2.0, global_every=2, sliding_window=8, attention_scale=24 ** -0.5),
        "gemma3_text": dict(qk_norm="head", norm_position="sandwich", global_every=3, rope_local_theta=100.0,
                            rope_theta=1e6, final_softcap=4.0, attention_scale=0.25),
        "phi3": dict(sliding_window=8, rotary_dim=8),
        "olmo2": dict(qk_norm="all", norm_position="post"),
        "gpt_neox": dict(parallel="two-norms", rotary_dim=4, mlp="gelu_exact", bias=True, norm="layernorm"),
        "falcon": dict(parallel="shared-norm", n_kv_head=1, bias=False, tie_embeddings=True),
        "falcon-grouped": dict(parallel="two-norms", n_kv_head=2, bias=True),
        "phi": dict(parallel="shared-norm", rotary_dim=6, head_bias=True, mlp="gelu"),
        "smollm3": dict(nope_every=2),
    }[case]
    assert {k: getattr(c, k) for k in expected} == expected
    if case == "smollm3":
        assert [c.layer_rope(i) for i in range(4)] == ["global", None, "global", None]
    if case == "gemma3_text":
        assert [(c.layer_window(i), c.layer_rope(i)) for i in range(4)] == [
            (8, "local"), (8, "local"), (None, "global"), (8, "local")]


def test_logits_with_left_padding_match_transformers(family_model):
    _, hf, folder = family_model
    model, _ = load_hf(folder)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    ids[0, :7] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens through its own KV cache, with no end id (generate() would
    stop at one, and min_new_tokens would mask it instead of choosing it)."""
    out, tokens = hf(torch.tensor([prompt]), use_cache=True), []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = hf(torch.tensor([[tokens[-1]]]), cache=out.past_key_values, use_cache=True)
    return tokens


def test_greedy_64_tokens_identical_to_transformers(family_model):
    _, hf, folder = family_model
    lm = load(folder, device="cpu")
    prompt = [1, 17, 42, 5, 88, 23, 9, 61]
    with torch.no_grad():
        expected = hf_greedy(hf, prompt, 64)
    ours = lm.complete(prompt, temperature=0, max_new_tokens=64, ignore_eos=True)
    assert ours.token_ids == expected


def test_save_hf_loads_in_transformers_with_equal_logits(family_model, tmp_path):
    import transformers as tf

    case, hf, folder = family_model
    model, config = load_hf(folder)
    save_hf(model, tmp_path)
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again, config2 = load_hf(tmp_path)
    assert config2.to_dict() | {"name": None} == config.to_dict() | {"name": None}
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = hf(ids).logits
        assert (theirs(ids).logits - reference).abs().max().item() <= 1e-4
        assert torch.equal(again(ids), model(ids))
    written = {k: torch.equal(a, b) for (k, a), (_, b) in zip(sorted(hf.state_dict().items()),
                                                              sorted(theirs.state_dict().items()))}
    assert all(written.values()), [k for k, same in written.items() if not same]


# Real shapes: the presets' counts equal transformers' on the same config.json, and the published
# figure in billions, to the digits it is published with (model cards and the Hub's counts).
PUBLISHED = {"qwen3-0.6b": "0.6", "gemma-2-2b": "2.61", "gemma-3-1b": "1.00", "phi-3-mini": "3.82",
             "olmo-2-1b": "1.48", "pythia-160m": "0.162", "falcon-7b": "7", "phi-2": "2.78", "smollm3-3b": "3.08"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts_equal_transformers(name):
    import transformers as tf

    config = Config.from_name(name)
    hf = config.to_hf()
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**hf))
    theirs = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert config.num_parameters() == theirs
    digits = len(PUBLISHED[name].partition(".")[2])
    assert f"{theirs / 1e9:.{digits}f}" == PUBLISHED[name]
    assert config_from_hf(json.loads(json.dumps(hf))).to_dict() | {"name": None} == config.to_dict() | {"name": None}


def test_every_family_has_a_preset_and_a_case():
    families = {PRESETS[name]["family"] for name in PUBLISHED}
    assert families == {case.split("-")[0] for case in CASES}


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(qk_norm="head"), r"qk_norm='head' is a switch of qwen3, olmo2, gemma3_text, olmoe; a 'llama' model has none"),
    (dict(family="gemma2", parallel="shared-norm"), r"parallel='shared-norm' is a switch of gpt_neox, falcon, phi"),
    (dict(family="qwen3", final_softcap=30.0), r"final_softcap=30.0 is a switch of gemma2, gemma3_text"),
    (dict(family="phi", rotary_dim=3, n_embd=64, n_head=4), r"rotary_dim=3 must be even"),
    (dict(family="gemma2", global_every=2), r"describe windowed layers: set sliding_window"),
    (dict(family="gemma2", sliding_window=8, global_every=1), r"global_every=1 makes every layer global"),
    (dict(family="falcon", parallel="two-norms", norm_position="post"), r"norm_position='post' is a switch of"),
    (dict(qk_norm="each"), r"qk_norm must be one of"),
])
def test_switch_combinations_no_family_uses_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


@pytest.mark.parametrize("hf, match", [
    (dict(model_type="gemma"), r"nearest supported family is 'gemma2', which lacks Gemma 1 has neither"),
    (dict(model_type="olmo"), r"nearest supported family is 'olmo2'"),
    (dict(model_type="gptj"), r"nearest supported family is 'gpt_neox', which lacks GPT-J's interleaved rotary"),
    (dict(model_type="mpt"), r"'falcon', which lacks ALiBi positions"),
    (dict(model_type="bert"), r"unknown architecture 'bert'; supported model_type: gpt2, llama"),
    (dict(COMMON, model_type="falcon", alibi=True), r"unsupported falcon option alibi=True"),
    (dict(COMMON, model_type="phi", qk_layernorm=True), r"unsupported phi option qk_layernorm=True"),
    (dict(COMMON, model_type="gemma3_text", rope_parameters={"full_attention": {"rope_type": "yarn"}}),
     r"unsupported rope scaling type 'yarn'"),
    (dict(COMMON, model_type="smollm3", no_rope_layers=[1, 0, 0, 1], num_hidden_layers=4),
     r"layers without RoPE must fall on every k-th layer, got layers \[1, 2\]"),
    (dict(COMMON, model_type="gemma2", sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
     r"global layers must fall on every k-th layer"),
])
def test_checkpoints_of_uncovered_families_name_the_nearest(hf, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(hf)


# ------------------------------------------------------------------------------ adapters
PEFT_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]}


def test_peft_lora_adapters_both_ways(family_model, tmp_path):
    """A LoRA made by peft loads here with peft's logits, and ours loads in peft with ours
    (GPT-NeoX and Falcon fuse q/k/v in another row order: refused with the reason)."""
    import peft
    import transformers as tf

    from emergence.adapters import LoraSpec, add_adapter, load_adapter, save_adapter

    case, _, folder = family_model
    family = case.split("-")[0]
    model, _ = load_hf(folder)
    if family in ("gpt_neox", "falcon"):
        with pytest.raises(InvalidArgument, match=f"adapters are not defined for the {family} family .*q/k/v"):
            add_adapter(model, LoraSpec(r=4, targets="all-linear"))
        return
    targets = PEFT_TARGETS.get(family, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(11)
    pm = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(folder).eval(),
                             peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)).eval()
    pm.save_pretrained(tmp_path / "theirs")
    load_adapter(model, tmp_path / "theirs")
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        theirs, ours = pm(ids).logits, model(ids)
        with pm.disable_adapter():
            plain = pm.get_base_model()(ids).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapter matters
    assert_as_exact_as_peft(ours, theirs, pm, ids)

    mine, _ = load_hf(folder)
    torch.manual_seed(3)
    add_adapter(mine, LoraSpec(r=4, alpha=8, targets="all-linear"))
    for name, p in mine.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained-looking adapter: B starts at zero
    save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(folder), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (mine(ids) - plain).abs().max() > 1e-2
        assert_as_exact_as_peft(mine(ids), back(ids).logits, back, ids)


# --------------------------------------------------------------------------------- decode
def assert_native_runs_as_eager(folder, dtype) -> None:
    """40 tokens one by one after a prefill of 5 (windows of 8 slide), and five rows of 1 to 30
    tokens decoded together over blocks of 5 slots: the native step against the eager forward,
    with test_kernels.py's bounds (fp32: rounding; bf16: as accurate as the eager bf16 forward)."""
    from emergence.decode import make_backend
    from emergence.kv_cache import PagedKVCache

    from test_kernels import EXT, NATIVE, _batched, _steps, assert_native_close, fp32_twin

    model, config = load_hf(folder, dtype=dtype)
    if EXT is not None:
        assert make_backend(model, PagedKVCache(config, 4, dtype=dtype), "auto").name == "native"
    bf16 = dtype == torch.bfloat16
    twin = fp32_twin(model) if bf16 else None
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (40,)).tolist()
    assert_native_close(_steps(model, NATIVE, ids, 5)[0], _steps(model, "eager", ids, 5)[0],
                        (lambda: _steps(twin, "eager", ids, 5)[0]) if bf16 else None)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (30, 1, 17, 4, 30)]
    steps = torch.randint(3, VOCAB, (5, 12))
    assert_native_close(_batched(model, NATIVE, prompts, steps, 5)[0], _batched(model, "eager", prompts, steps, 5)[0],
                        (lambda: _batched(twin, "eager", prompts, steps, 5)[0]) if bf16 else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_step_runs_every_family_as_the_eager_forward(family_model, dtype):
    """decode.cpp follows every switch (assert_native_runs_as_eager)."""
    assert_native_runs_as_eager(family_model[2], dtype)
