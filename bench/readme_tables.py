"""The README's speed tables, rendered from the committed results in bench/results/.

Each entry of `TABLES` names a result file and the function that renders its README table (or
line); the benchmark scripts write those files (with their commit, command and machine). `make
bench` runs the benchmarks, then this script, which prints every table; `--check` exits non-zero
naming any table the README does not hold as rendered (tests/test_readme_tables.py runs it), so
a figure in those tables can only come from a committed result.

    python bench/readme_tables.py [--check]
    python bench/readme_tables.py --machine {amd,xeon,this} [--write]   # one machine's tables

The README's tables quote two machines (an Intel Xeon's results are STEM.json, an AMD EPYC's
STEM_amd.json: provenance.result_path). `--machine` renders every table once from one machine's
results, with the further results MORE names, and `--write` keeps it as docs/bench_amd.md or
docs/bench_xeon.md (the test checks the committed page is as rendered).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))


def _rate(value: float) -> str:
    """Tokens/s as the README writes them: thousands separated, one decimal below 1,000."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def render_paged(result: dict) -> str:
    """bench_paged.py: greedy generate() over the paged cache against the contiguous one."""
    rows = ["| model | rows | contiguous tok/s | paged tok/s | paged / contiguous (per-round range) |",
            "|---|---|---|---|---|"]
    for r in result["results"]:
        model = f"{r['model']} shapes" if r["model"] == "smollm2-135m" else r["model"]
        rows.append(f"| {model} | {r['rows']} | {_rate(r['contiguous_tok_s'])} | {_rate(r['paged_tok_s'])} | "
                    f"{r['ratio']:.2f}x ({min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}) |")
    return "\n".join(rows)


def render_serve(results: list[dict]) -> str:
    """bench_serve.py, one result per model: continuous batching against one request at a time
    (TTFTs: medians over the rounds of each round's median and 90th percentile)."""
    rows = ["| model | sequential tok/s | batched tok/s | ratio (per-round range) | TTFT median / p90, batched | "
            "TTFT if the 64 requests queued sequentially |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r["median"]

        def over_rounds(mode: str, key: str, stat: str) -> float:
            return statistics.median(round_[mode][key][stat] for round_ in r["rounds"])

        lo, hi = m["ratio_range"]
        rows.append(f"| {r['model']} | {m['sequential_tok_s']:,.0f} | {m['batched_tok_s']:,.0f} | "
                    f"{m['ratio']:.2f}x ({lo:.2f}-{hi:.2f}x) | {1000 * over_rounds('batched', 'ttft_s', 'median'):.0f} "
                    f"/ {1000 * over_rounds('batched', 'ttft_s', 'p90'):.0f} ms | "
                    f"{over_rounds('sequential', 'ttft_if_all_queued_s', 'median'):.1f} / "
                    f"{over_rounds('sequential', 'ttft_if_all_queued_s', 'p90'):.1f} s |")
    return "\n".join(rows)


def first_request(m: dict) -> str:
    """A fresh server's first streamed request (and emergence's without its warm-up), where measured."""
    if "first_ttft" not in m:
        return "-"
    cold = m.get("first_ttft_no_warmup")
    return f"{1000 * m['first_ttft']:.1f}" + ("" if cold is None else f" ({1000 * cold:.1f} without the warm-up)")


def render_serve_peers(result: dict) -> str:
    """bench_serve_peers.py: emergence, llama-server and llama-cpp-python's server on one GGUF."""
    rows = ["| model | engine | tok/s | vs llama-server | streamed tok/s | latency p50 / p99 (s) | TTFT p50 / p99 (ms) "
            "| burst of 16: TTFT p50 / p99 (ms) | first request: TTFT (ms) |", "|---|---|---|---|---|---|---|---|---|"]
    for model, r in result["models"].items():
        name = f"{model} shapes" if model == "smollm2-135m" else model
        peer = r["medians"]["llama-server"]["tok_s"]
        for engine, m in r["medians"].items():
            rows.append(f"| {name} | {engine} | {m['tok_s']:,.0f} | {m['tok_s'] / peer:.2f}x | "
                        f"{m['stream_tok_s']:,.0f} | {m['latency_p50']:.2f} / {m['latency_p99']:.2f} | "
                        f"{1000 * m['ttft_p50']:.0f} / {1000 * m['ttft_p99']:.0f} | "
                        f"{1000 * m['burst_ttft_p50']:.0f} / {1000 * m['burst_ttft_p99']:.0f} | {first_request(m)} |")
    return "\n".join(rows)


def render_soak(result: dict) -> str:
    """soak_serve.py: what a 5-minute soak of mixed clients did to the server."""
    c = result["counts"]
    first, last, _ = result["rss_mib_first_last_max"]
    left = "0, 0, 0" if result["checks"]["nothing left active or waiting"] and result["checks"]["no KV block held"] \
        else "some"
    unlike = sum("output" in f for f in result["failures"])
    return "\n".join([
        "| requests | whole | streamed | malformed (each its 4xx) | abandoned streams | tokens generated | 5xx | "
        "answers unlike their single-user output | rows, requests, KV blocks left | RSS growth, second half |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {sum(c.values()):,} ({result['requests_per_second']:.0f}/s) | {c['completed']:,} | {c['streamed']:,} | "
        f"{c['malformed']:,} | {c['disconnected']:,} | {result['generated_tokens']:,.0f} | {result['server_5xx']} | "
        f"{unlike} | {left} | {100 * result['rss_growth_second_half']:.1f}% ({first:.0f} MiB at the start, "
        f"{last:.0f} at the end) |"])


def render_beam(result: dict) -> str:
    """bench_beam.py: T5 greedy and beam search, and decoder-only beam search, against transformers."""
    names = {("t5-small", 1): "t5-small, greedy", ("t5-small", 4): "t5-small, 4 beams",
             ("smollm2-135m", 4): "smollm2-135m shapes, 4 beams"}
    rows = ["| workload | transformers | emergence | ratio | target | decoder weights read |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in result["results"]:
        s = r["seconds"]
        met = ">= 2x" if r["ratio"] >= 2 else ">= 2x: **missed**"
        rows.append(f"| {names[(r['workload'], r['num_beams'])]} | {s['transformers']:.2f} s | {s['emergence']:.2f} s "
                    f"| {r['ratio']:.2f}x | {met} | {r['decoder_read_gbs']['emergence']:.1f} GB/s |")
    return "\n".join(rows)


def _missed(ratio: float, target: float, below: bool = False) -> str:
    met = ratio <= target if below else ratio >= target
    return f"{'<=' if below else '>='} {target:g}x" + ("" if met else ": **missed**")


def render_instruction_tune(result: dict) -> str:
    """instruction_tune.py: emergence-6m's held-out graded instructions followed, per configuration."""
    names = {"full": "full", "lora-r4": "LoRA r=4", "lora-r8": "LoRA r=8", "lora-r16": "LoRA r=16",
             "qlora-nf4-r8": "QLoRA-nf4 r=8"}
    kinds = ("title", "retell", "character", "words")
    best = max(c["after"]["overall"] for c in result["configs"])
    rows = [f"| configuration | trainable | title | retell | main character | story with words | overall (before: "
            f"{result['base']['overall']:.0%}) | tokens/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["configs"]:
        after = c["after"]
        overall = f"{after['overall']:.0%}"
        trainable = f"{c['trainable'] / 1e6:.2f}M" if c["trainable"] >= 1e6 else f"{c['trainable'] / 1e3:.0f}K"
        rows.append(f"| {names.get(c['name'], c['name'])} | {trainable} ({c['trainable_fraction']:.1%}) | "
                    + " | ".join(f"{after['by_kind'][k]:.0%}" for k in kinds)
                    + f" | {'**' + overall + '**' if after['overall'] == best else overall} | {c['tokens_per_s']:,.0f} |")
    return "\n".join(rows)


def render_finetune(result: dict) -> str:
    """bench_finetune.py: LoRA and full fine-tuning steps against peft + transformers."""
    t, ratios = result["speed"]["tok_s"], result["speed"]["ratios"]  # ratios: medians of same-round ratios
    lora, full = ratios["lora_emergence_vs_peft"], ratios["full_emergence_vs_transformers"]
    return "\n".join([
        "| | emergence | peft + transformers | ratio | target |", "| --- | --- | --- | --- | --- |",
        f"| LoRA r={result['lora']['r']}, all projections, tokens/s | {t['emergence-lora']:.0f} | {t['peft-lora']:.0f} | "
        f"{lora:.2f}x | {_missed(lora, 1.5)} |",
        f"| full fine-tuning, tokens/s | {t['emergence-full']:.0f} | {t['transformers-full']:.0f} | {full:.2f}x | "
        "same loop as pretraining |"])


def render_finetune_memory(result: dict) -> str:
    """bench_finetune.py's memory runs: peak RSS of a training step, what the model and the saved
    activations take, for LoRA on an fp32 base, QLoRA on an nf4 base and full fine-tuning, and
    LoRA and QLoRA with activation checkpointing; ratios to the plain fp32-LoRA peak."""
    c, r = result["memory"]["configs"], result["memory"]["ratios"]
    names = [("lora-fp32", "LoRA, fp32 base"), ("qlora-nf4", "QLoRA, nf4 base"), ("full", "full"),
             ("lora-fp32-ckpt", "LoRA, fp32, checkpointed"), ("qlora-nf4-ckpt", "QLoRA, nf4, checkpointed")]
    names = [(k, title) for k, title in names if k in c]

    def peak(k: str) -> str:
        if k == "lora-fp32":
            return f"{c[k]['peak_rss_mib']:,.0f}"
        ratio = r[f"{k}_vs_lora_fp32_peak"]
        target = f"; target {_missed(ratio, 0.45, below=True)}" if k.startswith("qlora") else ""
        return f"{c[k]['peak_rss_mib']:,.0f} ({ratio:.2f}x{target})"

    return "\n".join([
        "| peak RSS (MiB) | " + " | ".join(title for _, title in names) + " |",
        "| --- |" + " --- |" * len(names),
        "| peak | " + " | ".join(peak(k) for k, _ in names) + " |",
        "| model in memory | " + " | ".join(f"{c[k]['model_mib']:,.0f}" for k, _ in names) + " |",
        "| activations saved for the backward | " + " | ".join(f"{c[k]['saved_activations_mib']:,.0f}"
                                                           for k, _ in names) + " |"])


def render_moe(dispatch: dict, decode: dict | None = None) -> str:
    """bench_moe.py (a training step) and bench_moe_decode.py (batch-1 decoding) against their
    peers; the training rows alone without a decoding run."""
    s, t = dispatch["shapes"], dispatch["tokens_per_s"]
    rows = ["| workload (`bench/bench_moe.py`, `bench/bench_moe_decode.py`; CPU, 2 threads, same run) | emergence | "
            "peer | ratio | target |", "| --- | --- | --- | --- | --- |",
            f"| training step (forward + backward), {dispatch['experts']} experts top-{dispatch['experts_per_token']}, "
            f"{s['n_layer']} layers x {s['n_embd']}, {dispatch['batch'] * dispatch['context']:,} tokens, fp32 | "
            f"{t['emergence MoE']:,.0f} tok/s | transformers' Mixtral, same weights"
            f"{' (grouped_mm experts)' if dispatch.get('transformers_experts_implementation') == 'grouped_mm' else ''}: "
            f"{t['transformers Mixtral']:,.0f} tok/s "
            f"| {dispatch['moe_vs_transformers']:.2f}x | {_missed(dispatch['moe_vs_transformers'], 3)} |",
            *([f"| same, against transformers' eager experts (a loop over the experts hit) | {t['emergence MoE']:,.0f} "
               f"tok/s | {t['transformers Mixtral, eager experts']:,.0f} tok/s | "
               f"{dispatch['moe_vs_transformers_eager_experts']:.2f}x | |"]
              if "moe_vs_transformers_eager_experts" in dispatch else []),
            f"| same, against a dense model of the same active size | {t['emergence MoE']:,.0f} tok/s | emergence dense: "
            f"{t['emergence dense']:,.0f} tok/s | {dispatch['moe_vs_dense_same_active']:.2f}x | "
            f"{_missed(dispatch['moe_vs_dense_same_active'], 0.6)} |"]
    if "block_tokens_per_s" in dispatch:  # the feed-forward block alone (layer 0's), forward + backward
        b = dispatch["block_tokens_per_s"]
        rows += [f"| layer 0's feed-forward block alone, forward + backward on the same hidden states | "
                 f"{b['emergence MoE']:,.0f} tok/s | MixtralSparseMoeBlock: {b['transformers Mixtral']:,.0f} tok/s | "
                 f"{dispatch['block_moe_vs_transformers']:.2f}x | {_missed(dispatch['block_moe_vs_transformers'], 3)} |",
                 f"| same, against its eager experts | {b['emergence MoE']:,.0f} tok/s | "
                 f"{b['transformers Mixtral, eager experts']:,.0f} tok/s | "
                 f"{dispatch['block_moe_vs_transformers_eager_experts']:.2f}x | |",
                 f"| same, against the dense model's MLP | {b['emergence MoE']:,.0f} tok/s | {b['emergence dense']:,.0f} "
                 f"tok/s | {dispatch['block_moe_vs_dense_same_active']:.2f}x | "
                 f"{_missed(dispatch['block_moe_vs_dense_same_active'], 0.6)} |"]
    if decode is None:
        return "\n".join(rows)
    d = decode["shapes"]
    order = {"fp32": 0, "bf16": 1, "q8_0": 2, "q4_0": 3}
    for i, r in enumerate(sorted(decode["rows"], key=lambda r: order[r["emergence"]])):
        what = (f"decoding, batch 1, {d['n_experts']} experts top-{d['experts_per_token']}, "
                f"{decode['total_parameters'] / 1e6:.0f}M parameters ({decode['active_parameters'] / 1e6:.0f}M active), "
                f"{r['emergence']} vs {r['llama_cpp']}") if i == 0 else f"same, {r['emergence']} vs {r['llama_cpp']}"
        peer = (f"llama-bench: {r['llama_bench_tok_s']:.1f} tok/s ({r['llama_bench_share_of_roofline']:.0%}; "
                f"llama-cpp-python's loop {r['llama_cpp_tok_s']:.1f})" if "llama_bench_tok_s" in r
                else f"llama.cpp: {r['llama_cpp_tok_s']:.1f} tok/s")
        rows.append(f"| {what} | {r['emergence_tok_s']:.1f} tok/s ({r['emergence_share_of_roofline']:.0%} of the "
                    f"roofline) | {peer} | {r['ratio']:.2f}x | {_missed(r['ratio'], decode['target_ratio'])} |")
    return "\n".join(rows)


def render_rollout(result: dict) -> str:
    """bench_rollout.py: G samples per prompt against transformers' generate."""
    rows = ["| G | emergence | transformers | ratio |", "| --- | --- | --- | --- |"]
    for r in result["results"]:
        rows.append(f"| {r['group']} | {r['emergence_tok_s']:,.0f} tok/s | {r['transformers_tok_s']:,.0f} tok/s | "
                    f"{r['speedup']:.2f}x{'' if r['speedup'] >= 3 else ': **missed**'} |")
    return "\n".join(rows)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"


def render_structured(result: dict) -> str:
    """bench_structured.py: constrained decoding against free decoding, per batch size."""
    rows = ["| batch | JSON schema (a schema per row) | regex | free | masks per step |", "| --- | --- | --- | --- | --- |"]
    for batch in sorted({r["batch"] for r in result["results"]}):
        w = {r["workload"]: r for r in result["results"] if r["batch"] == batch}
        masks = sorted(w[k]["mask_ms_per_step"] for k in ("json_schema", "regex"))
        rows.append(f"| {batch} | {w['json_schema']['tok_s']:.1f} tok/s ({w['json_schema']['vs_free']:.2f}x) | "
                    f"{w['regex']['tok_s']:.1f} tok/s ({w['regex']['vs_free']:.2f}x) | {w['free']['tok_s']:.1f} tok/s | "
                    f"{_ms(masks[0])}-{_ms(masks[1])} ms |")
    return "\n".join(rows)


def _imported(module: str, name: str) -> Callable[[dict], str]:
    def render(result: dict) -> str:
        return getattr(__import__(module), name)(result)

    return render


def _load(name: str):
    return json.loads((RESULTS / name).read_text())


# (README section, result files, renderer): the README's speed tables, in the order they appear.
TABLES: list[tuple[str, tuple[str, ...], Callable]] = [
    ("Fine-tuning: instruction tuning", ("instruction_tune.json",), render_instruction_tune),
    ("Fine-tuning: against the peers", ("finetune.json",), render_finetune),
    ("Fine-tuning: against the peers on an AMD EPYC", ("finetune_amd.json",), render_finetune),
    ("Fine-tuning: memory", ("finetune.json",), render_finetune_memory),
    ("T5 and beam search", ("beam.json",), render_beam),
    ("Mixture of experts", ("moe_dispatch.json", "moe_decode.json"), render_moe),
    ("Mixture of experts: on an AMD EPYC", ("moe_dispatch_amd.json", "moe_decode_amd.json"), render_moe),
    ("Alignment: rollouts", ("rollout_emergence-6m.json",), render_rollout),
    ("Structured output", ("structured_amd.json",), render_structured),
    ("Speed: against transformers", ("decode.json",), _imported("bench_decode", "render_table")),
    ("Speed: against llama.cpp", ("quant.json",), _imported("bench_quant", "render_table")),
    ("Speed: against llama.cpp on an AMD EPYC", ("quant_amd.json",), _imported("bench_quant", "render_table")),
    ("Speed: oneDNN's products on the EPYC", ("onednn_amd.json",), _imported("bench_onednn", "render_table")),
    ("Speed: quantized GGUF files", ("gguf_load.json",), _imported("bench_gguf_load", "render_table")),
    ("Speed: quantized GGUF files on an AMD EPYC", ("gguf_load_amd.json",), _imported("bench_gguf_load", "render_table")),
    ("Speed: where the 4-bit time goes", ("qgemv.json",), _imported("bench_qgemv", "render_table")),
    ("The paged KV cache costs nothing", ("paged_amd.json",), render_paged),
    ("Serving throughput", ("serve_emergence-6m.json", "serve.json"), lambda *rs: render_serve(list(rs))),
    ("Serving against the peers", ("serve_peers.json",), render_serve_peers),
    ("Prefix caching", ("prefix_cache.json",), _imported("bench_prefix", "render_line")),
    ("Speculative decoding", ("speculative.json",), _imported("bench_speculative", "render_table")),
    ("The server under sustained load", ("soak.json",), render_soak),
]


def render_batched(result: dict) -> str:
    """bench_batched.py: the batched step against one row, and native prefill against the eager forward."""
    s, g = result["step"], result["gemm"]
    rows = [f"16-row GEMM over {g['matrices']} matrices: native {g['native_ms']:.2f} ms "
            f"({g['native_gflop_s']:.0f} GFLOP/s), torch.mm {g['torch_mm_ms']:.2f} ms.", "",
            "| step | 1 row (ms) | 16 rows (ms) | 16 rows / 1 row |", "|---|---|---|---|"]
    for name, key in (("fp32", ""), ("q8_0", "q8_0_"), ("q4_0", "q4_0_")):
        one, many = s[f"{key}native_1_row_ms"], s[f"{key}native_ms"]
        rows.append(f"| {name} | {one:.2f} | {many:.2f} | {many / one:.2f}x |")
    rows += ["", "| prefill | tokens | native tok/s | eager tok/s | native / eager |", "|---|---|---|---|---|"]
    for r in result["prefill"]:
        rows.append(f"| {r['dtype']} | {r['tokens']} | {_rate(r['native_tok_s'])} | {_rate(r['eager_tok_s'])} | "
                    f"{r['native_tok_s'] / r['eager_tok_s']:.2f}x |")
    return "\n".join(rows)


def render_row_walk(result: dict) -> str:
    """bench_row_walk.py: one row at a time against two side by side, per format."""
    rows = [f"Chosen at load: {result['chosen_at_load']}; read bandwidth over the rounds "
            f"{min(result['bandwidth_rounds_gb_s']):.0f}-{max(result['bandwidth_rounds_gb_s']):.0f} GB/s.", "",
            "| format | one row tok/s (share of bandwidth) | side by side tok/s (share) | one row / side by side |",
            "|---|---|---|---|"]
    for name, f in result["formats"].items():
        one, two = f["one row"], f["side by side"]
        lo, hi = f["one_row_vs_side_by_side_range"]
        rows.append(f"| {name} | {one['step_tok_s']:.1f} ({100 * one['bandwidth_share']:.0f}%) | "
                    f"{two['step_tok_s']:.1f} ({100 * two['bandwidth_share']:.0f}%) | "
                    f"{f['one_row_vs_side_by_side']:.2f}x ({lo:.2f}-{hi:.2f}) |")
    return "\n".join(rows)


def render_train(result: dict) -> str:
    """bench_train.py: pretraining throughput against nanoGPT, same settings."""
    rows = [f"{result['parameters'] / 1e6:.1f}M parameters, batch {result['batch']} x {result['context']}, "
            f"{result['dtype']}, {result['threads']} threads; peak {result['peak_note']}.", "",
            "| engine | tok/s (range) | vs nanoGPT | MFU |", "|---|---|---|---|"]
    for name, e in result["engines"].items():
        lo, hi = e["range"]
        rows.append(f"| {name} | {e['tokens_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {e['vs_nanogpt']:.2f}x | "
                    f"{100 * e['mfu']:.0f}% |")
    return "\n".join(rows)


def render_search_batching(result: dict) -> str:
    """bench_search_batching.py: N samples of one prompt in one batch, against one sample."""
    lo, hi = result["ratio_range"]
    return (f"{result['model']}, {result['n']} samples of a {result['prompt_tokens']}-token prompt, "
            f"{result['new_tokens']} tokens each: {result['n']} shared samples take "
            f"{result['ratio_n_over_one']:.2f}x one sample ({lo:.2f}-{hi:.2f}x over {result['reps']} rounds; "
            f"{_missed(result['ratio_n_over_one'], result['target_ratio'], below=True)}), "
            f"{result['n']} unshared prompts {result['ratio_unshared']:.2f}x.")


def render_ternary_decode(result: dict) -> str:
    """bench_ternary_decode.py: ternary decode against llama-bench's TQ1_0 and TQ2_0."""
    rows = ["| shapes | emergence | tok/s | llama-bench | tok/s | ratio | bytes read per weight (emergence / llama.cpp) |",
            "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rows.append(f"| {r['shapes']} | {r['emergence']} | {r['emergence_tok_s']:.1f} | {r['llama_cpp']} | "
                    f"{r['llama_bench_tok_s']:.1f} | {r['ratio']:.2f}x | {r['emergence_bytes_per_weight']:.2f} / "
                    f"{r['llama_cpp_bytes_per_weight']:.2f} |")
    return "\n".join(rows)


# Results `make bench` writes whose figures the README gives in prose: machine_page's further tables.
MORE: list[tuple[str, tuple[str, ...], Callable]] = [
    ("Batched steps and native prefill", ("batched.json",), render_batched),
    ("Speed: one row at a time or two side by side", ("row_walk.json",), render_row_walk),
    ("Pretraining on the CPU", ("train_cpu.json",), render_train),
    ("Search: samples in one batch", ("search_batching.json",), render_search_batching),
    ("Ternary decode against llama.cpp", ("ternary_decode.json",), render_ternary_decode),
]


def rendered() -> list[tuple[str, tuple[str, ...], str]]:
    """(section, result files, rendered text) of every table."""
    return [(section, files, render(*(_load(f) for f in files))) for section, files, render in TABLES]


def _measured_on(name: str, amd: bool) -> bool:
    """Whether result NAME records that machine's CPU (a demonstration's result has one name on both)."""
    if not (RESULTS / name).is_file():
        return False
    r = _load(name)
    cpu = str((r[0] if isinstance(r, list) and r else r).get("machine", ""))
    return ("AMD" in cpu) == amd and ("AMD" in cpu or "Intel" in cpu)


def machine_tables(amd: bool) -> list[tuple[str, tuple[str, ...], str | None]]:
    """Every table of TABLES and MORE once, from one machine's results: STEM_amd.json for an AMD
    CPU, STEM.json otherwise (provenance.result_path, what each benchmark writes), or a result of
    one name that records that machine's CPU; the README's tables mix the two machines.
    (section, files, text), text None where this machine has no such result, or one without
    that table's part."""
    out, seen = [], set()
    for section, files, render in TABLES + MORE:
        base = section.replace(": on an AMD EPYC", "").replace(" on an AMD EPYC", "").replace(" on the EPYC", "")
        mine = tuple(f if _measured_on(f, amd) else f"{f.removesuffix('.json').removesuffix('_amd')}"
                     f"{'_amd' if amd else ''}.json" for f in files)
        if base in seen:
            continue
        seen.add(base)
        text = None
        if all((RESULTS / f).is_file() for f in mine):
            try:
                text = render(*(_load(f) for f in mine))
            except KeyError:  # a result measured without this table's part (bench_finetune --skip-memory)
                pass
        out.append((base, mine, text))
    return out


def page_path(amd: bool) -> str:
    return f"docs/bench_{'amd' if amd else 'xeon'}.md"


def machine_page(amd: bool) -> str:
    """The Markdown page of machine_tables: where and when each table was measured."""
    lines = [f"# Every speed table, from the results of {'the AMD EPYC' if amd else 'the Intel Xeon'}",
             "", "Generated by `python bench/readme_tables.py --machine "
             f"{'amd' if amd else 'xeon'} --write` from `bench/results/` (`make bench` writes them; "
             "`tests/test_readme_tables.py` checks that this page is as rendered). The README's tables "
             "quote both machines; here each table is this one machine's.", ""]
    for section, files, text in machine_tables(amd):
        lines.append(f"## {section}\n")
        if text is None:
            lines.append(f"No result on this machine with this table: "
                         f"{', '.join('`bench/results/' + f + '`' for f in files)}.\n")
            continue
        sources = []
        for f in files:
            r = _load(f)
            r = r[0] if isinstance(r, list) else r
            cpu = r.get("machine", {}).get("cpu", "?") if isinstance(r.get("machine"), dict) else r.get("machine")
            sources.append(f"`bench/results/{f}` (commit {str(r.get('commit', '?'))[:7]}, {cpu}, "
                           f"`{r.get('command', '?')}`)")
        lines.append("From " + "; ".join(sources) + ":\n")
        lines.append(text + "\n")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the README lacks a table as rendered")
    parser.add_argument("--machine", choices=("amd", "xeon", "this"),
                        help="print every table once from one machine's results instead (machine_tables)")
    parser.add_argument("--write", action="store_true",
                        help="with --machine: write those tables to docs/bench_amd.md or docs/bench_xeon.md")
    args = parser.parse_args()
    if args.machine:
        from provenance import amd_cpu

        amd = args.machine == "amd" or (args.machine == "this" and amd_cpu())
        page = machine_page(amd)
        print(page)
        if args.write:
            (ROOT / page_path(amd)).write_text(page)
        return 0
    readme = (ROOT / "README.md").read_text()
    missing = []
    for section, files, text in rendered():
        print(f"## {section} ({', '.join('bench/results/' + f for f in files)})\n\n{text}\n")
        if text not in readme:
            missing.append(section)
    if args.check and missing:
        print(f"readme_tables: the README does not hold these tables as rendered: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
