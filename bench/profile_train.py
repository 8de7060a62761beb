"""Where a training step's time goes: emergence's train() against the nanoGPT loop, kernel by kernel.

The companion of bench_train.py for when a ratio there falls short. Both loops train the same
nanoGPT-size model (6 x 6 x 384 GPT-2, context 256, vocab 50,304 on CUDA; a small context and
vocabulary on the CPU) under torch.profiler, which an optimizer-step hook advances once per
training step: a few steps are skipped, a few warm up, and only the next ACTIVE steps are
recorded, so set-up, the first compile and the final save stay out of the figures. The table
gives, per step and per kernel (CUDA) or operator (CPU), the calls and self time of each loop,
sorted by the difference: the rows at the top are where one loop does work the other does not.

    python bench/profile_train.py [--device cuda] [--batch 64] [--rows 45]

This is how the slice-backward buffers in attention were found (README, Training throughput).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402  (the nanoGPT loop and the shard writer)

from emergence.config import Config  # noqa: E402
from emergence.train.trainer import TrainConfig, train  # noqa: E402

SKIP, WARMUP, ACTIVE = 5, 3, 10  # profiler schedule, in training steps


def per_step(prof, device: str) -> dict[str, tuple[float, float]]:
    """name -> (calls, self microseconds) per recorded step: CUDA kernels, or CPU operators."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in prof.key_averages():
        t = e.self_device_time_total if device == "cuda" else e.self_cpu_time_total
        if t > 0 and (device != "cuda" or not e.key.startswith("aten::")):
            out[e.key][0] += e.count / ACTIVE
            out[e.key][1] += t / ACTIVE
    return {k: (v[0], v[1]) for k, v in out.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=45, help="table rows")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    vocab, context = (50304, 256) if gpu else (512, 64)
    config = Config(family="gpt2", norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True,
                    n_layer=6, n_head=6, n_embd=384, block_size=context, vocab_size=vocab)
    # what NanoGPTEngine reads from bench_train's command line
    args.context, args.dtype = context, "bf16" if gpu else "fp32"
    tokens = bt.token_stream("random", vocab, 1 << 20)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    current: dict[str, object] = {"prof": None}
    register_optimizer_step_post_hook(lambda *_: current["prof"] is not None and current["prof"].step())
    steps = SKIP + WARMUP + ACTIVE + 2

    def profiled(run) -> dict[str, tuple[float, float]]:
        with profile(activities=activities, schedule=schedule(wait=SKIP, warmup=WARMUP, active=ACTIVE, repeat=1)) as p:
            current["prof"] = p
            run()
            current["prof"] = None
        return per_step(p, args.device)

    with tempfile.TemporaryDirectory(prefix="profile_train-") as tmp:
        work = Path(tmp)
        bt.write_shards(work / "shards", tokens, vocab)
        tc = TrainConfig(data=str(work / "shards"), out=str(work / "run"), context=context, batch_size=args.batch,
                         max_steps=steps, lr=bt.LR, min_lr=bt.LR / 10, warmup_steps=0, schedule="constant",
                         weight_decay=bt.WEIGHT_DECAY, grad_clip=bt.GRAD_CLIP, dtype=args.dtype, compile=False,
                         eval_every=0, eval_batches=1, sample_every=0, sample_tokens=1, checkpoint_every=0,
                         log_every=1000, seed=bt.SEED, device=args.device, progress=False)
        with contextlib.redirect_stdout(io.StringIO()):
            ours = profiled(lambda: train(config, tc))
        nano = bt.NanoGPTEngine(config, tokens.pin_memory() if gpu else tokens, args, torch.device(args.device),
                                compile=False)
        theirs = profiled(lambda: nano.steps(steps))

    total = lambda d: sum(t for _, t in d.values()) / 1e3  # noqa: E731
    what = "device" if gpu else "CPU"
    print(f"{what} self time per step, batch {args.batch}: emergence {total(ours):.2f} ms, "
          f"nanoGPT {total(theirs):.2f} ms")
    names = sorted(set(ours) | set(theirs), key=lambda k: -abs(ours.get(k, (0, 0))[1] - theirs.get(k, (0, 0))[1]))
    print(f"| {'kernel' if gpu else 'operator'} | emergence calls | emergence us | nanoGPT calls | nanoGPT us |")
    print("|---|---|---|---|---|")
    for name in names[:args.rows]:
        (oc, ot), (nc, nt) = ours.get(name, (0, 0)), theirs.get(name, (0, 0))
        print(f"| {name[:90]} | {oc:.1f} | {ot:.1f} | {nc:.1f} | {nt:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
