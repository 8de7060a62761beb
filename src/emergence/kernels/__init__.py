"""Native CPU kernels for decoding, compiled on first use and cached.

`gemv.cpp` streams each weight matrix once per token with AVX-512 loads and fp32
accumulation; torch's bf16 GEMV reaches only about half the memory bandwidth.
`decode.cpp` runs a whole decoding step (every layer) in one call, without the per-operator
overhead of eager PyTorch: for one row, for several left-padded rows with one pass over the
weights (batched generation, serving), and for short prompts (see fused_decode.py). The extension is built with torch's cpp_extension (gcc + ninja) the first time it is needed,
into torch's extension cache; `python -m emergence.kernels` builds it ahead of time (the
Makefile does). Where it cannot be built or the CPU lacks AVX-512, everything falls back
to torch.nn.functional.linear. EMERGENCE_NO_KERNELS=1 turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).parent
SOURCES = [HERE / "gemv.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "gemv_rows.h", HERE / "quant_rows.h"]
REQUIRED_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "fma"}
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
STALE_LOCK_SECONDS = 900  # a build takes about a minute on 2 cores


def _cpu_supports() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return REQUIRED_CPU_FLAGS <= set(flags)


@functools.cache
def gemv_extension():
    """The compiled extension module, or None when unavailable (never raises)."""
    if os.environ.get("EMERGENCE_NO_KERNELS") or not _cpu_supports():
        return None
    try:
        from torch.utils.cpp_extension import load

        name = f"emergence_kernels_{_source_digest()}"
        build_dir = _build_directory(name)
        # -fopenmp: at::parallel_for is an OpenMP pragma in a header; without it the kernel runs on one thread.
        return load(name=name, sources=[str(s) for s in SOURCES], build_directory=str(build_dir),
                    extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mf16c",
                                  "-ffp-contract=off"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or ninja must not stop inference: fall back to torch
        reason = (str(e).splitlines() or [""])[0][:200]
        print(f"emergence: native decode kernels unavailable ({type(e).__name__}: {reason}); using torch's",
              file=sys.stderr)
        return None


def _source_digest() -> str:
    """Names the build after the sources and headers: torch only notices changes to the sources."""
    digest = hashlib.sha256()
    for path in SOURCES + HEADERS:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _build_directory(name: str) -> Path:
    """One build folder per source version, Python and torch. A build killed midway leaves torch's
    lock file behind, and torch would wait on it forever: a lock older than any real build is removed."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    folder = root / f"{name}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink()
    except FileNotFoundError:
        pass
    return folder


_gemv = None  # the extension's gemv, set by use_decode_kernels


class DecodeLinear(nn.Linear):
    """nn.Linear that sends a single activation vector (batch-1 decoding) to the GEMV kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() == self.in_features and x.device.type == "cpu" and self.weight.dtype in KERNEL_DTYPES
                and not torch.is_grad_enabled()):
            return _gemv(x, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_decode_kernels(model: nn.Module) -> bool:
    """Route the model's CPU decoding through the native kernels: whole steps (and short
    prefills) through a fused DecodePlan where the model's layout allows, and every batch-1
    linear layer through the GEMV. False if the kernels are unavailable here."""
    global _gemv
    extension = gemv_extension()
    if extension is None:
        return False
    _gemv = extension.gemv  # bound once: DecodeLinear.forward is on the per-token hot path
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.is_contiguous():
            module.__class__ = DecodeLinear
    from .fused_decode import FusedDecoder

    if FusedDecoder.supports(model):
        model.fused_decoder = FusedDecoder(model, extension)
    return True


def native_dequantize(module: nn.Module) -> torch.Tensor | None:
    """A quantized linear layer's weight as fp32 (N, K), unpacked by the native kernels: the same
    values as module.dequantize(), many times faster (the eager forward pass needs it on every
    call). None where no kernel handles the format (the caller then dequantizes in Python)."""
    from .fused_decode import _has_kernel, _kernel_operands

    if getattr(module, "format", None) == "ternary" or not _has_kernel(module):
        return None  # ternary: plain int8 values times one scale, already cheap in torch
    extension = gemv_extension()
    if extension is None or any(b.device.type != "cpu" for b in module.buffers()):
        return None
    kind, data, scales, offsets, group, tensor_scale, _ = _kernel_operands(module)
    return extension.qdequantize(kind, data, scales, offsets, group, tensor_scale, module.out_features,
                                 module.in_features)
