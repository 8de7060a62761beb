"""fp32 matrix products of the eager model (prompts, training) on oneDNN where MKL is slow.

torch multiplies fp32 matrices on the CPU with MKL; on the AMD EPYC of
bench/results/onednn_amd.json its sgemm runs at about half the rate of oneDNN, which torch also
contains (torch.ops.mkldnn._linear_pointwise, the operator its own CPU compiler emits for linear
layers). `linear` is
F.linear, through oneDNN where the native kernels' choice says so (kernels/blas.h's
`onednn_products`: AMD CPUs, switchable with the extension's `set_onednn_products`) and the
product is worth a call: fp32 on the CPU, at least MIN_ROWS rows, outside autocast and
torch.compile. Its backward multiplies on oneDNN too: dx = dy W, dW = dy^T x. Both libraries
sum in fp32, in different orders (the same file gives each one's error against float64).

`Linear` is nn.Linear with that forward: the model's projections and head are built from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 16  # below, a decoding step's few rows: torch's own product, without the operator's call cost


def onednn_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) w (N, K)^T (+ bias) on oneDNN; x and w may be transposed views."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def onednn_enabled() -> bool:
    """Whether fp32 products go to oneDNN here (the native kernels' setting; off without them)."""
    from .kernels import gemv_extension

    extension = gemv_extension()
    return extension is not None and extension.onednn_products()


def _takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"
            and (bias is None or bias.dtype == torch.float32) and x.dim() >= 1 and x.numel() >= MIN_ROWS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and onednn_enabled())


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1])  # (M, K)
        ctx.save_for_backward(rows, weight)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        return onednn_product(rows, weight, bias).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        dy = grad.reshape(-1, grad.shape[-1])  # (M, N)
        dx = onednn_product(dy, weight.t()).reshape(ctx.shape) if ctx.needs_input_grad[0] else None  # dy W
        dw = onednn_product(dy.t(), rows.t()) if ctx.needs_input_grad[1] else None  # dy^T x, (N, K)
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on oneDNN where `onednn_enabled()` and the product is worth it."""
    if _takes(x, weight, bias):
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def matmul_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) b (N, K)^T, into `out` when given, for the written-out loss's products (either
    operand may be a transposed view): oneDNN where `linear` would use it, else torch.mm. No
    autograd."""
    if not _takes(a, b, None):
        return torch.mm(a, b.t(), out=out)
    product = onednn_product(a, b)
    return product if out is None else out.copy_(product)


class Linear(nn.Linear):
    """nn.Linear whose product is `linear`'s (oneDNN where MKL is slow); the same parameters,
    state dict and initialisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
