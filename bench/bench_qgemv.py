"""Where quantized decoding spends its time: each format's GEMV, compute-bound and memory-bound.

For every weight format with a native kernel, on the smollm2-135m matrix shapes:
  - compute: one 576 x 1536 matrix that fits in L2, multiplied repeatedly on one thread
    (Gweights/s: how fast the kernel unpacks and multiplies when memory is no limit);
  - stream: every matrix of the model once per pass on all threads, from DRAM (effective
    GB/s of packed bytes, and the token rate this alone would allow).
A format whose stream rate sits well under the machine's read bandwidth while its compute
rate x threads is near the weights-per-token rate is compute-bound, and the reverse.
Last, the fixed cost of one GEMV call (an 8 x 576 Q4_0 matrix) and a 576 x 576 Q4_0 GEMV on 1
and on all threads: what splitting a small matrix across threads buys.

    python bench/bench_qgemv.py [--runs 3]

Writes bench/results/qgemv.json; the README's table is `render_table` of it.
"""

from __future__ import annotations

import time

import torch

from emergence.kernels import gemv_extension
from emergence.quant.linear import quantize_model

FORMATS = [("int8", {}), ("q8_0", {}), ("int4", {"group_size": 32}), ("q4_0", {}), ("nf4", {}), ("ternary", {})]
# smollm2-135m: 30 x (qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536) + head 49152x576
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def operands(fmt: str, options: dict, shape: tuple[int, int]):
    layer = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False))
    torch.nn.init.normal_(layer[0].weight, std=0.02)
    quantize_model(layer, fmt, skip=(), **options)
    ops = layer[0].kernel_operands()
    return (gemv_extension().weight_kinds[ops.format], ops.data, ops.scales, ops.offsets, ops.group, ops.tensor_scale,
            ops.act_bits)


def best_of(fn, repeats: int) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(ext, x: torch.Tensor) -> dict:
    """One run: per format, compute (Gweights/s, 1 thread, L2) and stream (GB/s and tok/s, all
    threads); and the per-call costs of small Q4_0 GEMVs."""
    threads = torch.get_num_threads()
    formats = {}
    for fmt, options in FORMATS:
        kind, data, scales, offsets, group, scale, _ = operands(fmt, options, (576, 1536))
        torch.set_num_threads(1)
        run = lambda: [ext.qgemv(kind, x[:1536], data, scales, offsets, group, scale, 576, 1536, None)  # noqa: E731
                       for _ in range(50)]
        compute = 50 * 576 * 1536 / best_of(run, 5) / 1e9
        torch.set_num_threads(threads)
        mats = [(operands(fmt, options, s), s) for s in SHAPES]
        nbytes = sum(op[1].numel() for op, _ in mats)

        def stream():
            for (k, d, sc, off, g, sca, _), (n, kk) in mats:
                ext.qgemv(k, x[:kk], d, sc, off, g, sca, n, kk, None)

        seconds = best_of(stream, 5)
        label = fmt + (f"-g{options['group_size']}" if "group_size" in options else "")
        formats[label] = {"compute_gweights_s": compute, "stream_gb_s": nbytes / seconds / 1e9,
                          "stream_tok_s": 1 / seconds}
        print(f"  {label}: compute {compute:.1f} Gweights/s, stream {nbytes / seconds / 1e9:.1f} GB/s "
              f"({1 / seconds:.0f} tok/s)", flush=True)
    return {"formats": formats, "calls_us": per_call(ext, x)}


def per_call(ext, x: torch.Tensor) -> dict:
    """Microseconds per call of a Q4_0 GEMV: an 8 x 576 matrix on all threads, 576 x 576 on one and all."""
    kind, data, scales, offsets, group, scale, _ = operands("q4_0", {}, (576, 576))
    threads = torch.get_num_threads()
    out = {}
    for rows, n_threads in ((8, threads), (576, 1), (576, threads)):
        torch.set_num_threads(n_threads)
        part = data[:rows].contiguous()
        run = lambda: [ext.qgemv(kind, x[:576], part, scales, offsets, group, scale, rows, 576, None)  # noqa: E731
                       for _ in range(1000)]
        out[f"{rows}x576, {n_threads} threads"] = best_of(run, 5) * 1e3
    torch.set_num_threads(threads)
    return out


def render_table(result: dict) -> str:
    """The README's table: each format's range over the runs."""
    def span(values: list[float], digits: int) -> str:
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}"

    runs = result["runs"]
    rows = [f"| format | compute, 1 thread, L2-resident (Gweights/s) | stream, {result['threads']} threads (GB/s) | "
            "stream alone: tok/s |", "|---|---|---|---|"]
    for label in runs[0]["formats"]:
        v = [r["formats"][label] for r in runs]
        rows.append(f"| {label} | {span([x['compute_gweights_s'] for x in v], 1)} | "
                    f"{span([x['stream_gb_s'] for x in v], 1)} | {span([x['stream_tok_s'] for x in v], 0)} |")
    return "\n".join(rows)


def main() -> None:
    from provenance import result_path  # bench/ is on the path: STEM.json, STEM_amd.json on an AMD CPU
    import argparse
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="whole runs, one after the other (their ranges)")
    parser.add_argument("--out", default=result_path("qgemv"))
    args = parser.parse_args()
    ext = gemv_extension()
    if ext is None:
        raise SystemExit("native kernels unavailable")
    x = torch.randn(49152)  # long enough for every K
    threads = torch.get_num_threads()
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}, {threads} threads", flush=True)
        runs.append(measure(ext, x))
    result = {"threads": threads, "runs": runs}
    print("\n" + render_table(result))
    for key in runs[0]["calls_us"]:
        times = ", ".join(f"{r['calls_us'][key]:.1f}" for r in runs)
        print(f"Q4_0 GEMV {key}: {times} us per call")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import write_result

    write_result(Path(args.out), result, "bench/bench_qgemv.py", sys.argv[1:], threads)


if __name__ == "__main__":
    main()
