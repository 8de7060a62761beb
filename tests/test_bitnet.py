"""BitNet b1.58 training (Config.ternary, model.BitLinear): the forward pass against the paper's
formulas as quant/methods.py writes them, the straight-through gradient, a short pretraining
run whose saved model is the ternary checkpoint computing what the trained model computed (and
decodes natively), and the configs refused."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from emergence import load
from emergence.config import Config
from emergence.errors import ConfigError
from emergence import products
from emergence.model import BitLinear, Transformer
from emergence.quant.linear import TernaryLinear
from emergence.quant.methods import quantize_activations_int8, quantize_ternary


def test_the_forward_pass_multiplies_ternary_weights_by_8_bit_activations():
    torch.manual_seed(0)
    layer = BitLinear(96, 40, bias=True)
    x = torch.randn(3, 7, 96) * 2
    values, scale = quantize_ternary(layer.weight)  # (40, 96) in {-1, 0, 1}, (1,)
    xq, s = quantize_activations_int8(x)  # integers, (3, 7, 1)
    expected = F.linear(xq / s, values.float() * scale, layer.bias)
    assert (layer(x) - expected).abs().max().item() <= 1e-5
    assert set(values.unique().tolist()) == {-1, 0, 1}
    assert 0.2 < (values == 0).float().mean().item() < 0.5  # about a third of a Gaussian rounds to 0


def test_the_straight_through_estimator_passes_the_gradient_to_the_latent_weights():
    torch.manual_seed(1)
    layer = BitLinear(64, 16, bias=False)
    x = torch.randn(5, 64, requires_grad=True)
    grad_out = torch.randn(5, 16)
    layer(x).backward(grad_out)
    values, scale = quantize_ternary(layer.weight)
    xq, s = quantize_activations_int8(x.detach())
    # RoundClip as the identity: dL/dW = g^T x_q, dL/dx = g W_q
    assert torch.allclose(layer.weight.grad, grad_out.T @ (xq / s), atol=1e-5)
    assert torch.allclose(x.grad, grad_out @ (values.float() * scale), atol=1e-5)


def test_a_ternary_pretraining_run_saves_the_ternary_model_it_trained(tmp_path):
    from emergence.kernels.fused_decode import unsupported
    from emergence.train import TrainConfig, train
    from emergence.train.checkpoint import load_checkpoint

    from test_pretrain import _make_shards

    data = _make_shards(tmp_path / "stories", 150_000, 512)
    config = Config(name="bitnet", vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64,
                    intermediate_size=128, ternary=True, tie_embeddings=True, bos_token_id=None, eos_token_id=0)
    tc = TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=40, batch_size=8, context=64, lr=4e-3,
                     warmup_steps=5, eval_every=20, log_every=10, checkpoint_every=40, progress=False)
    result = train(config, tc)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.val_loss < rows[0]["train_loss"] - 0.7  # it learned with ternary weights (6.25 -> 5.26 once)
    trained = Transformer(config).eval()
    trained.load_state_dict(load_checkpoint(tmp_path / "run")["model"])
    assert isinstance(trained.layers[0].attn.qkv_proj, BitLinear)

    lm = load(result.model_dir, device="cpu")
    layers = [m for m in lm.model.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == 2 * 4 and all(m.act_bits == 8 for m in layers)  # qkv, o, gate_up, down per block
    assert not lm.config.ternary and type(lm.model.lm_head) is products.Linear  # the plain head
    assert unsupported(lm.model) is None  # the native step decodes it (2-bit packed kernel)
    ids = torch.randint(3, 512, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = lm.model(ids), trained(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4 * theirs.abs().max().item()
    greedy = lm.complete([5, 6, 7], temperature=0, max_new_tokens=16, ignore_eos=True).token_ids
    with torch.no_grad():
        seq = [5, 6, 7]
        for _ in range(16):
            seq.append(int(trained(torch.tensor([seq]))[0, -1].argmax()))
    assert greedy == seq[3:]


def test_ternary_configs_that_cannot_be_are_refused():
    with pytest.raises(ConfigError, match="experts stay full precision"):
        Config(family="mixtral", vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, n_experts=4,
               ternary=True)
    with pytest.raises(ConfigError, match="ternary must be true or false"):
        Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, ternary="yes")
    with pytest.raises(ConfigError, match="ternary=True"):
        Config(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, ternary=True).to_hf()
