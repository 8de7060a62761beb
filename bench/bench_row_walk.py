"""How the decode GEMVs should walk a matrix's rows on this CPU: one row at a time, or rows side by side.

A memory-bound GEMV can read its weight rows one after another (one stream per thread, rows a
fixed distance ahead prefetched) or a few side by side (their streams interleaved, each load of
x shared by them). Which streams faster depends on the CPU's prefetchers; the kernels pick one
at load (`g_one_row_streams` in src/emergence/kernels/gemv_rows.h: one row on AMD CPUs) and the
extension's `set_one_row_streams` switches it between calls. This script times the native
backend's bare decoding step (bench_quant's `step`: the forward alone, one token) of the
smollm2-135m architecture (random weights, every linear layer in the format) both ways,
alternating within each round, with the memory read bandwidth probed around every round.
The switch covers bf16, int8, int4 and NF4; Q4_0 walks 2 rows side by side either way and Q8_0
one row at a time (ggml_rows.h's two blocks per instruction, since the run committed in
row_walk.json), so their columns are controls: their ratios are the run's noise.

    python bench/bench_row_walk.py [--rounds 7] [--formats bf16,int8,q8_0,int4-g32,nf4,q4_0]

Writes bench/results/row_walk.json (row_walk_amd.json on an AMD CPU): per format, each walk's
step tok/s and share of the round's bandwidth (medians and ranges), and the median of the rounds'
ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quant  # noqa: E402  (the model, the formats, the bandwidth probe, the step timer)
from provenance import result_path, write_result  # noqa: E402

from emergence.config import Config  # noqa: E402
from emergence.kernels import gemv_extension  # noqa: E402
from emergence.model import Transformer  # noqa: E402

WALKS = {"side by side": False, "one row": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--formats", default="bf16,int8,q8_0,int4-g32,nf4,q4_0")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=result_path("row_walk"))
    args = parser.parse_args()
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in bench_quant.OURS]
    if unknown:
        parser.error(f"unknown formats {unknown} (known: {', '.join(bench_quant.OURS)})")
    ext = gemv_extension()
    if ext is None:
        print("error: the native kernels are not available on this machine", file=sys.stderr)
        return 1

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    base = Transformer(config).eval()
    tokenizer = bench_quant.synthetic_tokenizer(config.vocab_size)
    prompt = torch.randint(3, config.vocab_size, (128,)).tolist()
    engines = {}
    for name in formats:
        _, _, step, nbytes, fused = bench_quant.our_engine(base, tokenizer, *bench_quant.OURS[name], prompt,
                                                           args.new_tokens)
        if not fused:
            print(f"error: {name} has no fused native decode here", file=sys.stderr)
            return 1
        engines[name] = (step, nbytes)
    chosen = ext.one_row_streams()
    tok_s = {(name, walk): [] for name in formats for walk in WALKS}
    probes = [bench_quant.measure_bandwidth()]
    try:
        for name, (step, _) in engines.items():  # warm-up
            step(4)
        for r in range(args.rounds):
            order = list(WALKS) if r % 2 == 0 else list(WALKS)[::-1]  # which walk goes first alternates
            for name, (step, _) in engines.items():
                for walk in order:
                    ext.set_one_row_streams(WALKS[walk])
                    tok_s[(name, walk)].append((args.new_tokens - 1) / step(args.new_tokens))
            probes.append(bench_quant.measure_bandwidth())
            print(f"  round {r + 1}/{args.rounds} ({max(probes[-2:]):.1f} GB/s): " + ", ".join(
                f"{name} {tok_s[(name, 'side by side')][-1]:.0f} / {tok_s[(name, 'one row')][-1]:.0f}"
                for name in formats), flush=True)
    finally:
        ext.set_one_row_streams(chosen)

    bandwidth = [max(before, after) for before, after in zip(probes, probes[1:])]
    result = {"rounds": args.rounds, "new_tokens": args.new_tokens, "bandwidth_rounds_gb_s": bandwidth,
              "chosen_at_load": "one row" if chosen else "side by side", "formats": {}}
    for name, (_, nbytes) in engines.items():
        entry = {"weight_bytes": nbytes}
        for walk in WALKS:
            rates = tok_s[(name, walk)]
            shares = [rate * nbytes / 1e9 / gb_s for rate, gb_s in zip(rates, bandwidth)]
            entry[walk] = {"step_tok_s": statistics.median(rates), "step_tok_s_range": [min(rates), max(rates)],
                           "bandwidth_share": statistics.median(shares)}
        ratios = [b / a for a, b in zip(tok_s[(name, "side by side")], tok_s[(name, "one row")])]
        entry["one_row_vs_side_by_side"] = statistics.median(ratios)
        entry["one_row_vs_side_by_side_range"] = [min(ratios), max(ratios)]
        result["formats"][name] = entry
        print(f"{name}: side by side {entry['side by side']['step_tok_s']:.1f} tok/s "
              f"({100 * entry['side by side']['bandwidth_share']:.0f}% of bandwidth), one row "
              f"{entry['one row']['step_tok_s']:.1f} ({100 * entry['one row']['bandwidth_share']:.0f}%): "
              f"{entry['one_row_vs_side_by_side']:.3f}x", flush=True)
    write_result(Path(args.out), result, "bench/bench_row_walk.py", sys.argv[1:], torch.get_num_threads())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
