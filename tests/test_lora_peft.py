"""LoRA, rsLoRA and DoRA against the real `peft` package on tiny random models of each family:
adapters made by peft load here with peft's logits, ours load in peft with ours; merging."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_as_exact_as_peft
from emergence.adapters import (LoraSpec, add_adapter, load_adapter, merge, merge_and_unload, per_row, save_adapter,
                                set_active, unmerge)
from emergence.errors import InvalidArgument
from emergence.weights.hf import load_hf

peft = pytest.importorskip("peft", reason="peft is a test extra: pip install -e .[test]")  # noqa: F841

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _fresh_hf(folder):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


def _ids():
    return torch.randint(3, 96, (2, 24), generator=torch.Generator().manual_seed(5))


def _peft_model(family, folder, variant, targets=None, seed=11):
    """A peft model with random A and B (init_lora_weights=False), so the adapter changes the logits."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=targets or TARGETS.get(family, TARGETS["llama"]),
                             fan_in_fan_out=family == "gpt2", **VARIANTS[variant])
    return peft.get_peft_model(_fresh_hf(folder), config).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_adapter_saved_by_peft_loads_with_peft_logits(hf_model, variant, tmp_path):
    family, _, folder = hf_model
    pm = _peft_model(family, folder, variant)
    pm.save_pretrained(tmp_path / "adapter")
    model, _ = load_hf(folder)
    load_adapter(model, tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        theirs, ours = pm(ids).logits, model(ids)
        base = pm.get_base_model()
        with pm.disable_adapter():
            plain = base(ids).logits
    assert (theirs - plain).abs().max() > 1e-2  # the adapter matters
    assert_as_exact_as_peft(ours, theirs, pm, ids)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_adapter_saved_here_loads_in_peft_with_equal_logits(hf_model, variant, tmp_path):
    import peft

    family, _, folder = hf_model
    model, config = load_hf(folder)
    spec = LoraSpec(r=4, alpha=8, targets=["q", "v", "up", "down"] if family != "gpt2" else ["c_attn", "c_fc"],
                    rslora=variant == "rslora", dora=variant == "dora")
    add_adapter(model, spec, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # B starts at zero, as in peft: give it values so the adapter does something
        for name, p in model.named_parameters():
            if ".lora_B." in name or ".magnitude." in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    save_adapter(model, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["use_dora"] == (variant == "dora") and saved["use_rslora"] == (variant == "rslora")
    pm = peft.PeftModel.from_pretrained(_fresh_hf(folder), tmp_path / "ours").eval()
    ids = _ids()
    with torch.no_grad():
        theirs, ours = pm(ids).logits, model(ids)
    assert_as_exact_as_peft(ours, theirs, pm, ids)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_then_unmerge_restores_the_base_bit_for_bit(hf_model, variant, tmp_path):
    family, _, folder = hf_model
    _peft_model(family, folder, variant).save_pretrained(tmp_path / "a")
    model, _ = load_hf(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_adapter(model, tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids)
        merge(model, "default")
        merged = model(ids)
        unmerge(model)
        set_active(model, None)
        plain = model(ids)
    assert (merged - adapted).abs().max().item() <= 5e-5  # a merged weight sums in another order
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    reference, _ = load_hf(folder)
    with torch.no_grad():
        assert torch.equal(plain, reference(ids))
    unloaded = merge_and_unload(model, "default")
    with torch.no_grad():
        assert (unloaded(ids) - adapted).abs().max().item() <= 5e-5
    assert not any(".adapters." in k for k in unloaded.state_dict())


def test_rows_of_one_batch_use_different_adapters(hf_model, tmp_path):
    family, _, folder = hf_model
    _peft_model(family, folder, "lora").save_pretrained(tmp_path / "a")
    _peft_model(family, folder, "dora", seed=12).save_pretrained(tmp_path / "b")
    model, _ = load_hf(folder)
    load_adapter(model, tmp_path / "a", "a")
    load_adapter(model, tmp_path / "b", "b")
    ids = _ids()[:1].repeat(3, 1)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b", None):
            set_active(model, name)
            alone[name] = model(ids[:1])[0]
        with per_row(model, ["b", None, "a"]):
            mixed = model(ids)
    assert (mixed[0] - alone["b"]).abs().max() <= 1e-5
    assert (mixed[1] - alone[None]).abs().max() <= 1e-5
    assert (mixed[2] - alone["a"]).abs().max() <= 1e-5
    assert (alone["a"] - alone["b"]).abs().max() > 1e-2


def test_peft_initialisation_leaves_the_model_unchanged_and_trains_only_the_adapter(hf_model):
    from emergence.adapters import mark_only_adapters_trainable

    family, _, folder = hf_model
    model, config = load_hf(folder)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids)
    add_adapter(model, LoraSpec(r=8, alpha=16, targets="all-linear", dora=True))
    trainable, total = mark_only_adapters_trainable(model)
    with torch.no_grad():
        assert (model(ids) - plain).abs().max().item() <= 1e-5
    expected = 0
    for name, p in model.named_parameters():
        if ".adapters." in name:
            expected += p.numel()
    assert trainable == expected and total == config.num_parameters() + trainable
    model(ids).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".adapters." in n for n in grads)
    assert any(".lora_B." in n for n in grads)


def test_bad_adapters_and_targets_are_refused_clearly(hf_model, tmp_path):
    family, _, folder = hf_model
    model, _ = load_hf(folder)
    with pytest.raises(InvalidArgument, match="match nothing .* available: "):
        add_adapter(model, LoraSpec(targets=["attention_dense"]))
    with pytest.raises(InvalidArgument, match="rank r must be a positive integer"):
        add_adapter(model, LoraSpec(r=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="has no adapter_config.json"):
        load_adapter(model, tmp_path / "empty")
    _peft_model(family, folder, "lora").save_pretrained(tmp_path / "a")
    other = {"gpt2": "llama", "llama": "qwen2", "mistral": "qwen2", "qwen2": "llama"}[family]  # other shapes
    from tests.conftest import make_hf_model  # noqa: PLC0415

    other_folder = tmp_path / other
    make_hf_model(other, other_folder)
    other_model, _ = load_hf(other_folder)
    with pytest.raises(InvalidArgument, match="another base"):
        load_adapter(other_model, tmp_path / "a")


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8", "q4_0"])
def test_qlora_backward_keeps_no_float_weight_and_gives_the_float_gradients(fmt):
    """A frozen quantized base: autograd saves no dequantized (out, in) weight between forward
    and backward (each layer is dequantized again in the backward), and the adapter's gradients
    equal those of LoRA on a float base holding the same dequantized weights."""
    from emergence.adapters import mark_only_adapters_trainable
    from emergence.config import Config
    from emergence.model import Transformer
    from emergence.quant.linear import quantize_model, quantized_modules

    config = Config(vocab_size=200, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128)
    torch.manual_seed(0)
    quantized = Transformer(config)
    quantize_model(quantized, fmt)
    shapes = {(m.out_features, m.in_features) for m in quantized_modules(quantized).values()}
    reference = Transformer(config)  # the same weights, dequantized, in float layers
    reference.load_state_dict(quantized.state_dict(), strict=False)
    for name, layer in quantized_modules(quantized).items():
        reference.get_submodule(name).weight.data = layer.dequantize().float()
    models = {}
    for key, model in (("quantized", quantized), ("float", reference)):
        add_adapter(model, LoraSpec(r=4, alpha=8, targets="all-linear", dora=True),
                    generator=torch.Generator().manual_seed(1))
        mark_only_adapters_trainable(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        models[key] = model
    ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(2))
    saved: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = models["quantized"](ids).logsumexp(-1).mean()
    assert saved and not any(s in shapes or s[::-1] in shapes for s in saved)
    loss.backward()
    models["float"](ids).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in models["float"].named_parameters() if p.grad is not None}
    for name, p in models["quantized"].named_parameters():
        if p.requires_grad:
            assert (p.grad - grads[name]).abs().max() <= 1e-5 * max(1.0, grads[name].abs().max()), name


def test_loras_stacked_tensors_kept_between_decode_steps_follow_every_change(hf_model, tmp_path):
    """Without gradients an adapter's stacked A and block-diagonal B are built once and kept; an
    in-place change of A or B, or a replaced tensor, is seen at the next forward (equal to the
    freshly built ones', gradients on)."""
    family, _, folder = hf_model
    _peft_model(family, folder, "lora").save_pretrained(tmp_path / "a")
    model, _ = load_hf(folder)
    load_adapter(model, tmp_path / "a")
    ids = _ids()
    update = next(m for m in model.modules() if hasattr(m, "adapters")).adapters["default"]
    first = next(iter(update.lora_B))
    with torch.no_grad():
        before = model(ids)  # fills the kept tensors
        update.lora_B[first].mul_(3.0)
        after_b = model(ids)
    assert (after_b - before).abs().max() > 1e-4  # the change reached the output
    assert (after_b - model(ids).detach()).abs().max().item() <= 1e-6  # gradients on: nothing kept
    with torch.no_grad():
        update.lora_A[first].mul_(0.5)
        after_a = model(ids)
    assert (after_a - model(ids).detach()).abs().max().item() <= 1e-6 and (after_a - after_b).abs().max() > 1e-4
    with torch.no_grad():
        update.lora_A[first] = torch.nn.Parameter(update.lora_A[first].detach() * 2)  # replaced, not changed
        replaced = model(ids)
    assert (replaced - after_b).abs().max().item() <= 1e-6  # halved, then doubled into a new tensor


def test_doras_row_norms_kept_between_decode_steps_follow_every_weight_change(hf_model, tmp_path):
    """Without gradients DoRA's ||W + s B A|| is computed once and kept; an in-place change of B or
    of the base weight is seen at the next forward (equal to the freshly computed logits)."""
    family, _, folder = hf_model
    _peft_model(family, folder, "dora").save_pretrained(tmp_path / "a")
    model, _ = load_hf(folder)
    load_adapter(model, tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        model(ids)  # fills the kept norms
        layer = next(m for m in model.modules() if hasattr(m, "adapters"))
        next(iter(layer.adapters["default"].lora_B.values())).mul_(3.0)
        after_b = model(ids)
    assert (after_b - model(ids).detach()).abs().max() == 0
    fresh = model(ids).detach()  # gradients on: nothing kept
    assert (after_b - fresh).abs().max().item() <= 1e-6
    with torch.no_grad():
        layer.base.weight.mul_(0.5)
        after_w = model(ids)
    assert (after_w - model(ids).detach()).abs().max().item() <= 1e-6
    assert (after_w - after_b).abs().max() > 1e-3
