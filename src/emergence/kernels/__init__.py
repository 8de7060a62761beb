"""Native CPU kernels for decoding, compiled on first use and cached.

`decode.cpp` runs a whole forward pass of a decode batch (every layer) in one call, without
the per-operator overhead of eager PyTorch: one row, several rows with one pass over the
weights, short prompts (fused_decode.py is its backend). `gemv.cpp` exposes the row kernels
on their own (GEMV, batched GEMM, packed-weight GEMV, GEMM on ggml blocks and
dequantization) for the quantized layers' eager path (long prompts), tests and benchmarks.

The extension is built with torch's cpp_extension (gcc + ninja) the first time it is needed,
about a minute on 2 cores, into torch's extension cache: $TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions, one folder per version and place of the sources, Python and torch
(changing any of them builds anew; the old folder can be deleted). `python -m emergence.kernels` builds
it ahead of time (the Makefile's install does). Where it cannot be built or the CPU lacks
AVX-512, decoding uses the eager backend (torch operators). EMERGENCE_NO_KERNELS=1 turns the
kernels off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent
SOURCES = [HERE / "gemv.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "blas.h", HERE / "gemv_rows.h", HERE / "quant_rows.h", HERE / "ggml_rows.h", HERE / "team.h"]
REQUIRED_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "fma"}
STALE_LOCK_SECONDS = 900  # a build takes about a minute on 2 cores


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """/proc/cpuinfo's flags (empty off Linux x86-64)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        return frozenset(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return frozenset()


def _cpu_supports() -> bool:
    return REQUIRED_CPU_FLAGS <= _cpu_flags()


@functools.cache
def gemv_extension():
    """The compiled extension module, or None when unavailable (never raises)."""
    if os.environ.get("EMERGENCE_NO_KERNELS") or not _cpu_supports():
        return None
    try:
        from torch.utils.cpp_extension import load

        name = f"emergence_kernels_{_source_digest()}"
        build_dir = _build_directory(name)
        if not (build_dir / f"{name}.so").exists():
            print(f"emergence: building the native decode kernels into {build_dir} (about a minute, once)",
                  file=sys.stderr, flush=True)
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
    """Names the build after the sources and headers (torch only notices changes to the sources)
    and where they are: torch rebuilds when its build command changes, and the command names the
    sources' paths, so two checkouts sharing one folder would rebuild it in turn on every load."""
    digest = hashlib.sha256(str(HERE.resolve()).encode())
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


def native_dequantize(module: nn.Module) -> torch.Tensor | None:
    """A quantized linear layer's weight as fp32 (N, K), unpacked by the native kernels: the same
    values as module.dequantize(), many times faster (the eager forward pass needs it on every
    call). None where no kernel handles the format (the caller then dequantizes in Python)."""
    if getattr(module, "format", None) == "ternary":
        return None  # plain int8 values times one scale, already cheap in torch
    extension = gemv_extension()
    ops = module.kernel_operands() if extension is not None else None
    if ops is None:
        return None
    return extension.qdequantize(extension.weight_kinds[ops.format], ops.data, ops.scales, ops.offsets, ops.group,
                                 ops.tensor_scale, module.out_features, module.in_features)


# The own formats whose prompts qgemm widens a tile of rows at a time (ggml's it multiplies on
# their blocks, quant.linear.GGML_KERNEL_FORMATS).
WIDENED_FORMATS = ("int8", "int4", "nf4", "ternary")
# Of those, the 4-bit ones that multiply in bf16 with fp32 sums on a CPU with AVX512-BF16 (AMX
# tiles where it has them), as bitsandbytes' 4-bit layers compute in their bf16 compute dtype: a 4-bit
# weight's quantization step is 1/15 of its group's range, and rounding x and the widened weight
# to bf16 moves each by at most 2^-8 of itself (on oneDNN, AMD CPUs, the result too). Whatever
# the number of rows, so a row's result never depends on the batch it came in; the native
# decoding step's GEMV keeps fp32 x.
BF16_FORMATS = ("int4", "nf4")
_bf16_products = contextvars.ContextVar("bf16_products", default=True)


@contextlib.contextmanager
def fp32_products() -> Iterator[None]:
    """Within it (this thread or task), BF16_FORMATS multiply in fp32 as the others do: GPTQ's
    calibration, whose Hessians are then the inputs' exact products (quant/methods.py)."""
    token = _bf16_products.set(False)
    try:
        yield
    finally:
        _bf16_products.reset(token)


def bf16_prompt_products() -> bool:
    """Whether BF16_FORMATS' prompts multiply in bf16 here (now, in this thread or task): the
    CPU has AVX512-BF16, torch a bf16 GEMM, and no fp32_products() is in force."""
    extension = gemv_extension()
    return (_bf16_products.get() and extension is not None and extension.has_bf16_gemm
            and "avx512_bf16" in _cpu_flags())


def native_qgemm(module: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., K) times a packed layer's weight, plus `bias` (added to the fp32 result, which is
    then rounded once to x's dtype) (quant_rows.h): ggml's formats on their blocks (qgemm_ggml:
    x quantized to Q8_0 per row, Q8_K for the K-quants, integer dot products per block or
    sub-block, llama.cpp's numerics); int8 /
    int4 / NF4 / ternary for fp32 x, the weight widened a tile of rows at a time and multiplied
    with torch's BLAS (qgemm_widened: the values of x times dequantize(), the fp32 matrix never
    whole; int4 and NF4 in bf16 with fp32 sums where the CPU has AVX512-BF16, BF16_FORMATS, for
    fp32 or bf16 x). None where no kernel serves it (another format or dtype, no kernels or
    VNNI, a gradient to carry: training multiplies the dequantized weight)."""
    from ..quant.linear import GGML_KERNEL_FORMATS

    extension = gemv_extension()
    if extension is None:
        return None
    fmt = getattr(module, "format", None)
    on_blocks = fmt in GGML_KERNEL_FORMATS and "avx512_vnni" in _cpu_flags()
    # (where the products run on oneDNN, on AMD CPUs (blas.h), the bf16 ones are oneDNN's too,
    # their results rounded to bf16)
    bf16 = fmt in BF16_FORMATS and bf16_prompt_products()
    # bf16 x too for the 4-bit formats (a bf16 model's prompt: its x exact in bf16 products, and
    # widened to fp32 exactly for fp32 ones)
    widened = fmt in WIDENED_FORMATS and (x.dtype == torch.float32 or (fmt in BF16_FORMATS and x.dtype == torch.bfloat16))
    if not (on_blocks or widened) or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return None
    ops = module.kernel_operands()
    if ops is None:
        return None
    rows = x.reshape(-1, x.shape[-1])
    if rows.dtype == torch.bfloat16 and not bf16:
        rows = rows.float()
    y = extension.qgemm(extension.weight_kinds[ops.format], rows, ops.data, ops.scales, ops.offsets, ops.group,
                        ops.tensor_scale, module.out_features, module.in_features, bias, bf16)
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)


def wake_thread_team() -> None:
    """Wake the calling thread's OpenMP workers: an empty parallel region on its team (nothing
    without the native kernels).

    Idle workers spin a while after a region, then sleep; the next region waits for them to
    wake, and on a virtual machine whose idle cores halt, that wait can outlast a whole forward
    pass of a small model (bench/bench_serve_peers.py measures it), so a server's first pass
    after a pause paid it. A serving engine about to get work calls this meanwhile (engine.py),
    every few milliseconds while requests are still arriving, so the workers are awake when
    the prefill starts. It returns when they have all joined (the GIL released meanwhile)."""
    ext = gemv_extension()
    if ext is not None:
        ext.wake_team()


def release_thread_pool() -> None:
    """Hand back the calling thread's OpenMP worker threads, before another thread (a server's
    decoding engine) takes over the parallel work.

    Each thread that runs a parallel region keeps its own team of workers. libgomp (torch's
    OpenMP runtime on Linux) lets idle workers spin between regions only while all its threads
    fit the cores; with a second team on a 2-core machine they sleep on a futex instead, and
    each of a step's ~30 regions waits for them to wake: emergence-6m's 16-row step took about
    5 ms in the engine's thread against 3 ms in the thread that loaded the model. Pausing the
    loader's team (omp_pause_resource_all, OpenMP 5) leaves the engine's the only one. Where
    another runtime or none is loaded, nothing is done; the team comes back if this thread
    runs parallel work again.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return
    for path in paths:  # the runtime already loaded (dlopen of its path returns the same copy)
        try:
            import ctypes

            ctypes.CDLL(path).omp_pause_resource_all(2)  # omp_pause_hard
        except (OSError, AttributeError):
            pass


class SmallBatchLinear(nn.Linear):
    """nn.Linear whose inference on a few fp32 CPU rows (a decode step: one row per beam or
    sequence) runs through the native batched GEMM: one pass over the weight for all rows, at
    3-4x torch's speed on small batches (bench/bench_gemv.py). Anything else (more rows, a
    gradient, another device or dtype, no kernels) is nn.Linear's own forward. Models the
    one-call native step does not cover (T5's decoder) build their projections with it."""

    MAX_ROWS = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        rows = x.numel() // max(x.shape[-1], 1)
        if (rows <= self.MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()):
            extension = gemv_extension()
            if extension is not None:
                y = extension.gemm(x.reshape(rows, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
                return y if self.bias is None else y + self.bias
        return super().forward(x)

