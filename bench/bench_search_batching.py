"""Search's batching: N samples of one prompt against one sample, emergence-6m on the CPU.

The N samples of a prompt are forks of its row in one decode batch (search/policy.py's
LocalPolicy): the prompt is prefilled once, its KV blocks are shared, and each step decodes
the N rows together through the native batched step (decode.cpp). Issue 19's target: N = 16
samples cost at most 3x the wall time of one sample.

Workload: a generated 4-step word problem in the search prompt template (search/prompt.py),
temperature 0.8, every sample running exactly --new-tokens tokens (ignore_eos). Timed: one
whole `LocalPolicy.generate` call (prefill and every step), after one untimed warm-up of each;
the --reps rounds interleave the workloads (one sample, N shared, N unshared), as this
machine's speed drifts, and the ratio is the median of the rounds' own ratios (best and median
times beside it). For reference, the same N samples without sharing: N copies of the prompt as
N prompts of one sample each (each prefilled, no forks).

    python bench/bench_search_batching.py                          # the full benchmark
    python bench/bench_search_batching.py --new-tokens 16 --reps 1 # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, result_path, write_result  # noqa: E402

import emergence  # noqa: E402
from emergence.problems import generate_problems  # noqa: E402
from emergence.search import LocalPolicy, format_prompt  # noqa: E402

TARGET = 3.0


def timed(fns: list, reps: int) -> list[list[float]]:
    """Each of fns timed `reps` times, the rounds interleaving them, after one warm-up call of each
    (kernels built and loaded, caches hot)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn()
            t.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="samples of the prompt (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per sample (default %(default)s)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default="emergence-6m")
    parser.add_argument("--out", default=str(ROOT / result_path("search_batching")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = emergence.load(args.model, device="cpu")
    policy = LocalPolicy(lm, seed=0)
    prompt = format_prompt(generate_problems(1, "4", seed=0)[0]["question"])
    prompt_tokens = len(lm.tokenizer.encode(prompt))
    stats = {}

    def run(prompts, n):
        def go():
            gens = policy.generate(prompts, n, temperature=0.8, max_tokens=args.new_tokens, ignore_eos=True)
            assert all(s.tokens == args.new_tokens for g in gens for s in g.samples)
            stats[(len(prompts), n)] = dict(policy.last_stats)
        return go

    one, shared, unshared = timed([run([prompt], 1), run([prompt], args.n), run([prompt] * args.n, 1)], args.reps)
    backend = stats[(1, args.n)]["backend"]
    ratio = statistics.median(s / o for s, o in zip(shared, one))  # the median of the rounds' ratios
    result = {
        "date": datetime.date.today().isoformat(), "model": args.model, "backend": backend, "n": args.n,
        "new_tokens": args.new_tokens, "prompt_tokens": prompt_tokens, "reps": args.reps,
        "one_sample_s": {"best": min(one), "median": statistics.median(one)},
        "n_samples_shared_s": {"best": min(shared), "median": statistics.median(shared)},
        "n_prompts_unshared_s": {"best": min(unshared), "median": statistics.median(unshared)},
        "ratio_n_over_one": ratio, "ratio_range": [min(s / o for s, o in zip(shared, one)),
                                                   max(s / o for s, o in zip(shared, one))],
        "ratio_unshared": statistics.median(u / o for u, o in zip(unshared, one)),
        "target_ratio": TARGET, "target_met": ratio <= TARGET,
        "shared_stats": {k: v for k, v in stats[(1, args.n)].items() if k != "prompt_block_refs"},
    }
    print(f"{args.model} ({backend} step, {torch.get_num_threads()} threads), prompt {prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens per sample:")
    print(f"  1 sample            {min(one) * 1e3:8.1f} ms (median {statistics.median(one) * 1e3:.1f})")
    print(f"  {args.n} samples, shared {min(shared) * 1e3:8.1f} ms (median {statistics.median(shared) * 1e3:.1f})"
          f"  = {ratio:.2f}x one sample, the median of the rounds' ratios (target <= {TARGET:g}x: "
          f"{'met' if ratio <= TARGET else 'NOT met'})")
    print(f"  {args.n} prompts, unshared {min(unshared) * 1e3:6.1f} ms (median "
          f"{statistics.median(unshared) * 1e3:.1f})")
    out = Path(args.out)
    write_result(out, result, "bench/bench_search_batching.py", sys.argv[1:], torch.get_num_threads())
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
