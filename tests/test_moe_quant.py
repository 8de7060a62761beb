"""Quantized mixtures of experts: quantize_model takes the stacked experts expert by expert
(q8_0, q4_0, int8, int4 ...), the router and the shared expert's gate stay in full precision
as llama.cpp's quantizer keeps them; each expert's ggml blocks are llama.cpp's bytes
(gguf.quants); the native step decodes the packed experts as the eager forward does; a
quantized checkpoint saves and loads back bit for bit; bad shapes are refused in one line."""

from __future__ import annotations

import gguf.quants as ref
import numpy as np
import pytest
import torch
from torch import nn

from emergence import load
from emergence.config import Config
from emergence.errors import InvalidArgument
from emergence.model import MoE, Transformer
from emergence.quant.linear import GGML_FORMATS, QuantizedLinear, quantize_model
from emergence.weights.hf import save_hf

from conftest import VOCAB, cli_main, word_level_tokenizer  # noqa: E402
from test_kernels import NATIVE, _assert_quantized_close, _batched, _steps  # noqa: E402

SHAPES = dict(vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
              n_experts=4, experts_per_token=2)
FAMILIES = {"mixtral": {},  # experts (96 wide) on every layer
            # a shared expert with its gate, experts every 2nd layer, weights not renormalised
            "qwen2_moe": dict(n_layer=4, qkv_bias=True, moe_intermediate_size=64, shared_expert_size=96, norm_topk_prob=False,
                              moe_every=2)}
FORMATS = [("q8_0", {}), ("q4_0", {}), ("int8", {}), ("int4", {"group_size": 32})]


def random_moe(family: str, seed: int = 3) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(Config(family=family, **{**SHAPES, **FAMILIES[family]}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt, options", FORMATS)
def test_the_native_step_decodes_quantized_experts_as_the_eager_forward(family, fmt, options, fp32_products):
    model = random_moe(family)
    stacked = {i: b.mlp.gate_up_proj.detach().clone() for i, b in enumerate(model.layers) if isinstance(b.mlp, MoE)}
    quantize_model(model, fmt, skip=(), **options)
    for i, block in enumerate(model.layers):
        if not isinstance(block.mlp, MoE):
            continue
        moe = block.mlp
        assert isinstance(moe.gate_up_proj, nn.ModuleList) and len(moe.gate_up_proj) == 4
        assert all(isinstance(m, QuantizedLinear) and m.format == fmt for m in [*moe.gate_up_proj, *moe.down_proj])
        assert type(moe.router) is nn.Linear  # full precision, as llama.cpp keeps ffn_gate_inp
        if moe.shared is not None:
            assert type(moe.shared_gate) is nn.Linear and isinstance(moe.shared.gate_up_proj, QuantizedLinear)
        # each expert's dequantized matrix is its own stacked slice, to the format's precision
        err = (moe.gate_up_proj[1].dequantize() - stacked[i][1]).abs().max().item()
        assert 0 < err <= {"q8_0": 0.01, "int8": 0.01, "q4_0": 0.12, "int4": 0.12}[fmt]
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (24,)).tolist()
    native, _ = _steps(model, NATIVE, ids, 4)
    eager, _ = _steps(model, "eager", ids, 4)
    _assert_quantized_close(fmt, native, eager)
    prompts = [torch.randint(3, VOCAB, (n,)).tolist() for n in (9, 2, 6)]  # rows grouped by expert
    steps = torch.randint(3, VOCAB, (3, 8))
    native, _ = _batched(model, NATIVE, prompts, steps, 16)
    eager, _ = _batched(model, "eager", prompts, steps, 16)
    _assert_quantized_close(fmt, native, eager)
    assert (native.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_each_experts_blocks_are_llama_cpps_bytes(fmt):
    model = random_moe("mixtral")
    gate_up, down = model.layers[1].mlp.gate_up_proj.detach().clone(), model.layers[1].mlp.down_proj.detach().clone()
    quantize_model(model, fmt)
    qtype = ref.GGMLQuantizationType[fmt.upper()]
    assert GGML_FORMATS[fmt].name == fmt.upper()
    for stack, layers in ((gate_up, model.layers[1].mlp.gate_up_proj), (down, model.layers[1].mlp.down_proj)):
        for e in range(4):
            expected = ref.quantize(stack[e].numpy(), qtype)
            assert np.array_equal(layers[e].blocks.numpy(), expected)


def test_a_quantized_mixture_of_experts_saves_and_loads_bit_for_bit(tmp_path, capsys):
    model = random_moe("qwen2_moe")
    save_hf(model, tmp_path / "base")
    word_level_tokenizer().save(tmp_path / "base")
    code, out, err = cli_main(capsys, "quantize", tmp_path / "base", "--to", "q8_0", "--out", tmp_path / "q8")
    assert code == 0, err
    quantize_model(model, "q8_0")
    lm = load(tmp_path / "q8", device="cpu")
    theirs = dict(lm.model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs.pop(name), tensor), name
    assert not theirs and "layers.1.mlp.down_proj.3.blocks" in model.state_dict()
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(lm.model(ids), model(ids))
    native = lm.complete([5, 6, 7], temperature=0, max_new_tokens=8, ignore_eos=True).token_ids
    lm.backend = "eager"
    assert lm.complete([5, 6, 7], temperature=0, max_new_tokens=8, ignore_eos=True).token_ids == native


def test_experts_the_format_cannot_take_are_refused_naming_the_stack():
    model = random_moe("qwen2_moe")
    model.layers[1].mlp.down_proj.data = torch.randn(4, 64, 40)  # 40 inputs: not blocks of 32
    with pytest.raises(InvalidArgument, match=r"layers\.1\.mlp\.down_proj\.0 has 40 input features.*skip 'down_proj'"):
        quantize_model(model, "q8_0")
    assert isinstance(model.layers[1].mlp.down_proj, torch.Tensor)  # nothing was replaced
    quantize_model(model, "q8_0", skip=("down_proj",))  # the stack kept in full precision
    assert isinstance(model.layers[1].mlp.down_proj, nn.Parameter)
    assert isinstance(model.layers[1].mlp.gate_up_proj[0], QuantizedLinear)
