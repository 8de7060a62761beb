"""fp32 products on oneDNN against torch's BLAS (MKL), and what they do to prompt processing.

torch's CPU wheels multiply fp32 matrices with MKL; oneDNN is also inside torch (the
`mkldnn::_linear_pointwise` operator torch's CPU compiler calls). The native kernels use oneDNN for their fp32
prompt products where `set_onednn_products` is on (by default on AMD CPUs: kernels/blas.h).
On the smollm2-135m shapes (random weights, 2 threads), same run, rounds alternating the sides:

- GEMM: GFLOP/s of torch.mm and of oneDNN on the products of a 128-token prompt (x W^T for
  each matrix shape) and of a training step of 4 x 256 tokens (x W^T, dy W and dy^T x), and
  each side's largest error against the float64 product (both fp32 products);
- fp32 prefill of 64-1024 tokens: the native prefill with its products on the BLAS and on
  oneDNN, and the eager forward (torch.mm); what sets MAX_NATIVE_PREFILL_ONEDNN
  (kernels/fused_decode.py);
- the packed formats' 128-token prompts (the eager forward, each quantized weight widened a
  tile of rows at a time: kernels.native_qgemm): int8 in fp32 on the BLAS or on oneDNN, int4
  and NF4 in MKL's bf16 product, in fp32 on oneDNN (kernels.fp32_products) or in bf16 on
  oneDNN (the output head kept fp32);
- int4 and NF4 prompts of 64-1024 tokens through the native prefill and the eager forward, the
  products oneDNN's in both (what sets MAX_NATIVE_PREFILL_4BIT_ONEDNN);
- a bf16 model's prompts of 64-1024 tokens through the native prefill and the eager forward,
  the products oneDNN's bf16 product in both (what sets MAX_NATIVE_PREFILL_BF16_ONEDNN).

    python bench/bench_onednn.py [--rounds 5]

Rates are medians over rounds of the best of 3 repetitions. Writes bench/results/onednn.json
(onednn_amd.json on an AMD CPU); the README's table is `render_table` of it.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import result_path, write_result  # noqa: E402

from emergence.config import Config  # noqa: E402
from emergence.decode import make_backend  # noqa: E402
from emergence.kernels import BF16_FORMATS, _cpu_flags, fp32_products, gemv_extension  # noqa: E402
from emergence.kernels.fused_decode import NativeBackend  # noqa: E402
from emergence.products import onednn_product  # noqa: E402
from emergence.kv_cache import PagedKVCache  # noqa: E402
from emergence.model import Transformer  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]  # (N, K): smollm2-135m's matrices
PREFILL_TOKENS = [64, 128, 256, 512, 1024]
PACKED = {"int8": ("int8", {}), "int4-g32": ("int4", {"group_size": 32}), "nf4": ("nf4", {})}


def best_s(fn, reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_cases() -> list[tuple[str, int, callable, callable, torch.Tensor]]:
    """(name, flops, torch.mm side, oneDNN side, float64 product) of each product."""
    torch.manual_seed(0)
    cases = []
    for n, k in SHAPES:
        x, w = torch.randn(128, k), torch.randn(n, k) * 0.02
        cases.append((f"prompt 128 x {k} x {n}", 2 * 128 * n * k, lambda x=x, w=w: torch.mm(x, w.T),
                      lambda x=x, w=w: onednn_product(x, w), x.double() @ w.double().T))
    m = 1024  # a training step of 4 x 256 tokens
    for n, k in SHAPES[:4]:
        x, w, dy = torch.randn(m, k), torch.randn(n, k) * 0.02, torch.randn(m, n)
        cases.append((f"train x W^T {m} x {k} x {n}", 2 * m * n * k, lambda x=x, w=w: torch.mm(x, w.T),
                      lambda x=x, w=w: onednn_product(x, w), x.double() @ w.double().T))
        cases.append((f"train dy W {m} x {n} x {k}", 2 * m * n * k, lambda dy=dy, w=w: torch.mm(dy, w),
                      lambda dy=dy, w=w: onednn_product(dy, w.T), dy.double() @ w.double()))
        cases.append((f"train dy^T x {n} x {m} x {k}", 2 * m * n * k, lambda dy=dy, x=x: torch.mm(dy.T, x),
                      lambda dy=dy, x=x: onednn_product(dy.T, x.T), dy.double().T @ x.double()))
    return cases


def prompt(model: Transformer, n: int) -> tuple[list[int], PagedKVCache, list[int]]:
    """An n-token prompt, a cache (in the model's dtype) with room for it and its block table."""
    cache = PagedKVCache(model.config, n // 16 + 2, block_size=16, dtype=model.dtype)
    table: list[int] = []
    cache.grow(table, 0, n + 1)
    return torch.randint(3, 1000, (n,)).tolist(), cache, table


def prefill_runners(model: Transformer, ext) -> dict:
    """tokens -> {side: callable}: the native prefill on the BLAS and on oneDNN, the eager forward."""
    runners = {}
    for n in PREFILL_TOKENS:
        ids, cache, table = prompt(model, n)
        native, eager = NativeBackend(model, cache), make_backend(model, cache, "eager")

        def on(flag, run):
            def call():
                ext.set_onednn_products(flag)
                return run()
            return call

        run_native = (lambda native=native, ids=ids, table=table: native._native([ids], [0], [table]))
        runners[n] = {"native, BLAS": on(False, run_native), "native, oneDNN": on(True, run_native),
                      "eager": on(False, lambda eager=eager, ids=ids, table=table: eager.forward([ids], [0], [table]))}
    return runners


def onednn_prefill_sides(model: Transformer, ext, n: int) -> dict:
    """{side: callable}: an n-token prompt of `model` through the native prefill and through the
    eager forward, the products oneDNN's in both."""
    ids, cache, table = prompt(model, n)
    ext.set_onednn_products(True)  # (the plan reads it when built)
    native, eager = NativeBackend(model, cache), make_backend(model, cache, "eager")

    def on(run):
        def call():
            ext.set_onednn_products(True)
            return run()
        return call

    return {"native": on(lambda: native._native([ids], [0], [table])),
            "eager": on(lambda: eager.forward([ids], [0], [table]))}


def packed_prefill_runners(base: Transformer, ext) -> dict:
    """(format, tokens) -> {side: callable}: int4-g32 and NF4 prompts through the native prefill
    and the eager forward, the products oneDNN's (bf16 where the CPU has AVX512-BF16)."""
    from emergence.quant.linear import quantize_model

    runners = {}
    for name in ("int4-g32", "nf4"):
        fmt, options = PACKED[name]
        model = copy.deepcopy(base)
        quantize_model(model, fmt, **options)
        for n in PREFILL_TOKENS:
            runners[(name, n)] = onednn_prefill_sides(model, ext, n)
    return runners


def bf16_prefill_runners(base: Transformer, ext) -> dict:
    """tokens -> {side: callable}: a bf16 model's prompt through the native prefill and the
    eager forward, oneDNN's bf16 product in both."""
    model = copy.deepcopy(base).to(torch.bfloat16)
    return {n: onednn_prefill_sides(model, ext, n) for n in PREFILL_TOKENS}


def packed_runners(base: Transformer, ext) -> dict:
    from emergence.quant.linear import quantize_model

    ids = torch.randint(3, 1000, (1, 128))
    runners = {}
    for name, (fmt, options) in PACKED.items():
        model = copy.deepcopy(base)
        quantize_model(model, fmt, **options)

        def on(flag, fp32=False, model=model):
            def call():
                ext.set_onednn_products(flag)
                if not fp32:
                    return model(ids)
                with fp32_products():
                    return model(ids)
            return call

        if fmt in BF16_FORMATS:
            runners[name] = {"MKL bf16": on(False), "oneDNN fp32": on(True, fp32=True), "oneDNN bf16": on(True)}
        else:
            runners[name] = {"BLAS": on(False), "oneDNN fp32": on(True)}
    return runners


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=result_path("onednn"))
    args = parser.parse_args()
    ext = gemv_extension()
    if ext is None or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        print("error: needs the native kernels and a torch with oneDNN", file=sys.stderr)
        return 1
    chosen = ext.onednn_products()
    torch.manual_seed(0)
    base = Transformer(Config.from_name("smollm2-135m")).eval()
    cases = gemm_cases()
    gemm = {name: {"errors": [(mm() - exact).abs().max().item(), (dnn() - exact).abs().max().item()],
                   "torch.mm": [], "oneDNN": []} for name, _, mm, dnn, exact in cases}
    samples = {}
    try:
        with torch.inference_mode():
            prefill, packed = prefill_runners(base, ext), packed_runners(base, ext)
            packed_prefill = packed_prefill_runners(base, ext)
            bf16_prefill = bf16_prefill_runners(base, ext) if "avx512_bf16" in _cpu_flags() else {}
            for r in range(args.rounds):
                for name, flops, mm, dnn, _ in cases:
                    sides = [("torch.mm", mm), ("oneDNN", dnn)]
                    for side, fn in sides if r % 2 == 0 else sides[::-1]:
                        gemm[name][side].append(flops / best_s(fn) / 1e9)
                for n, sides in prefill.items():
                    for side, fn in sides.items():
                        samples.setdefault(("prefill", n, side), []).append(n / best_s(fn))
                for name, sides in packed.items():
                    for side, fn in sides.items():
                        samples.setdefault(("packed", name, side), []).append(128 / best_s(fn))
                for (name, n), sides in packed_prefill.items():
                    for side, fn in sides.items():
                        samples.setdefault(("packed_prefill", f"{name} {n}", side), []).append(n / best_s(fn))
                for n, sides in bf16_prefill.items():
                    for side, fn in sides.items():
                        samples.setdefault(("bf16_prefill", n, side), []).append(n / best_s(fn))
                print(f"  round {r + 1}/{args.rounds}: fp32 prefill of 128 tokens " + ", ".join(
                    f"{side} {samples[('prefill', 128, side)][-1]:.0f}" for side in prefill[128]) + " tok/s",
                    flush=True)
    finally:
        ext.set_onednn_products(chosen)

    result = {"rounds": args.rounds, "onednn_by_default": chosen, "gemm": {}, "prefill": {}, "packed": {},
              "packed_prefill": {}, "bf16_prefill": {}}
    for name, entry in gemm.items():
        result["gemm"][name] = {"torch.mm_gflop_s": statistics.median(entry["torch.mm"]),
                                "oneDNN_gflop_s": statistics.median(entry["oneDNN"]),
                                "torch.mm_max_error": entry["errors"][0], "oneDNN_max_error": entry["errors"][1]}
    for (kind, key, side), rates in samples.items():
        result[kind].setdefault(str(key), {})[side] = {"tok_s": statistics.median(rates),
                                                       "range": [min(rates), max(rates)]}
    print("\n" + render_table(result))
    write_result(Path(args.out), result, "bench/bench_onednn.py", sys.argv[1:], torch.get_num_threads())
    return 0


def render_table(result: dict) -> str:
    lines = ["| product | torch.mm (MKL) GFLOP/s | oneDNN GFLOP/s | ratio | largest error vs float64: MKL / oneDNN |",
             "|---|---|---|---|---|"]
    for name, g in result["gemm"].items():
        lines.append(f"| {name} | {g['torch.mm_gflop_s']:.0f} | {g['oneDNN_gflop_s']:.0f} | "
                     f"{g['oneDNN_gflop_s'] / g['torch.mm_gflop_s']:.2f}x | "
                     f"{g['torch.mm_max_error']:.1e} / {g['oneDNN_max_error']:.1e} |")
    lines += ["", "| fp32 prompt tokens | native, BLAS tok/s | native, oneDNN tok/s | eager (torch.mm) tok/s |",
              "|---|---|---|---|"]
    for n, sides in result["prefill"].items():
        lines.append(f"| {n} | " + " | ".join(f"{sides[s]['tok_s']:.0f}" for s in ("native, BLAS", "native, oneDNN",
                                                                                     "eager")) + " |")
    packed = result["packed"]
    if any("oneDNN bf16" in sides for sides in packed.values()):
        lines += ["", "| 128-token prompt | before tok/s | oneDNN fp32 tok/s | oneDNN bf16 tok/s | now / before |",
                  "|---|---|---|---|---|"]
        for name, sides in packed.items():
            before = next(s for s in sides if not s.startswith("oneDNN"))
            now = sides.get("oneDNN bf16", sides["oneDNN fp32"])["tok_s"]
            bf16 = f"{sides['oneDNN bf16']['tok_s']:.0f}" if "oneDNN bf16" in sides else "-"
            lines.append(f"| {name} ({before}) | {sides[before]['tok_s']:.0f} | {sides['oneDNN fp32']['tok_s']:.0f} | "
                         f"{bf16} | {now / sides[before]['tok_s']:.2f}x |")
        if result.get("packed_prefill"):
            pp = result["packed_prefill"]
            lines += ["", "| 4-bit prompt tokens, products on oneDNN | int4-g32 native tok/s | int4-g32 eager tok/s | "
                          "nf4 native tok/s | nf4 eager tok/s |", "|---|---|---|---|---|"]
            for n in sorted({int(key.split()[1]) for key in pp}):
                lines.append(f"| {n} | " + " | ".join(f"{pp[f'{name} {n}'][side]['tok_s']:.0f}"
                                                       for name in ("int4-g32", "nf4") for side in ("native", "eager"))
                             + " |")
        if result.get("bf16_prefill"):
            lines += ["", "| bf16 prompt tokens, oneDNN's bf16 products | native tok/s | eager tok/s | ratio |",
                      "|---|---|---|---|"]
            for n, sides in result["bf16_prefill"].items():
                lines.append(f"| {n} | {sides['native']['tok_s']:.0f} | {sides['eager']['tok_s']:.0f} | "
                             f"{sides['native']['tok_s'] / sides['eager']['tok_s']:.2f}x |")
    else:  # (a result from before the bf16 side)
        lines += ["", "| 128-token prompt | before tok/s | oneDNN fp32 tok/s | ratio |", "|---|---|---|---|"]
        for name, sides in packed.items():
            before = next(s for s in sides if s != "oneDNN")
            lines.append(f"| {name} ({before}) | {sides[before]['tok_s']:.0f} | {sides['oneDNN']['tok_s']:.0f} | "
                         f"{sides['oneDNN']['tok_s'] / sides[before]['tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
