"""The batched native paths against the eager forward, same run: decoding steps of 16 rows,
their matrix products, and short-prompt prefill.

- GEMM: every linear layer of emergence-6m (the shipped 5.9M-parameter model) for 16 rows,
  the matrices cold as in a decoding step (23.5 MB, all of them in turn): the native
  `gemm_rows` (kernels/gemv_rows.h) against torch.mm (MKL) on the same operands; and the same
  weights in bf16 where the CPU has AVX512-BF16: widened to fp32 in registers (what the decode
  plan runs), VDPBF16PS on bf16 rows (`gemm_rows_dpbf16`), and torch.mm in bf16.
- Step: one decoding step of emergence-6m for 16 rows (58-60 cached tokens each, in the paged
  KV cache): the native backend against the eager one, and one row alone for reference; the
  native step again with every linear layer at q8_0 and q4_0.
- Prefill: one prompt of 4-128 tokens on the smollm2-135m shapes (30 layers, 576 wide, random
  weights), fp32, bf16, q8_0 and q4_0 (the output head kept fp32): the native prefill against
  the eager forward. This is what sets MAX_NATIVE_PREFILL* in kernels/fused_decode.py.
- BLAS: the fp32 native paths with their products through gemm_rows and through torch's BLAS
  (kernels/blas.h; the extension's set_blas_rows switches between them): emergence-6m decoding
  steps of 16, 32 and 64 rows and smollm2-135m prefills of 16, 32 and 64 tokens. This is what
  sets the rows from which the decode plan uses the BLAS (decode.cpp's g_blas_rows).

Every figure is the best of several repetitions (11 by default; the machine is shared and noisy),
each path timed on its own rather than interleaved with the others.

    python bench/bench_batched.py [--reps 11]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import emergence
from emergence.config import Config
from emergence.decode import make_backend
from emergence.kernels import _cpu_flags, gemv_extension
from emergence.kv_cache import PagedKVCache
from emergence.model import Transformer


def best_ms(fn, reps: int, inner: int) -> float:
    """Best over reps of the mean time of `inner` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner * 1e3)
    return best


def bench_gemm(model, reps: int, rows: int = 16) -> dict:
    ext = gemv_extension()
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    for w in weights:  # same product, to fp32 rounding
        assert torch.allclose(ext.gemm(xs[w.shape[1]], w), xs[w.shape[1]] @ w.T, rtol=1e-4, atol=1e-4)
    flops = sum(2 * rows * w.numel() for w in weights)
    native = best_ms(lambda: [ext.gemm(xs[w.shape[1]], w) for w in weights], reps, 20)
    mkl = best_ms(lambda: [torch.mm(xs[w.shape[1]], w.T) for w in weights], reps, 20)
    out = {"rows": rows, "matrices": len(weights), "native_ms": native, "torch_mm_ms": mkl,
           "native_gflop_s": flops / native / 1e6, "torch_mm_gflop_s": flops / mkl / 1e6}
    if "avx512_bf16" in _cpu_flags():  # bf16 weights: widened in registers, or VDPBF16PS on bf16 rows
        wb = [w.bfloat16() for w in weights]
        xb = {k: x.bfloat16() for k, x in xs.items()}
        widen = best_ms(lambda: [ext.gemm(xs[w.shape[1]], w) for w in wb], reps, 20)
        dot = best_ms(lambda: [ext.gemm(xb[w.shape[1]], w) for w in wb], reps, 20)
        mkl_bf16 = best_ms(lambda: [torch.mm(xb[w.shape[1]], w.T) for w in wb], reps, 20)
        out["bf16"] = {"widen_ms": widen, "dpbf16_ms": dot, "torch_mm_ms": mkl_bf16}
    return out


def paged(model, rows: int, tokens: list[int]) -> tuple[PagedKVCache, list[list[int]]]:
    """A paged cache holding `rows` sequences of tokens[r] tokens each (their values unwritten)."""
    cache = PagedKVCache(model.config, rows * (max(tokens) // 16 + 2), dtype=model.tok_embeddings.weight.dtype)
    tables = [[] for _ in range(rows)]
    for table, n in zip(tables, tokens):
        cache.grow(table, 0, n + 1)
    return cache, tables


def bench_step(model, reps: int, rows: int = 16, cached: int = 60) -> dict:
    """One decoding step of `rows` rows, native and eager, and one row natively; then the same
    native steps with every linear layer but the head at q8_0 and at q4_0 (the rows multiplied
    on the packed blocks, qgemm_ggml, against one GEMV per row for one row)."""
    import copy

    from emergence.quant.linear import quantize_model

    out = {}
    quantized = {fmt: copy.deepcopy(model) for fmt in ("q8_0", "q4_0")}
    for fmt, twin in quantized.items():
        quantize_model(twin, fmt)  # (the output head kept as it is)
    with torch.inference_mode():
        runs = [("native_1_row", model, 1, "native"), ("native", model, rows, "native"),
                ("eager", model, rows, "eager")]
        for fmt, twin in quantized.items():
            runs += [(f"{fmt}_native_1_row", twin, 1, "native"), (f"{fmt}_native", twin, rows, "native")]
        for name, m, B, backend in runs:
            lengths = [cached - b % 3 for b in range(B)]
            cache, tables = paged(m, B, lengths)
            runner = make_backend(m, cache, backend)
            out[f"{name}_ms"] = best_ms(lambda: runner.forward([[1]] * B, lengths, tables), reps, 20)
    return out


def bench_prefill(reps: int) -> list[dict]:
    from emergence.kernels.fused_decode import NativeBackend

    from emergence.quant.linear import quantize_model

    config = Config.from_name("smollm2-135m")
    rows = []
    for dtype in (torch.float32, torch.bfloat16, "q8_0", "q4_0"):
        torch.manual_seed(0)
        model = Transformer(config).to(dtype if isinstance(dtype, torch.dtype) else torch.float32).eval()
        if not isinstance(dtype, torch.dtype):
            quantize_model(model, dtype)
        for T in (4, 8, 16, 32, 64, 128):
            ids = torch.randint(0, 1000, (T,)).tolist()
            cache, tables = paged(model, 1, [T])
            native, eager = NativeBackend(model, cache), make_backend(model, cache, "eager")
            times = {name: best_ms(lambda: runner._native([ids], [0], tables) if name == "native"
                                   else runner.forward([ids], [0], tables), reps, 1)
                     for name, runner in (("native", native), ("eager", eager))}
            rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": T,
                         "native_tok_s": T / times["native"] * 1e3, "eager_tok_s": T / times["eager"] * 1e3,
                         "native_used_by_default": T <= native.max_prefill})
    return rows


def bench_blas(model, reps: int) -> list[dict]:
    """Native fp32 steps and prefills with every product through gemm_rows, then through the BLAS."""
    from emergence.kernels.fused_decode import NativeBackend

    ext = gemv_extension()
    torch.manual_seed(0)
    big = Transformer(Config.from_name("smollm2-135m")).eval()
    rows = []
    default = ext.set_blas_rows(1)
    try:
        with torch.inference_mode():
            for what, m, n in [("step", model, n) for n in (16, 32, 64)] + [("prefill", big, n) for n in (16, 32, 64)]:
                times = {}
                for path, threshold in (("gemm_rows", 2 ** 62), ("blas", 1)):
                    ext.set_blas_rows(threshold)
                    if what == "step":
                        lengths = [60 - b % 3 for b in range(n)]
                        cache, tables = paged(m, n, lengths)
                        runner = make_backend(m, cache, "native")
                        times[path] = best_ms(lambda: runner.forward([[1]] * n, lengths, tables), reps, 20)
                    else:
                        ids = torch.randint(0, 1000, (n,)).tolist()
                        cache, tables = paged(m, 1, [n])
                        runner = NativeBackend(m, cache)
                        times[path] = best_ms(lambda: runner._native([ids], [0], tables), reps, 1)
                rows.append({"what": what, "model": m.config.name, "rows": n, "gemm_rows_ms": times["gemm_rows"],
                             "blas_ms": times["blas"], "blas_speedup": times["gemm_rows"] / times["blas"],
                             "blas_by_default": n >= default})
    finally:
        ext.set_blas_rows(default)
    return rows


def main() -> int:
    from provenance import result_path  # bench/ is on the path: STEM.json, STEM_amd.json on an AMD CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--out", default=result_path("batched"))
    args = parser.parse_args()
    if gemv_extension() is None:
        raise SystemExit("the native kernels are not available here")
    model = emergence.load("emergence-6m").model
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "gemm": bench_gemm(model, args.reps), "step": bench_step(model, args.reps),
              "prefill": bench_prefill(args.reps)}
    if gemv_extension().has_blas:
        result["blas"] = bench_blas(model, args.reps)
    g, s = result["gemm"], result["step"]
    print(f"emergence-6m, {g['rows']} rows x {g['matrices']} linear layers: native {g['native_ms']:.2f} ms "
          f"({g['native_gflop_s']:.0f} GFLOP/s), torch.mm {g['torch_mm_ms']:.2f} ms ({g['torch_mm_gflop_s']:.0f})")
    if "bf16" in g:
        b = g["bf16"]
        print(f"  bf16 weights: widened {b['widen_ms']:.2f} ms, VDPBF16PS {b['dpbf16_ms']:.2f} ms, "
              f"torch.mm {b['torch_mm_ms']:.2f} ms")
    print(f"emergence-6m decoding step: 16 rows native {s['native_ms']:.2f} ms, eager {s['eager_ms']:.2f} ms; "
          f"1 row native {s['native_1_row_ms']:.2f} ms")
    for fmt in ("q8_0", "q4_0"):
        print(f"  at {fmt}: 16 rows {s[f'{fmt}_native_ms']:.2f} ms, 1 row {s[f'{fmt}_native_1_row_ms']:.2f} ms")
    print("\n| dtype | prompt tokens | native tok/s | eager tok/s | native by default |\n|---|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| {r['dtype']} | {r['tokens']} | {r['native_tok_s']:.0f} | {r['eager_tok_s']:.0f} | "
              f"{'yes' if r['native_used_by_default'] else 'no'} |")
    if "blas" in result:
        print("\n| fp32 native | rows | gemm_rows ms | BLAS ms | BLAS speed-up | BLAS by default |\n"
              "|---|---|---|---|---|---|")
        for r in result["blas"]:
            print(f"| {r['model']} {r['what']} | {r['rows']} | {r['gemm_rows_ms']:.2f} | {r['blas_ms']:.2f} | "
                  f"{r['blas_speedup']:.2f}x | {'yes' if r['blas_by_default'] else 'no'} |")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import write_result

    write_result(Path(args.out), result, "bench/bench_batched.py", sys.argv[1:], torch.get_num_threads())
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
