"""The native batch-1 GEMV kernels against torch.nn.functional.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import emergence
from emergence.kernels import DecodeLinear, gemv_extension

ext = gemv_extension()


def test_kernels_build_on_this_machine():
    # This machine kind has gcc and an AVX-512 CPU: the kernels must be available, or the
    # speed figures in the README do not describe what users get.
    assert ext is not None


@pytest.mark.parametrize("shape", [(1, 1), (7, 16), (173, 77), (960, 576), (576, 1536), (4099, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_gemv_matches_linear(shape, with_bias):
    torch.manual_seed(sum(shape))
    n, k = shape
    w, x = torch.randn(n, k), torch.randn(1, k)
    b = torch.randn(n) if with_bias else None
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())[0]
    got = ext.gemv(x, w, b)
    assert got.dtype == torch.float32
    # fp32 accumulation in a different order than MKL: error bounded by k * eps * sum|w x|.
    bound = k * 2**-23 * (w.double().abs() @ x[0].double().abs() + (0 if b is None else b.double().abs()))
    assert ((got.double() - expected).abs() <= bound + 1e-12).all()


@pytest.mark.parametrize("shape", [(5, 3), (173, 77), (3072, 576), (49152, 64)])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])  # dot-product path, widening path
def test_bf16_gemv_is_the_fp32_product_rounded_once(shape, x_dtype):
    torch.manual_seed(shape[0])
    n, k = shape
    w, x = torch.randn(n, k).bfloat16(), torch.randn(1, k).bfloat16()
    exact = (w.double() @ x[0].double())
    got = ext.gemv(x.to(x_dtype), w, None)
    assert got.dtype == torch.bfloat16
    # One rounding to bf16 (relative 2^-8) plus fp32 accumulation error.
    bound = exact.abs() * 2**-8 + k * 2**-23 * (w.double().abs() @ x[0].double().abs())
    assert ((got.double() - exact).abs() <= bound + 1e-12).all()
    # and it is at least as close to the exact product as torch's own bf16 linear
    torch_err = (F.linear(x, w)[0].double() - exact).abs().max()
    assert (got.double() - exact).abs().max() <= torch_err * 1.01 + 1e-12


@pytest.mark.parametrize("rows", [2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("shape", [(1, 1), (7, 16), (173, 77), (768, 256), (4099, 64)])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_batched_gemm_matches_the_exact_product(rows, shape, w_dtype):
    # The batched step's product: tiles of 4 weight rows x 4 rows of x, with every remainder
    # (N not a multiple of 4, rows not a multiple of 4, K not a multiple of 16) exercised.
    torch.manual_seed(rows * 1000 + shape[0])
    n, k = shape
    w, x = torch.randn(n, k).to(w_dtype), torch.randn(rows, k)
    exact = x.double() @ w.double().T
    got = ext.gemm(x, w)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    bound = k * 2**-23 * (x.double().abs() @ w.double().abs().T)  # fp32 accumulation, any order
    assert ((got.double() - exact).abs() <= bound + 1e-12).all()


def test_default_model_is_unchanged_by_the_kernels():
    fast = emergence.load(device="cpu")
    plain = emergence.load(device="cpu", fast_kernels=False)
    assert any(isinstance(m, DecodeLinear) for m in fast.model.modules())
    assert not any(isinstance(m, DecodeLinear) for m in plain.model.modules())
    a = fast.complete("", temperature=0, max_new_tokens=120, logprobs=0)
    b = plain.complete("", temperature=0, max_new_tokens=120, logprobs=0)
    assert a.token_ids == b.token_ids
    diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)]
    assert max(diffs) < 1e-4


def test_training_mode_bypasses_the_kernel():
    layer = torch.nn.Linear(16, 8)
    layer.__class__ = DecodeLinear
    x = torch.randn(1, 16, requires_grad=True)
    layer(x).sum().backward()  # the kernel has no backward; with grad enabled torch's linear is used
    assert torch.allclose(x.grad, layer.weight.sum(0, keepdim=True))


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    # A build killed midway leaves torch's lock file; torch would wait on it forever.
    import os
    import time

    from emergence.kernels import STALE_LOCK_SECONDS, _build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = _build_directory("emergence_kernels_test")
    lock = folder / "lock"
    lock.write_text("")
    assert _build_directory("emergence_kernels_test") == folder and lock.exists()  # a build may be running: wait for it
    old = time.time() - STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    _build_directory("emergence_kernels_test")
    assert not lock.exists()


# ------------------------------------------------------------------- the fused decode step
def _decode_logits(model, ids: torch.Tensor, prefill: int, fused: bool):
    """Prefill ids[:, :prefill], then feed the rest one token at a time; returns the per-step
    logits (float32) and the KV cache."""
    from emergence.kv_cache import KVCache

    saved = model.fused_decoder
    if not fused:
        model.fused_decoder = None
    try:
        cache = KVCache(model.config, 1, ids.shape[1], dtype=model.tok_embeddings.weight.dtype)
        with torch.inference_mode():
            model(ids[:, :prefill], cache)
            steps = [model(ids[:, t:t + 1], cache)[0, -1].float() for t in range(prefill, ids.shape[1])]
    finally:
        model.fused_decoder = saved
    return torch.stack(steps), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_equals_the_eager_forward(hf_model, dtype):
    # Every family's layout: GPT-2 (LayerNorm, biases, learned positions, GELU), LLaMA (GQA,
    # Llama-3 rope scaling), Mistral (a sliding window of 8, shorter than the 40 tokens), Qwen2
    # (q/k/v bias, tied head).
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    assert lm.model.fused_decoder is not None
    torch.manual_seed(5)
    ids = torch.randint(3, 96, (1, 40))
    fused, fused_cache = _decode_logits(lm.model, ids, 5, fused=True)
    eager, eager_cache = _decode_logits(lm.model, ids, 5, fused=False)
    scale = eager.abs().max().item()
    if dtype == torch.float32:
        assert (fused - eager).abs().max().item() <= 1e-5
        assert max((a - b).abs().max().item() for a, b in zip(fused_cache.k + fused_cache.v,
                                                               eager_cache.k + eager_cache.v)) <= 1e-5
    else:  # both round to bf16 at the same points; summation order differs, so a few ulps apart
        assert (fused - eager).abs().max().item() <= 2 ** -5 * scale
        assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9
    assert fused_cache.length == eager_cache.length == 40


def _batched_decode_logits(model, prompts: list[torch.Tensor], steps: torch.Tensor, fused: bool):
    """Left-pad `prompts` (1-D id tensors of different lengths) into one batch, prefill it, then
    feed steps[:, t] to every row at once; returns the per-step logits (B, steps, V) in
    float32 and the KV cache."""
    from emergence.kv_cache import KVCache

    B, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, longest, dtype=torch.long)
    mask = torch.zeros(B, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p):], mask[b, longest - len(p):] = p, 1
    saved = model.fused_decoder
    if not fused:
        model.fused_decoder = None
    try:
        cache = KVCache(model.config, B, longest + steps.shape[1], dtype=model.tok_embeddings.weight.dtype)
        cache.set_padding(mask)
        with torch.inference_mode():
            model(ids, cache)
            out = [model(steps[:, t:t + 1], cache)[:, -1].float() for t in range(steps.shape[1])]
    finally:
        model.fused_decoder = saved
    return torch.stack(out, dim=1), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_batched_step_equals_the_eager_forward(hf_model, dtype):
    # Five left-padded rows (pads 0..29) decoded together, every family: positions, masks and
    # the sliding window (Mistral's 8) come from each row's padding, as in the eager forward.
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    torch.manual_seed(6)
    prompts = [torch.randint(3, 96, (n,)) for n in (30, 1, 17, 4, 30)]
    steps = torch.randint(3, 96, (5, 24))
    fused, fused_cache = _batched_decode_logits(lm.model, prompts, steps, fused=True)
    eager, eager_cache = _batched_decode_logits(lm.model, prompts, steps, fused=False)
    assert fused_cache.length == eager_cache.length == 54
    scale = eager.abs().max().item()
    real = [(b, slice(int(eager_cache.pad[b]), 54)) for b in range(5)]  # padding slots are never read
    if dtype == torch.float32:  # fp32 rounding, summed in another order over 24 steps
        assert (fused - eager).abs().max().item() <= 1e-5 * max(scale, 1)
        assert max((a[b, :, s] - e[b, :, s]).abs().max().item()
                   for a, e in zip(fused_cache.k + fused_cache.v, eager_cache.k + eager_cache.v) for b, s in real) <= 2e-5
    else:  # the same GEMM calls, the same bf16 rounding points; attention sums in another order
        assert (fused - eager).abs().max().item() <= 2 ** -5 * scale
        assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9
    # and each row equals that row decoded alone (the one-row kernel, no padding)
    for b, prompt in enumerate(prompts):
        alone, _ = _decode_logits(lm.model, torch.cat([prompt, steps[b]])[None], len(prompt), fused=True)
        assert (alone - fused[b]).abs().max().item() <= (1e-4 if dtype == torch.float32 else 2 ** -5 * scale)


def _prefill(model, chunks: list[torch.Tensor], fused: bool):
    """Prefill one row chunk after chunk (last logits only, as generation and the serving
    engine ask); returns each chunk's last logits (float32) and the KV cache."""
    from emergence.kv_cache import KVCache

    saved = model.fused_decoder
    if not fused:
        model.fused_decoder = None
    try:
        cache = KVCache(model.config, 1, sum(len(c) for c in chunks), dtype=model.tok_embeddings.weight.dtype)
        with torch.inference_mode():
            out = [model(c[None], cache, last_logits_only=True)[0, -1].float() for c in chunks]
    finally:
        model.fused_decoder = saved
    return torch.stack(out), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefill_equals_the_eager_forward(hf_model, dtype, monkeypatch):
    # Prompts of 2 to 32 tokens (16 in bf16) run natively (their tokens as the GEMM's rows,
    # causal attention among them), also as a later chunk after cached tokens; Mistral's
    # window of 8 applies.
    from emergence.kernels import fused_decode

    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    calls = []
    plan_prefill = type(lm.model.fused_decoder.plan).prefill_rows
    monkeypatch.setattr(type(lm.model.fused_decoder.plan), "prefill_rows",
                        lambda plan, *a: calls.append(len(a[0])) or plan_prefill(plan, *a))
    torch.manual_seed(7)
    limit = lm.model.fused_decoder.max_prefill
    assert limit == (fused_decode.MAX_NATIVE_PREFILL if dtype == torch.float32 else fused_decode.MAX_NATIVE_PREFILL_BF16)
    chunks = [torch.randint(3, 96, (n,)) for n in (2, 7, limit, limit + 1)]
    fused, fused_cache = _prefill(lm.model, chunks, fused=True)
    eager, eager_cache = _prefill(lm.model, chunks, fused=False)
    assert calls == [2, 7, limit]  # limit + 1: the eager forward
    scale = eager.abs().max().item()
    if dtype == torch.float32:
        assert (fused - eager).abs().max().item() <= 1e-5 * max(scale, 1)
        assert max((a - b).abs().max().item() for a, b in zip(fused_cache.k + fused_cache.v,
                                                               eager_cache.k + eager_cache.v)) <= 2e-5
    else:  # a few bf16 ulps apart, which can flip a near-tie's argmax
        assert (fused - eager).abs().max().item() <= 2 ** -5 * scale
        assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.75
    assert fused_cache.length == eager_cache.length == 10 + 2 * limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefill_of_several_prompts_equals_each_alone(hf_model, dtype):
    # The serving engine prefills the prompts that join together in one call, each left-padded
    # into its own cache row: logits and keys/values equal each prompt's own native prefill.
    from emergence.kv_cache import KVCache

    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu", dtype=dtype)
    fused = lm.model.fused_decoder
    torch.manual_seed(9)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (5, 1, 12, 7)]
    together = KVCache(lm.config, 4, 12, dtype=dtype)
    with torch.inference_mode():
        logits = fused.prefill_many(lm.model, prompts, together)[:, -1].float()
        for j, p in enumerate(prompts):
            alone, alone_cache = _prefill(lm.model, [torch.tensor(p)], fused=True)
            tol = 1e-5 * max(alone.abs().max().item(), 1) if dtype == torch.float32 else 2 ** -5 * alone.abs().max().item()
            assert (logits[j] - alone[0]).abs().max().item() <= tol
            for a, b in zip(together.k + together.v, alone_cache.k + alone_cache.v):
                assert (a[j, :, 12 - len(p):].float() - b[0].float()).abs().max().item() <= tol
    with pytest.raises(emergence.errors.InvalidArgument):
        fused.prefill_many(lm.model, [list(range(3, 40))], KVCache(lm.config, 1, 37))  # over the native limit


def test_fused_plan_follows_replaced_weights(hf_model):
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    ids = torch.randint(3, 96, (1, 12))
    before, _ = _decode_logits(lm.model, ids, 3, fused=True)
    torch.manual_seed(9)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in lm.model.state_dict().items()}
    lm.model.load_state_dict(state, assign=True)  # new tensors: the plan must not use the old ones
    if lm.config.tie_embeddings:
        lm.model.lm_head.weight = lm.model.tok_embeddings.weight
    after_fused, _ = _decode_logits(lm.model, ids, 3, fused=True)
    after_eager, _ = _decode_logits(lm.model, ids, 3, fused=False)
    assert (after_fused - before).abs().max().item() > 1e-2
    assert (after_fused - after_eager).abs().max().item() <= 1e-5


def test_fused_plan_steps_aside_for_modules_it_does_not_know(hf_model):
    family, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    ids = torch.randint(3, 96, (1, 10))
    _decode_logits(lm.model, ids, 3, fused=True)  # the plan is built and checked once

    class Halved(torch.nn.Module):  # e.g. a quantized or adapter layer swapped in after loading
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) / 2

    lm.model.layers[0].mlp.down_proj = Halved(lm.model.layers[0].mlp.down_proj)
    fused, _ = _decode_logits(lm.model, ids, 3, fused=True)
    eager, _ = _decode_logits(lm.model, ids, 3, fused=False)
    assert torch.equal(fused, eager)


def test_fused_step_refuses_to_run_past_the_context_window(hf_model):
    from emergence.errors import InvalidArgument
    from emergence.kv_cache import KVCache

    _, _, folder = hf_model
    lm = emergence.load(folder, device="cpu")
    block = lm.config.block_size
    cache = KVCache(lm.config, 1, block + 4)
    cache.length = block
    with torch.inference_mode(), pytest.raises(InvalidArgument, match="context window"):
        lm.model(torch.tensor([[5]]), cache)


# ------------------------------------------------------------------ quantized weights
QUANTIZED = [("q8_0", {}), ("q4_0", {}), ("int8", {}), ("int4", {"group_size": 32}), ("int4", {"group_size": 128}),
             ("ternary", {}), ("ternary", {"act_bits": 8}), ("nf4", {})]


def _quantized_model(fmt: str, options: dict, dtype: torch.dtype):
    from emergence import Config
    from emergence.model import Transformer
    from emergence.quant.linear import quantize_model

    config = Config(name="q", vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                    intermediate_size=256)
    torch.manual_seed(3)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model = model.to(dtype).eval()
    quantize_model(model, fmt, skip=(), **options)  # every linear layer, the output head included
    return model


@pytest.mark.parametrize("fmt, options", QUANTIZED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_with_quantized_weights_equals_the_eager_forward(fmt, options, dtype):
    from emergence.kernels import use_decode_kernels

    model = _quantized_model(fmt, options, dtype)
    assert use_decode_kernels(model) and model.fused_decoder is not None
    ids = torch.randint(3, 512, (1, 24))
    fused, _ = _decode_logits(model, ids, 4, fused=True)
    eager, _ = _decode_logits(model, ids, 4, fused=False)
    scale = eager.abs().max().item()
    if fmt in ("q8_0", "q4_0"):
        # Both paths quantize the activations to 8 bits per block of 32, as llama.cpp does; a
        # last-bit difference in an activation (fp32 summation order) can move it across a
        # rounding boundary, one quantization step, so agreement is to a fraction of a percent.
        assert (fused - eager).abs().max().item() <= 2e-2 * scale
        assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9
        return
    # The eager path multiplies by the dequantized weight; the kernels widen the packed codes in
    # registers: the same products, summed in another order.
    bound = 1e-5 * max(scale, 1) if dtype == torch.float32 else 2 ** -5 * scale
    assert (fused - eager).abs().max().item() <= bound


@pytest.mark.parametrize("fmt, options", QUANTIZED)
def test_fused_batched_step_with_quantized_weights_equals_the_eager_forward(fmt, options):
    from emergence.kernels import use_decode_kernels

    model = _quantized_model(fmt, options, torch.float32)
    assert use_decode_kernels(model)
    torch.manual_seed(4)
    prompts = [torch.randint(3, 512, (n,)) for n in (9, 2, 6)]
    steps = torch.randint(3, 512, (3, 12))
    fused, _ = _batched_decode_logits(model, prompts, steps, fused=True)
    eager, _ = _batched_decode_logits(model, prompts, steps, fused=False)
    scale = eager.abs().max().item()
    bound = 2e-2 * scale if fmt in ("q8_0", "q4_0") else 1e-5 * max(scale, 1)  # as for one row, above
    assert (fused - eager).abs().max().item() <= bound
    assert (fused.argmax(-1) == eager.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("fmt, options", QUANTIZED)
def test_fused_prefill_with_quantized_weights_equals_the_eager_forward(fmt, options):
    from emergence.kernels import use_decode_kernels

    model = _quantized_model(fmt, options, torch.float32)
    assert use_decode_kernels(model)
    torch.manual_seed(8)
    chunks = [torch.randint(3, 512, (n,)) for n in (4, 3, 5)]  # 5 > MAX_NATIVE_PREFILL_PACKED: eager
    fused, _ = _prefill(model, chunks, fused=True)
    eager, _ = _prefill(model, chunks, fused=False)
    scale = eager.abs().max().item()
    bound = 2e-2 * scale if fmt in ("q8_0", "q4_0") else 1e-5 * max(scale, 1)
    assert (fused - eager).abs().max().item() <= bound
    assert (fused.argmax(-1) == eager.argmax(-1)).all()


def test_formats_without_a_kernel_decode_eagerly():
    from emergence.kernels import use_decode_kernels
    from emergence.kernels.fused_decode import FusedDecoder

    model = _quantized_model("q5_1", {}, torch.float32)
    use_decode_kernels(model)
    assert not FusedDecoder.supports(model)
    ids = torch.randint(3, 512, (1, 10))
    assert torch.equal(_decode_logits(model, ids, 3, fused=True)[0], _decode_logits(model, ids, 3, fused=False)[0])


@pytest.mark.parametrize("qtype_name, kind", [("Q8_0", 2), ("Q4_0", 3)])
@pytest.mark.parametrize("shape", [(7, 32), (300, 576), (64, 1536)])
def test_ggml_block_gemv_is_llama_cpps_product(qtype_name, kind, shape):
    # llama.cpp's numerics: the dequantized weight times x quantized to 8 bits per block of 32.
    from emergence.gguf.quants import GGMLType, dequantize, quantize
    from emergence.quant.methods import quantize_activations_q8_0

    qtype = GGMLType[qtype_name]
    torch.manual_seed(shape[0])
    n, k = shape
    w, x = torch.randn(n, k), torch.randn(k)
    if k > 32:
        x[:32] *= 1e-3  # blocks of very different magnitudes
    raw = quantize(w, qtype)
    weight = dequantize(raw, qtype, (n, k)).double()
    xq = quantize_activations_q8_0(x).double()
    none = torch.empty(0)
    got = ext.qgemv(kind, x, torch.from_numpy(raw.reshape(-1).copy()), none, none, 0, 0.0, n, k, None)
    bound = 2**-20 * (weight.abs() @ xq.abs())  # integer dot products, fp32 scaling and sums
    assert ((got.double() - weight @ xq).abs() <= bound + 1e-9).all()
    assert ((got.double() - weight @ x.double()).abs() > bound).any()  # x really was quantized


def test_packed_ternary_layout_decodes_to_the_values():
    from emergence.kernels.fused_decode import pack_ternary

    values = torch.randint(-1, 2, (3, 128), dtype=torch.int8)
    packed = pack_ternary(values)
    assert packed.shape == (3, 32)
    # byte j of each 64-column chunk: columns j, j+16, j+32, j+48 in bits 0-1, 2-3, 4-5, 6-7, as value + 1
    for chunk in range(2):
        for j in range(16):
            byte = int(packed[1, chunk * 16 + j])
            for part in range(4):
                assert ((byte >> (2 * part)) & 3) - 1 == values[1, chunk * 64 + 16 * part + j]
    x = torch.randn(128)
    none = torch.empty(0)
    got = ext.qgemv(6, x, packed, none, none, 0, 0.5, 3, 128, None)
    assert torch.allclose(got, (values.float() * 0.5) @ x, atol=1e-5)


@pytest.mark.parametrize("fmt, options", [(f, o) for f, o in QUANTIZED if f != "ternary"])
def test_native_dequantize_equals_the_formats_own(fmt, options):
    from emergence.kernels import native_dequantize

    model = _quantized_model(fmt, options, torch.float32)
    for module in (model.layers[0].attn.qkv_proj, model.layers[1].mlp.down_proj, model.lm_head):
        assert torch.equal(native_dequantize(module), module.dequantize())
