"""The model families against their references, measured: the figures of docs/families.md.

    .venv/bin/python bench/family_parity.py                # measure (about a minute), write both
    .venv/bin/python bench/family_parity.py --report-only  # docs/families.md from the committed JSON

For each tiny random model of tests/test_families.py (every switch of its family active) and
tests/test_moe.py (the mixtures of experts):
- transformers: the max |logit difference| over 3 x 40 tokens (fp32), and whether the greedy
  64 tokens after an 8-token prompt are identical (emergence's native decode against
  transformers' own KV-cached loop);
- the native step against the eager forward: max |logit difference| over 40 tokens decoded one
  by one after a prefill of 5 (fp32);
and for each model of tests/test_gguf_families.py and tests/test_gguf_moe.py, llama.cpp (llama-cpp-python) running
emergence's F32 GGUF export: the max |logit difference| over the 72 positions and whether its
greedy 64 tokens are emergence's. Where llama.cpp's own vocabulary test vectors are at hand
(build/llama.cpp-*/models, the source llama-cpp-python was built from), every vector file is
tokenized too and the agreements counted.

The tests assert the bounds (1e-4, identical, 1e-5, 1e-3); this records the values.
Writes bench/results/families.json and docs/families.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results" / "families.json"
DOC = ROOT / "docs" / "families.md"

# What each family adds to the LLaMA block (the Config switches; config.SWITCH_FAMILIES).
SWITCHES = {
    "qwen3": "qk_norm=head",
    "gemma2": "norm_position=sandwich, mlp=geglu, scale_embeddings, attention_scale, attn_softcap, final_softcap, "
              "sliding_window + global_every=2",
    "gemma3_text": "qk_norm=head, norm_position=sandwich, mlp=geglu, scale_embeddings, attention_scale, "
                   "sliding_window + global_every=6, rope_local_theta",
    "phi3": "fused q/k/v and gate/up in the checkpoint (the layout emergence keeps), sliding_window, rotary_dim",
    "olmo2": "qk_norm=all, norm_position=post",
    "gpt_neox": "norm=layernorm, mlp=gelu_exact, bias, parallel=two-norms, rotary_dim, q/k/v interleaved per head",
    "falcon": "norm=layernorm, mlp=gelu_exact, parallel=shared-norm or two-norms, multi-query or grouped q/k/v",
    "phi": "norm=layernorm, mlp=gelu, bias, parallel=shared-norm, rotary_dim, head_bias",
    "smollm3": "nope_every=4 (every 4th layer without RoPE)",
}


def measure() -> dict:
    import numpy as np
    import torch
    import transformers as tf

    import emergence
    from emergence.weights.gguf_model import save_gguf
    from emergence.weights.hf import load_hf
    from provenance import commit, machine
    import test_gguf_moe
    import test_moe
    from conftest import save_random_hf
    from test_families import CASES, hf_greedy, tiny_configs
    from test_gguf_families import CASES as GGUF_CASES
    from test_gguf_families import PROMPT, TOKENIZER, family_config, our_logits, random_model
    from test_gguf_model import llama_cpp_greedy, llama_cpp_model
    from test_kernels import NATIVE, _steps

    rows, gguf_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # the families' cases, then the mixtures of experts', each seeded as its test seeds it
        cases = [(case, tiny_configs()[case], i) for i, case in enumerate(CASES)]
        cases += [(case, test_moe.tiny_configs()[case], 40 + i) for i, case in enumerate(test_moe.CASES)]
        for case, hf_config, seed in cases:
            folder = Path(tmp) / case
            hf = save_random_hf(hf_config, seed, folder)
            model, config = load_hf(folder)
            ids = torch.randint(3, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
            prompt = [1, 17, 42, 5, 88, 23, 9, 61]
            with torch.no_grad():
                diff = (model(ids) - hf(ids).logits).abs().max().item()
                expected = hf_greedy(hf, prompt, 64)
            lm = emergence.LanguageModel(model, TOKENIZER, config)
            ours = lm.complete(prompt, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids
            steps = ids[0].tolist()
            native = (_steps(model, NATIVE, steps, 5)[0] - _steps(model, "eager", steps, 5)[0]).abs().max().item()
            rows.append(dict(case=case, family=config.family, transformers_max_abs_diff=diff,
                             greedy_64_identical=ours == expected, native_backend=NATIVE,
                             native_vs_eager_max_abs_diff=native))
            print(json.dumps(rows[-1]), flush=True)
        exports = [(case, arch, family_config(case), i) for i, (case, (_, _, arch)) in enumerate(GGUF_CASES.items())]
        exports += [(case, arch, test_gguf_moe.moe_config(case), 20 + i)
                    for i, (case, (_, arch)) in enumerate(test_gguf_moe.CASES.items())]
        for case, arch, model_config, seed in exports:
            model = random_model(model_config, seed=seed)
            path = Path(tmp) / f"{case}.gguf"
            save_gguf(model, TOKENIZER, path, "f32")
            tokens, theirs = llama_cpp_greedy(llama_cpp_model(path, n_ctx=128, n_threads=1), PROMPT, 64)
            ours = emergence.LanguageModel(model, TOKENIZER, model.config).complete(
                PROMPT, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids
            diff = float(np.abs(our_logits(model, PROMPT + tokens) - theirs).max())
            gguf_rows.append(dict(case=case, architecture=arch, llama_cpp_max_abs_diff=diff,
                                  greedy_64_identical=ours == tokens))
            print(json.dumps(gguf_rows[-1]), flush=True)
    return dict(date=datetime.date.today().isoformat(), commit=commit(), machine=machine(),
                command="python bench/family_parity.py", transformers=tf.__version__,
                families=rows, gguf=gguf_rows, vocab_vectors=vocab_vectors())


def vocab_vectors() -> list[dict]:
    """llama.cpp's own test vectors (models/ggml-vocab-*.gguf.inp/.out in its source) through
    emergence's GGUF tokenizer: agreements per file."""
    from emergence.gguf.vocab import tokenizer_from_gguf_metadata
    from test_gguf_vocab import gguf_metadata, read_vectors

    out = []
    for source in sorted((ROOT / "build").glob("llama.cpp-*/models")):
        for path in sorted(source.glob("ggml-vocab-*.gguf")):
            if not Path(str(path) + ".inp").exists():
                continue
            meta = gguf_metadata(path)
            tok = tokenizer_from_gguf_metadata(meta, parse_special=False)
            vectors = read_vectors(path)
            agree = sum(tok.encode(text, add_bos=False) == ids for text, ids in vectors)
            out.append(dict(file=path.name, llama_cpp=source.parent.name, pre=meta.get("tokenizer.ggml.pre"),
                            agree=agree, vectors=len(vectors)))
    return out


def report(results: dict) -> str:
    lines = [
        "# The model families",
        "",
        "Every family is the one `Transformer` of `model.py` with a few `Config` switches "
        "(`config.py`, `SWITCH_FAMILIES`), read and written through the name tables "
        "(`weights/names.py`, `weights/hf_config.py`, `weights/gguf_model.py`); the native decode "
        "step (`kernels/decode.cpp`) runs every switch. A combination no family uses is refused with "
        "the reason, and a checkpoint of a family not covered names the nearest one and what it lacks.",
        "",
        "| family (`model_type`) | preset | what it switches on |",
        "| --- | --- | --- |",
    ]
    presets = {"qwen3": "qwen3-0.6b", "gemma2": "gemma-2-2b", "gemma3_text": "gemma-3-1b", "phi3": "phi-3-mini",
               "olmo2": "olmo-2-1b", "gpt_neox": "pythia-160m", "falcon": "falcon-7b", "phi": "phi-2",
               "smollm3": "smollm3-3b"}
    lines += [f"| {f} | {presets[f]} | {s} |" for f, s in SWITCHES.items()]
    lines += [
        "",
        f"## Against transformers and the eager forward ({results['date']}, transformers "
        f"{results['transformers']}, commit {results['commit'][:12]})",
        "",
        "Tiny random models (tests/test_families.py: 2 or 4 layers, Gemma's windows of 8 shorter "
        "than the 40 tokens, soft-caps small enough to bend the values; and the mixtures of experts "
        "of tests/test_moe.py: Mixtral, Qwen2-MoE with a shared expert in every 2nd layer, OLMoE). The tests bound the "
        "differences by 1e-4 (transformers) and 1e-5 of the largest logit (native step).",
        "",
        "| case | max abs logit diff vs transformers (fp32) | greedy 64 tokens | native step vs eager (fp32) |",
        "| --- | --- | --- | --- |",
    ]
    for r in results["families"]:
        lines.append(f"| {r['case']} | {r['transformers_max_abs_diff']:.1e} | "
                     f"{'identical' if r['greedy_64_identical'] else '**differ**'} | "
                     f"{r['native_vs_eager_max_abs_diff']:.1e} ({r['native_backend']}) |")
    lines += [
        "",
        "## llama.cpp running emergence's GGUF exports",
        "",
        "F32 exports in llama.cpp's architectures (tests/test_gguf_families.py, tests/test_gguf_moe.py), 8 prompt and 64 "
        "generated positions. llama.cpp fixes some switches the files cannot change, so these "
        "models use what it supports: Gemma's query scaling 1/sqrt(head_dim), SmolLM3's RoPE-less "
        "layer every 4th, Falcon without biases, Phi-3 without its window (llama.cpp disables it). "
        "The GELU families differ most: ggml's CPU GELU reads an fp16 table "
        "(ggml-cpu/vec.h, GGML_GELU_FP16), and llama.cpp uses the tanh GELU where GPT-NeoX and Falcon "
        "use the exact one; with that GELU emulated emergence is within 5e-5 of llama.cpp (tested).",
        "",
        "| case | llama.cpp architecture | max abs logit diff | greedy 64 tokens |",
        "| --- | --- | --- | --- |",
    ]
    for r in results["gguf"]:
        lines.append(f"| {r['case']} | {r['architecture']} | {r['llama_cpp_max_abs_diff']:.1e} | "
                     f"{'identical' if r['greedy_64_identical'] else '**differ**'} |")
    if results["vocab_vectors"]:
        lines += [
            "",
            "## llama.cpp's vocabulary test vectors",
            "",
            "Every `tokenizer.ggml.pre` llama.cpp knows is supported (tests/test_pretokenizers.py: "
            "a byte-level BPE trained on multilingual, code and emoji text, tagged with each of "
            "the 91 names, gives llama.cpp's ids on all 49 held-out texts; llama.cpp's own splitter "
            "gives emergence's pieces). The vocabularies llama.cpp ships with its source, with "
            "their test vectors (those in ../shared/data/gguf_vocab are tested on every run):",
            "",
            "| file | tokenizer.ggml.pre | vectors equal |",
            "| --- | --- | --- |",
        ]
        for r in results["vocab_vectors"]:
            lines.append(f"| {r['file']} | {r['pre'] or '(none)'} | {r['agree']} / {r['vectors']} |")
    lines += ["", f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; "
              f"command: `{results['command']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite docs/families.md from the JSON")
    args = parser.parse_args()
    if not args.report_only:
        RESULTS.write_text(json.dumps(measure(), indent=1) + "\n")
    DOC.write_text(report(json.loads(RESULTS.read_text())))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
