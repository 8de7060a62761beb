"""What a committed result records about where it came from: the machine and the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
            "python": platform.python_version()}


def matmul_peak(dtype=None, n: int = 2048, repeats: int = 3) -> float:
    """The best FLOP/s of n^3 matmuls in `dtype` (fp32 by default) through torch.mm and through
    oneDNN (which emergence's fp32 products use on AMD CPUs, products.py): the hardware
    figure beside training rates, so that no engine's share of it exceeds 100%."""
    import time

    import torch

    a, b = torch.randn(n, n, dtype=dtype or torch.float32), torch.randn(n, n, dtype=dtype or torch.float32)
    products = [lambda: a @ b]
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        from emergence.products import onednn_product

        products.append(lambda: onednn_product(a, b))
    best = float("inf")
    for product in products:
        product()
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def amd_cpu() -> bool:
    """Whether this is an AMD CPU, where the kernels choose differently (kernels/gemv_rows.h,
    blas.h): the benchmarks those choices move write their results to a file of their own there."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return "AuthenticAMD" in f.read(4096)
    except OSError:
        return False


def result_path(stem: str) -> str:
    """bench/results/STEM.json, or STEM_amd.json on an AMD CPU (amd_cpu)."""
    return f"bench/results/{stem}{'_amd' if amd_cpu() else ''}.json"


def commit() -> str:
    """HEAD, with "+dirty" when the library measured (src/) has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                               cwd=ROOT).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def write_result(path: Path, result: dict, script: str, argv: list[str], threads: int) -> None:
    """`result` as JSON at `path`, with where it came from: the commit, the command, the machine."""
    import json

    result.update(commit=commit(), command=" ".join([script, *argv]), machine=machine(), threads=threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
