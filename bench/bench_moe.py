"""Mixture-of-experts dispatch speed: forward + backward, CPU fp32, same run.

    .venv/bin/python bench/bench_moe.py                    # writes bench/results/moe_dispatch.json (_amd on AMD)
    .venv/bin/python bench/bench_moe.py --smoke --out /tmp/moe.json

Three models on the same tokens (batch x context), each timed over forward + backward of the
next-token loss, alternating rounds, median per model:
- emergence's Mixtral-shaped model (8 experts, top-2; model.MoE groups the tokens by expert);
- transformers' MixtralForCausalLM with the same weights, as from_pretrained gives it (its
  experts through torch's grouped_mm, transformers' default where torch has one): target
  emergence >= 3x its tokens/s;
- the same with experts_implementation="eager" (its sparse block loops over the experts hit,
  indexing their tokens, as transformers did before grouped_mm);
- emergence's dense model with the same active parameters (one MLP of twice the expert width):
  target MoE >= 0.6x its tokens/s (a mixture's overhead: routing, gathering, scattering).

The same four are also timed on their first layer's feed-forward block alone (emergence's
model.MoE, transformers' MixtralSparseMoeBlock both ways, the dense MLP), forward + backward on
the same random hidden states with the same upstream gradient: the dispatch without the
attention, norms and head that the whole step shares with it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from emergence.config import Config  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.weights.hf import load_hf, save_hf  # noqa: E402
from provenance import commit, machine, result_path  # noqa: E402

RESULTS = ROOT / result_path("moe_dispatch")  # moe_dispatch_amd.json on an AMD CPU
SHAPES = dict(vocab_size=4096, block_size=256, n_layer=4, n_head=8, n_kv_head=4, n_embd=512, intermediate_size=1024)


def step_time(model: torch.nn.Module, ids: torch.Tensor, hf: bool) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    logits = model(ids).logits if hf else model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return time.perf_counter() - start


def block_time(block: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one forward + backward of a feed-forward block on hidden states x (B, T, D),
    grad the gradient of its output (its input's and weights' gradients computed)."""
    x = x.detach().requires_grad_()
    block.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = block(x)
    (out[0] if isinstance(out, tuple) else out).backward(grad)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small shapes, 2 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import tempfile

    import transformers as tf

    shapes = dict(SHAPES, n_layer=2, n_embd=128, intermediate_size=256, n_head=4, n_kv_head=2) if args.smoke else SHAPES
    batch, context = (2, 64) if args.smoke else (8, 256)
    rounds = 2 if args.smoke else args.rounds
    torch.manual_seed(0)
    moe = Transformer(Config(family="mixtral", n_experts=8, experts_per_token=2, **shapes)).train()
    dense = Transformer(Config(family="llama", **dict(shapes, intermediate_size=2 * shapes["intermediate_size"]))).train()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(moe, tmp)
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
        hf_eager = tf.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                           experts_implementation="eager").train()
        same, _ = load_hf(tmp)
    ids = torch.randint(0, shapes["vocab_size"], (batch, context), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the same function: equal logits
        diff = max((same(ids) - m(ids).logits).abs().max().item() for m in (hf, hf_eager))
    models = {"emergence MoE": (moe, False), "transformers Mixtral": (hf, True),
              "transformers Mixtral, eager experts": (hf_eager, True), "emergence dense": (dense, False)}
    blocks = {name: (model.model if is_hf else model).layers[0].mlp for name, (model, is_hf) in models.items()}
    hidden = torch.randn(batch, context, shapes["n_embd"], generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(batch, context, shapes["n_embd"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the same block: equal outputs
        block_diff = (blocks["emergence MoE"](hidden) - blocks["transformers Mixtral"](hidden)).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in models}
    block_times: dict[str, list[float]] = {name: [] for name in models}
    for name, (model, is_hf) in models.items():  # warm-up
        step_time(model, ids, is_hf), block_time(blocks[name], hidden, upstream)
    for r in range(rounds):
        for name, (model, is_hf) in models.items():
            times[name].append(step_time(model, ids, is_hf))
            block_times[name].append(block_time(blocks[name], hidden, upstream))
            print(f"round {r + 1}/{rounds} {name}: {batch * context / times[name][-1]:,.0f} tok/s, its block alone "
                  f"{batch * context / block_times[name][-1]:,.0f} tok/s", flush=True)
    tps = {name: batch * context / statistics.median(t) for name, t in times.items()}
    block_tps = {name: batch * context / statistics.median(t) for name, t in block_times.items()}
    result = dict(
        date=datetime.date.today().isoformat(), commit=commit(), machine=machine(), command=" ".join(sys.argv),
        threads=torch.get_num_threads(), shapes=shapes, experts=8, experts_per_token=2, batch=batch, context=context,
        logits_max_abs_diff_vs_transformers=diff, tokens_per_s=tps,
        transformers_experts_implementation=hf.config._experts_implementation,
        moe_vs_transformers=tps["emergence MoE"] / tps["transformers Mixtral"],
        moe_vs_transformers_eager_experts=tps["emergence MoE"] / tps["transformers Mixtral, eager experts"],
        moe_vs_dense_same_active=tps["emergence MoE"] / tps["emergence dense"],
        block_max_abs_diff_vs_transformers=block_diff, block_tokens_per_s=block_tps,
        block_moe_vs_transformers=block_tps["emergence MoE"] / block_tps["transformers Mixtral"],
        block_moe_vs_transformers_eager_experts=(block_tps["emergence MoE"]
                                                 / block_tps["transformers Mixtral, eager experts"]),
        block_moe_vs_dense_same_active=block_tps["emergence MoE"] / block_tps["emergence dense"],
        targets={"moe_vs_transformers": 3.0, "moe_vs_dense_same_active": 0.6},
        total_parameters=moe.config.num_parameters(), active_parameters=moe.config.num_parameters(active=True),
        dense_parameters=dense.config.num_parameters())
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("tokens_per_s", "transformers_experts_implementation", "moe_vs_transformers",
                                              "moe_vs_transformers_eager_experts", "moe_vs_dense_same_active",
                                              "block_tokens_per_s", "block_moe_vs_transformers",
                                              "block_moe_vs_transformers_eager_experts",
                                              "block_moe_vs_dense_same_active")}))


if __name__ == "__main__":
    main()
