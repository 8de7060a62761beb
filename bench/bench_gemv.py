"""Batch-1 GEMV bandwidth: emergence's native kernel vs torch's linear vs a plain read.

The working set has the shapes of every matrix of smollm2-135m (30 layers of qkv, o,
gate_up, down, plus the output head), about 270 MB in bf16 and 540 MB in fp32, far larger
than the caches, so each product streams its weights from memory as in real decoding.
GB/s = weight bytes / time for one pass over all matrices (best of several passes); the
"read" column sums the same bytes once, the bandwidth bound on this machine.

    python bench/bench_gemv.py
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from emergence.kernels import gemv_extension

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best_time(fn, passes: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    ext = gemv_extension()
    if ext is None:
        print("native kernels unavailable on this machine")
        return 1
    print(f"{torch.get_num_threads()} threads; smollm2-135m matrix shapes\n")
    print("| dtype | weight MB | emergence kernel GB/s | torch linear GB/s | plain read GB/s |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(o, i).to(dtype) for o, i in SHAPES]
        xs = {k: torch.randn(1, k).to(dtype) for k in {i for _, i in SHAPES}}
        flat = torch.cat([w.flatten() for w in weights]).view(torch.float32)  # same bytes, read as fp32
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        kernel = best_time(lambda: [ext.gemv(xs[w.shape[1]], w, None) for w in weights])
        linear = best_time(lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
        read = best_time(lambda: flat.sum())
        print(f"| {str(dtype).removeprefix('torch.')} | {nbytes / 1e6:.0f} | {nbytes / kernel / 1e9:.1f} "
              f"| {nbytes / linear / 1e9:.1f} | {nbytes / read / 1e9:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
