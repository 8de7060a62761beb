"""BitNet (transformers' BitNetForCausalLM, the architecture of microsoft/bitnet-b1.58-2B-4T) as
Config switches: the LLaMA block with RMS sub-norms before o_proj and down_proj (sub_norms) and a
ReLU^2-gated MLP (mlp="relu2_glu"; hidden_act "silu" reads as SwiGLU). Without a
quantization_config transformers runs its linear layers as plain nn.Linear: on tiny random
configs emergence's logits equal transformers' within 1e-4 and the greedy 64 tokens are
identical; checkpoints go both ways; the native decode step runs the new switches as the eager
forward (float and ternary). llama.cpp's bitnet architecture (SiLU MLP) runs our F32 export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import emergence
from emergence.config import Config
from emergence.errors import ConfigError
from emergence.quant.linear import quantize_model
from emergence.weights.hf import load_hf, save_hf
from emergence.weights.hf_config import config_from_hf

from conftest import VOCAB, save_random_hf  # noqa: E402
from test_families import COMMON, assert_native_runs_as_eager  # noqa: E402


def bitnet_config(**changes):
    import transformers as tf

    return tf.BitNetConfig(**{**COMMON, "num_key_value_heads": 2, **changes})


CASES = {"relu2": {}, "silu-tied": dict(hidden_act="silu", tie_word_embeddings=True)}
_CACHE: dict = {}


@pytest.fixture(scope="module", params=list(CASES))
def bitnet_model(request, tmp_path_factory):
    """(case, transformers model with random norm gains, folder with its checkpoint)."""
    case = request.param
    if case not in _CACHE:
        folder = tmp_path_factory.mktemp(case)
        hf = save_random_hf(bitnet_config(**CASES[case]), list(CASES).index(case), folder)
        with torch.no_grad():  # the sub-norms' gains matter (they start at one)
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        hf.save_pretrained(folder)
        _CACHE[case] = (case, hf, folder)
    return _CACHE[case]


def test_logits_and_greedy_tokens_match_transformers(bitnet_model):
    case, hf, folder = bitnet_model
    model, config = load_hf(folder)
    assert config.family == "bitnet" and config.sub_norms
    assert config.mlp == ("relu2_glu" if case == "relu2" else "swiglu")
    ids = torch.randint(3, VOCAB, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        for block in model.layers:  # the sub-norms are active
            block.attn.sub_norm.weight.mul_(2.0)
        assert (model(ids) - theirs).abs().max().item() > 1e-2
    model, _ = load_hf(folder)
    lm = emergence.LanguageModel(model, emergence.load(folder, device="cpu").tokenizer, config)
    prompt = ids[0, :8].tolist()
    ours = lm.complete(prompt, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    assert ours == theirs


def test_save_hf_loads_in_transformers_with_equal_logits(bitnet_model, tmp_path):
    import transformers as tf

    _, hf, folder = bitnet_model
    model, config = load_hf(folder)
    save_hf(model, tmp_path)
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == "BitNetForCausalLM"
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    assert config_from_hf(config.to_hf()).to_dict() | {"name": None} == config.to_dict() | {"name": None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_step_runs_bitnet_as_the_eager_forward(bitnet_model, dtype):
    assert_native_runs_as_eager(bitnet_model[2], dtype)


def test_the_native_step_runs_a_ternary_bitnet_as_the_eager_forward(bitnet_model):
    from emergence.decode import make_backend
    from emergence.kv_cache import PagedKVCache

    from test_kernels import EXT, NATIVE, _steps, assert_native_close

    model, config = load_hf(bitnet_model[2])
    # down_proj's 96 columns do not fill the 2-bit kernel's 64-column chunks: kept float
    quantize_model(model, "ternary", act_bits=8, skip=("lm_head", "down_proj"))
    if EXT is not None:
        assert make_backend(model, PagedKVCache(config, 4), "auto").name == "native"
    ids = torch.randint(3, VOCAB, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    assert_native_close(_steps(model, NATIVE, ids, 5)[0], _steps(model, "eager", ids, 5)[0], None)


def test_llama_cpp_runs_a_bitnet_f32_export(tmp_path):
    """llama.cpp's bitnet graph: sub-norms, SiLU-gated MLP, head tied to token_embd."""
    from test_gguf_families import PROMPT, TOKENIZER, our_logits, random_model
    from test_gguf_model import llama_cpp_greedy, llama_cpp_model
    from emergence.weights.gguf_model import load_gguf, save_gguf

    config = config_from_hf(bitnet_config(hidden_act="silu", tie_word_embeddings=True, vocab_size=512,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=None).to_dict())
    model = random_model(config, seed=4)
    save_gguf(model, TOKENIZER, tmp_path / "b.gguf", "f32")
    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "b.gguf", n_ctx=128, n_threads=1), PROMPT, 64)
    lm = emergence.LanguageModel(model, TOKENIZER, model.config)
    assert lm.complete(PROMPT, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids == theirs
    assert np.abs(our_logits(model, PROMPT + theirs) - their_logits).max() <= 1e-3
    back, back_config, _ = load_gguf(tmp_path / "b.gguf")
    assert back_config.to_dict() | {"name": None} == config.to_dict() | {"name": None}


@pytest.mark.parametrize("hf, match", [
    (dict(COMMON, model_type="bitnet", quantization_config={"quant_method": "bitnet"}),
     r"unsupported bitnet option quantization_config \(quant_method='bitnet'\).*plain float layout"),
    (dict(COMMON, model_type="bitnet", hidden_act="gelu"), r"unsupported activation 'gelu' for bitnet"),
])
def test_bitnet_checkpoints_emergence_cannot_read_are_refused(hf, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(hf)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sub_norms=True), r"sub_norms=True is a switch of bitnet; a 'llama' model has none"),
    (dict(mlp="relu2_glu"), r"mlp='relu2_glu' is an MLP of bitnet; a 'llama' model has none"),
])
def test_bitnet_switches_on_other_families_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)
