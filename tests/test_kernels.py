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
    folder = _build_directory()
    lock = folder / "lock"
    lock.write_text("")
    assert _build_directory() == folder and lock.exists()  # a build may be running: wait for it
    old = time.time() - STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    _build_directory()
    assert not lock.exists()
