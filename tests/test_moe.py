"""Mixture of experts in the one Transformer (model.MoE) against transformers: Mixtral,
Qwen2-MoE (shared expert, experts every 2nd layer, weights not renormalised) and OLMoE (q/k
norms over all heads), logits within 1e-4 (fp32), greedy 64 tokens identical, checkpoints both
ways; presets with the published total and active counts; the grouped dispatch against a loop
over tokens, in the forward and the backward; Switch-style capacity; the auxiliary losses
against transformers' and the Switch Transformer's; bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from emergence import load
from emergence.config import Config
from emergence.errors import CheckpointError, ConfigError
from emergence.model import MoE, Transformer
from emergence.weights.hf import load_hf, save_hf
from emergence.weights.hf_config import config_from_hf

from conftest import VOCAB, save_random_hf  # noqa: E402
from test_families import assert_native_runs_as_eager, hf_greedy  # noqa: E402

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def tiny_configs() -> dict:
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
        "qwen2_moe": tf.Qwen2MoeConfig(**dict(COMMON, num_hidden_layers=4), num_experts=6, num_experts_per_tok=3,
                                       moe_intermediate_size=40, shared_expert_intermediate_size=72,
                                       decoder_sparse_step=2, norm_topk_prob=False),
        "olmoe": tf.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    }


CASES = list(tiny_configs())
_CACHE: dict[str, tuple] = {}


@pytest.fixture(scope="module", params=CASES)
def moe_model(request, tmp_path_factory):
    """(case, transformers model, folder with its checkpoint and a tokenizer)."""
    case = request.param
    if case not in _CACHE:
        folder = tmp_path_factory.mktemp(case)
        _CACHE[case] = (case, save_random_hf(tiny_configs()[case], 40 + CASES.index(case), folder), folder)
    return _CACHE[case]


def test_logits_match_transformers(moe_model):
    case, hf, folder = moe_model
    model, config = load_hf(folder)
    assert config.family == case and config.n_experts == {"mixtral": 4, "qwen2_moe": 6, "olmoe": 8}[case]
    assert sum(isinstance(b.mlp, MoE) for b in model.layers) == (2 if case != "qwen2_moe" else 2)
    torch.manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 40))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_64_tokens_identical_to_transformers(moe_model):
    _, hf, folder = moe_model
    lm = load(folder, device="cpu")
    prompt = [1, 17, 42, 5, 88, 23, 9, 61]
    with torch.no_grad():
        expected = hf_greedy(hf, prompt, 64)
    assert lm.complete(prompt, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids == expected


def test_save_hf_loads_in_transformers_with_equal_weights(moe_model, tmp_path):
    import transformers as tf

    _, hf, folder = moe_model
    model, config = load_hf(folder)
    save_hf(model, tmp_path)
    theirs = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), theirs.state_dict().values()))
    assert load_hf(tmp_path)[1].to_dict() | {"name": None} == config.to_dict() | {"name": None}


# published totals and active parameters, in billions, to the digits published
PUBLISHED = {"mixtral-8x7b": ("46.7", "12.9"), "qwen1.5-moe-a2.7b": ("14.3", "2.7"), "olmoe-1b-7b": ("6.9", "1.3")}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_total_and_active_counts(name):
    import transformers as tf

    config = Config.from_name(name)
    with torch.device("meta"):
        hf = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**config.to_hf()))
    assert config.num_parameters() == sum(p.numel() for p in hf.parameters())
    total, active = PUBLISHED[name]
    assert f"{config.num_parameters() / 1e9:.{len(total.split('.')[1])}f}" == total
    assert f"{config.num_parameters(active=True) / 1e9:.{len(active.split('.')[1])}f}" == active
    assert config_from_hf(json.loads(json.dumps(config.to_hf()))).to_dict() | {"name": None} == \
        config.to_dict() | {"name": None}


# ------------------------------------------------------------------------------ dispatch
def tiny_moe(**changes) -> MoE:
    config = Config(**{**dict(family="mixtral", vocab_size=32, n_layer=1, n_head=2, n_embd=16, intermediate_size=24,
                              n_experts=5, experts_per_token=2), **changes})
    torch.manual_seed(3)
    return MoE(config)


def per_token(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, token by token: sum over its chosen experts of weight * expert(x)."""
    h = x.reshape(-1, x.shape[-1])
    probs = moe.router(h).softmax(-1, dtype=torch.float32)
    weights, choices = probs.topk(moe.k)
    if moe.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    rows = []
    for n in range(h.shape[0]):
        y = 0
        for w, e in zip(weights[n], choices[n]):
            gate, up = (moe.gate_up_proj[e] @ h[n]).chunk(2)
            y = y + w * (moe.down_proj[e] @ (moe.act(gate) * up))
        rows.append(y)
    return torch.stack(rows).view(x.shape)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_grouped_dispatch_equals_the_loop_over_tokens_forward_and_backward(norm_topk):
    moe = tiny_moe(norm_topk_prob=norm_topk)
    x = torch.randn(3, 7, 16, requires_grad=True)
    grouped = moe(x)
    looped = per_token(moe, x)
    assert (grouped - looped).abs().max().item() <= 1e-6
    g = torch.randn_like(grouped)
    grads = torch.autograd.grad(grouped, [x, moe.gate_up_proj, moe.down_proj, moe.router.weight], g)
    refs = torch.autograd.grad(looped, [x, moe.gate_up_proj, moe.down_proj, moe.router.weight], g)
    for a, b in zip(grads, refs):
        assert (a - b).abs().max().item() <= 1e-5


def test_capacity_drops_the_choices_beyond_each_experts_share_in_training_only():
    moe = tiny_moe(capacity_factor=0.5, experts_per_token=1)
    x = torch.randn(1, 40, 16)
    moe.eval()
    full = moe(x)
    assert moe.dropped == 0.0
    moe.train()
    capped = moe(x)
    capacity = math.ceil(0.5 * 40 / 5)  # 4 tokens per expert
    counts = torch.bincount(moe.choices.flatten(), minlength=5)
    kept = counts.clamp(max=capacity).sum().item()
    assert moe.dropped == pytest.approx(1 - kept / 40)
    # the kept tokens are each expert's first ones; the others get nothing from the experts
    choice = moe.choices[:, 0]
    for e in range(5):
        tokens = (choice == e).nonzero().flatten()
        for rank, t in enumerate(tokens):
            if rank < capacity:
                assert torch.allclose(capped[0, t], full[0, t], atol=1e-6)
            else:
                assert capped[0, t].abs().max() == 0


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(family="mixtral", n_experts=4, experts_per_token=5), "experts_per_token=5 exceeds n_experts=4"),
    (dict(family="llama", n_experts=4), r"n_experts=4 is a switch of mixtral, qwen2_moe, olmoe"),
    (dict(family="mixtral", n_experts=4, mlp="gelu"), "experts are gated MLPs"),
    (dict(family="mixtral", n_experts=4, capacity_factor=0.0), "capacity_factor must be positive"),
])
def test_bad_expert_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Config(**kwargs)


def test_a_checkpoint_missing_or_misshaping_an_expert_is_refused(moe_model, tmp_path):
    from safetensors.torch import load_file, save_file

    case, _, folder = moe_model
    tensors = load_file(folder / "model.safetensors")
    expert = next(k for k in tensors if ".experts.1." in k)
    for change, match in ((lambda t: t.pop(expert), f"lacks tensor '{expert}'"),
                          (lambda t: t.__setitem__(expert, t[expert][:-1]), "do not match config.json|shape")):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        bad.mkdir()
        for f in folder.iterdir():
            if f.name != "model.safetensors":
                (bad / f.name).write_bytes(f.read_bytes())
        broken = dict(tensors)
        change(broken)
        save_file(broken, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(CheckpointError, match=match):
            load_hf(bad)


# --------------------------------------------------------------------------------- training
def test_auxiliary_losses_equal_transformers_and_the_switch_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    from emergence.train.moe import load_balancing_loss, moe_layers, router_z_loss

    config = Config(family="mixtral", vocab_size=64, n_layer=3, n_head=2, n_embd=16, intermediate_size=24,
                    n_experts=6, experts_per_token=2)
    torch.manual_seed(5)
    model = Transformer(config)
    model(torch.randint(0, 64, (2, 11)))
    layers = moe_layers(model)
    logits = tuple(m.router_logits for m in layers)  # 3 x (22, 6)
    theirs = load_balancing_loss_func(logits, 6, 2)
    assert load_balancing_loss(layers).item() == pytest.approx(theirs.item(), rel=1e-6)
    assert router_z_loss(layers).item() == pytest.approx(router_z_loss_func(torch.cat(logits)[None]).item(), rel=1e-6)
    # the bounds: k when balanced, E k when one expert takes everything
    for m in layers:
        m.router_logits = torch.zeros_like(m.router_logits)
    assert load_balancing_loss(layers).item() == pytest.approx(2.0)
    for m in layers:
        m.router_logits = torch.full_like(m.router_logits, -30.0)
        m.router_logits[:, :2] = 30.0
    assert load_balancing_loss(layers).item() == pytest.approx(6.0, rel=1e-4)


def test_pretraining_a_switch_moe_logs_the_routing_and_balances_it(tmp_path):
    """emergence pretrain on a Switch-style config (top-1, capacity 1.25): the metrics carry the
    auxiliary losses, each layer's expert shares and the dropped fraction; with the balancing
    loss the experts' shares stay near even."""
    from emergence.train import TrainConfig, train

    from test_pretrain import _make_shards

    data = _make_shards(tmp_path / "stories", 150_000, 512)
    config = Config(family="mixtral", vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64,
                    intermediate_size=128, n_experts=4, experts_per_token=1, capacity_factor=1.25, router_jitter=0.01)
    tc = TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=30, batch_size=8, context=64,
                     lr=3e-3, warmup_steps=5, eval_every=15, log_every=5, checkpoint_every=0, progress=False)
    result = train(config, tc)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "expert_share" in r]
    assert logged and all(len(r["expert_share"]) == 2 and len(r["expert_share"][0]) == 4 for r in logged)
    last = logged[-1]
    assert all(abs(sum(layer) - 1) < 1e-3 for layer in last["expert_share"])
    assert all(max(layer) < 0.6 for layer in last["expert_share"])  # no expert took most tokens
    assert 0.9 < last["moe_balance_loss"] < 1.5  # about k = 1 when balanced (E k when one expert takes all)
    assert 0 <= last["moe_dropped"] < 0.5 and last["moe_z_loss"] > 0
    assert result.val_loss < rows[0]["train_loss"] - 0.5  # it learned


# --------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_step_runs_the_experts_as_the_eager_forward(moe_model, dtype):
    """decode.cpp routes each row to its experts and reads only theirs: the native step against
    the eager forward, one row and five (test_families.assert_native_runs_as_eager)."""
    assert_native_runs_as_eager(moe_model[2], dtype)


def test_ddp_trains_a_mixture_of_experts_as_one_process(tmp_path):
    """2 gloo ranks x batch 2 against one process x batch 2 with 2 accumulation steps (as
    test_pretrain's DDP test argues: bit-identical weights), with the routers' auxiliary losses
    in the gradient and experts that get no token on a rank (their gradient is zero, not absent)."""
    import numpy as np

    from emergence.train.checkpoint import load_checkpoint

    from test_pretrain import _make_shards, metrics, pretrain_cmd, run, torchrun_cmd

    data = _make_shards(tmp_path / "stories", 150_000, 512)
    config = tmp_path / "moe.json"
    config.write_text(json.dumps(dict(family="mixtral", vocab_size=512, block_size=128, n_layer=2, n_head=2,
                                      n_embd=64, intermediate_size=96, n_experts=4, experts_per_token=2,
                                      tie_embeddings=True, bos_token_id=None, eos_token_id=0)))
    args = ("--config", str(config), "--max-steps", "6", "--context", "64", "--eval-every", "3", "--checkpoint-every",
            "6", "--warmup-steps", "2", "--lr", "3e-3", "--no-progress", "--batch-size", "2")
    single = tmp_path / "single"
    proc = run(pretrain_cmd(data, single, *args, "--grad-accum", "2", "--eval-batches", "20"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = tmp_path / "ddp"
    proc = run(torchrun_cmd(data, ddp, *args, "--eval-batches", "10"), timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reference, rows = metrics(single), metrics(ddp)
    assert [r["step"] for r in rows] == list(range(1, 7)) and "expert_share" in rows[-1]
    for ref, row in zip(reference, rows):
        assert abs(ref["train_loss"] - row["train_loss"]) <= np.spacing(np.float32(ref["train_loss"]))
    a, b = load_checkpoint(single)["model"], load_checkpoint(ddp)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
