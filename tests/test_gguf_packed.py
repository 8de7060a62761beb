"""Quantized GGUF files stay quantized (weights/gguf_model.load_gguf).

A file's blocks become the layers emergence quantizes into (GGMLLinear, a GGMLEmbedding for
token_embd, a StackedLinear where a fused matrix's parts differ in type), byte for byte: the
loaded model is the same model as the float weights quantized by emergence to that format,
logit for logit and token for token, and for q8_0 / q4_0 it decodes through the same native
kernels reading the same bytes (so at the same speed: bench/bench_gguf_load.py measures it).
Types without a layer (Q2_K, Q3_K) are dequantized to bf16 and named. Loading costs about the
file's size in memory, not the 4-8x of dequantized floats.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from emergence.api import LanguageModel
from emergence.cli import main as cli
from emergence.decode import make_backend
from emergence.gguf import GGMLType, read_gguf
from emergence.gguf import quants as ggml
from emergence.kv_cache import PagedKVCache
from emergence.kernels.fused_decode import unsupported
from emergence.quant import quantize_model
from emergence.quant.linear import GGMLEmbedding, GGMLLinear, StackedLinear, has_ggml_kernel
from emergence.weights.gguf_model import load_gguf, save_gguf

from test_gguf_model import (PROMPT, llama_cpp_greedy, llama_cpp_model,  # noqa: E402
                             llama_cpp_quantize_file, random_model, tokenizer_for)

import llama_cpp  # noqa: E402  (a test dependency, built from source)


def emergence_quantized(model: nn.Module, fmt: str, loaded: nn.Module) -> nn.Module:
    """`model` quantized by emergence to `fmt` in every linear layer, with its token table as a
    `fmt` GGUF file holds it (the dequantized blocks, looked up as floats) and, where the head
    is tied, a head over those blocks; RoPE frequencies as the file's float32 theta gives them."""
    ref = copy.deepcopy(model)
    tied = ref.config.tie_embeddings
    quantize_model(ref, fmt, skip=())  # a tied head stays tied: set below
    qtype = GGMLType[fmt.upper()]
    blocks = torch.from_numpy(ggml.quantize(model.tok_embeddings.weight.detach(), qtype))
    ref.tok_embeddings.weight = nn.Parameter(ggml.dequantize(blocks.numpy(), qtype, model.tok_embeddings.weight.shape))
    if tied:
        ref.lm_head = GGMLLinear(ref.config.n_embd, ref.config.vocab_size, model.lm_head.bias is not None,
                                 ggml_format=fmt)
        ref.lm_head.blocks = blocks
        if model.lm_head.bias is not None:
            ref.lm_head.bias = nn.Parameter(model.lm_head.bias.detach().clone())
    ref.rope_inv_freq = loaded.rope_inv_freq
    return ref.eval()


def greedy(model: nn.Module, family: str, n: int = 32) -> tuple[list[int], int]:
    """Greedy token ids from PROMPT, through the native step where it can run, and how many of
    the forward passes ran natively."""
    from emergence.kernels import fused_decode

    calls = []
    original = fused_decode.NativeBackend._native

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    fused_decode.NativeBackend._native = counted
    try:
        lm = LanguageModel(model, tokenizer_for(family), model.config, "auto")
        return lm.complete(PROMPT, max_new_tokens=n, temperature=0, ignore_eos=True).token_ids, len(calls)
    finally:
        fused_decode.NativeBackend._native = original


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q5_1", "q6_k"])
def test_a_quantized_gguf_is_the_model_emergence_quantizes(family, fmt, tmp_path):
    """llama: interleaved q/k rows (permuted back block row by block row), an untied head;
    qwen2: q/k/v biases, a tied head over the quantized table. q6_k needs rows of 256."""
    width = dict(n_embd=256, intermediate_size=512) if fmt == "q6_k" else {}
    model = random_model(family, **width)
    save_gguf(model, tokenizer_for(family), tmp_path / "m.gguf", fmt)
    back, _, _ = load_gguf(tmp_path / "m.gguf")
    assert back.gguf_dequantized == {} and back.dtype == torch.float32
    assert isinstance(back.tok_embeddings, GGMLEmbedding) and back.tok_embeddings.format == fmt
    if model.config.tie_embeddings:  # the head reads the table's own blocks
        assert back.lm_head.blocks.data_ptr() == back.tok_embeddings.blocks.data_ptr()
    ref = emergence_quantized(model, fmt, back)
    for name, layer in ref.named_modules():
        if isinstance(layer, GGMLLinear):
            assert torch.equal(back.get_submodule(name).blocks, layer.blocks), name
    if model.config.qkv_bias:
        assert torch.equal(back.layers[0].attn.qkv_proj.bias, ref.layers[0].attn.qkv_proj.bias)
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        assert torch.equal(back(ids), ref(ids))  # logit for logit
    theirs, native_ref = greedy(ref, family)
    ours, native = greedy(back, family)
    assert ours == theirs and len(set(ours)) > 1
    kernel = has_ggml_kernel(fmt)  # every format (q5_1 and q6_k where the CPU has AVX512-VNNI)
    assert (unsupported(back) is None) == kernel
    # the 8-token prompt (ggml prompts up to 128 tokens, on the blocks) and the 31 steps natively
    assert native == native_ref == (32 if kernel else 0)
    if kernel:  # the native plan reads the very same bytes
        for name, layer in back.named_modules():
            if isinstance(layer, GGMLLinear):
                assert torch.equal(layer.kernel_operands().data, ref.get_submodule(name).kernel_operands().data)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_quantized_experts_load_one_layer_each_as_quantize_model_makes_them(fmt, tmp_path):
    """A Mixtral-style Q8_0 or Q4_K file: each expert's gate/up and down blocks as GGMLLinear
    layers equal to quantize_model's, read by the native step (which decodes as the eager
    forward does). Q4_K needs rows of 256."""
    from emergence import Config
    from test_gguf_families import random_model as random_family_model

    width = dict(n_embd=256, intermediate_size=256) if fmt == "q4_k" else dict(n_embd=64, intermediate_size=96)
    config = Config(family="mixtral", vocab_size=512, block_size=128, n_layer=2, n_head=4, n_kv_head=2,
                    n_experts=4, experts_per_token=2, **width)
    model = random_family_model(config)
    save_gguf(model, tokenizer_for("llama"), tmp_path / "moe.gguf", fmt)
    back, _, tok = load_gguf(tmp_path / "moe.gguf")
    ref = quantize_model(copy.deepcopy(model), fmt)
    for i in range(config.n_layer):
        for stack in ("gate_up_proj", "down_proj"):
            for e in range(config.n_experts):
                ours, theirs = (getattr(m.layers[i].mlp, stack)[e] for m in (back, ref))
                assert ours.format == fmt and torch.equal(ours.blocks, theirs.blocks), (i, stack, e)
    assert unsupported(back) is None
    native, eager = (LanguageModel(back, tok, back.config, backend).complete(
        PROMPT, max_new_tokens=24, temperature=0, ignore_eos=True).token_ids for backend in ("native", "eager"))
    assert native == eager


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_a_quantized_gguf_written_back_is_the_same_file(fmt, tmp_path):
    """GGUF -> emergence (blocks kept) -> GGUF of the same type: the same bytes."""
    model = random_model("qwen2")
    save_gguf(model, tokenizer_for("qwen2"), tmp_path / "a.gguf", fmt)
    back, _, tok = load_gguf(tmp_path / "a.gguf")
    save_gguf(back, tok, tmp_path / "b.gguf", fmt)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_llama_cpp_mixes_keep_every_type_emergence_has_a_layer_for(tmp_path, capsys):
    """llama.cpp's own Q4_K_M (Q6_K attn_v in some layers beside Q4_K q and k, Q6_K output and
    ffn_down) and Q2_K (Q2_K and Q3_K, which have no layer) files of one model. Q4_K_M: every
    tensor kept in its type; a fused q/k/v whose parts differ becomes a StackedLinear (the native
    step multiplies it part by part), and the model decodes llama.cpp's own 16 greedy tokens,
    natively, with the eager forward's logits. Q2_K: the Q2_K and Q3_K
    tensors dequantized to bf16 (the model runs in bf16) and named by `emergence info`, the
    Q4_K / Q5_0 ones kept."""
    model = random_model("llama", n_embd=256, intermediate_size=512, n_layer=4, rope_scaling=None)
    save_gguf(model, tokenizer_for("llama"), tmp_path / "f32.gguf", "f32")
    llama_cpp_quantize_file(tmp_path / "f32.gguf", tmp_path / "q4_k_m.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
                            pure=False)
    f = read_gguf(tmp_path / "q4_k_m.gguf")
    back, config, _ = load_gguf(tmp_path / "q4_k_m.gguf")
    assert back.gguf_dequantized == {} and back.dtype == torch.float32
    stacks = [i for i in range(config.n_layer) if isinstance(back.layers[i].attn.qkv_proj, StackedLinear)]
    assert stacks, "llama.cpp's Q4_K_M gives some layers a Q6_K attn_v"
    for i in range(config.n_layer):
        qkv = back.layers[i].attn.qkv_proj
        types = [f.tensors[f"blk.{i}.attn_{p}.weight"].type.name.lower() for p in "qkv"]
        if i in stacks:
            assert qkv.format == "+".join(types) and types[2] == "q6_k"
            assert torch.equal(qkv.parts[2].blocks, torch.from_numpy(f.raw(f"blk.{i}.attn_v.weight").copy()))
        else:
            assert qkv.format == types[0] == types[2]
        down = back.layers[i].mlp.down_proj
        assert down.format == f.tensors[f"blk.{i}.ffn_down.weight"].type.name.lower()
        assert torch.equal(down.blocks, torch.from_numpy(f.raw(f"blk.{i}.ffn_down.weight").copy()))
    assert back.lm_head.format == f.tensors["output.weight"].type.name.lower()
    assert unsupported(back) is None  # every type of the mix has a kernel, the stacks included
    theirs, _ = llama_cpp_greedy(llama_cpp_model(tmp_path / "q4_k_m.gguf", n_threads=1), PROMPT, 16)
    ours, native = greedy(back, "llama", 16)
    assert ours == theirs and native > 0
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        eager = back(ids)[0, -1]
    cache = PagedKVCache(config, 1, dtype=torch.float32)
    table: list[int] = []
    cache.grow(table, 0, 6)
    logits = make_backend(back, cache, "native").forward([ids[0].tolist()], [0], [table])[0]
    # the same numerics (activations quantized per block, integer dot products): to fp32 rounding,
    # up to an activation that lands on the other side of a rounding step
    assert (logits - eager).abs().max().item() <= 1e-2 * eager.abs().max().item()
    assert logits.argmax().item() == eager.argmax().item()

    llama_cpp_quantize_file(tmp_path / "f32.gguf", tmp_path / "q2_k.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
                            pure=False)
    f = read_gguf(tmp_path / "q2_k.gguf")
    back, _, _ = load_gguf(tmp_path / "q2_k.gguf")
    without_layer = {name: info.type.name for name, info in f.tensors.items()
                     if info.type in (GGMLType.Q2_K, GGMLType.Q3_K)}
    assert without_layer and back.gguf_dequantized == without_layer and back.dtype == torch.bfloat16
    kept = [name for name, info in f.tensors.items() if info.type in (GGMLType.Q4_K, GGMLType.Q5_0, GGMLType.Q6_K)]
    assert kept  # llama.cpp's Q2_K keeps some tensors in wider types: those stay packed
    assert cli(["info", str(tmp_path / "q2_k.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "bfloat16"
    assert info["dequantized"].startswith(f"{len(without_layer)} GGUF tensors (Q2_K, Q3_K) to bfloat16: ")
    assert all(name in info["dequantized"] for name in without_layer)


RSS_PROBE = """
import os, sys, torch
from emergence.weights.gguf_model import load_gguf
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
load_gguf(sys.argv[2])  # modules imported, caches warm: what remains is the file's own cost
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current size
base = rss("VmRSS")
model, _, _ = load_gguf(sys.argv[1], dequantize=sys.argv[3] == "1")
print((rss("VmHWM") - base) / os.path.getsize(sys.argv[1]))
"""


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_loading_a_quantized_gguf_costs_about_its_size(fmt, tmp_path):
    """Peak resident memory while loading a 4-layer model of 1024-wide layers (50M parameters;
    q4_0 29 MB, q8_0 53 MB), measured in a fresh process: at most 1.3x the file (measured
    0.8x; the blocks the layers use directly are views of the file's map, paged in as decoding
    reads them). Dequantized to float32, the same file costs 7x (q4_0) / 3.8x (q8_0)."""
    config = dict(vocab_size=512, n_embd=1024, n_layer=4, n_head=8, n_kv_head=8, intermediate_size=2816,
                  block_size=256, tie_embeddings=True, rope_scaling=None)
    model = random_model("llama", **config)
    save_gguf(model, tokenizer_for("llama"), tmp_path / "big.gguf", fmt)
    save_gguf(random_model("llama", n_embd=64, n_layer=1, rope_scaling=None), tokenizer_for("llama"),
              tmp_path / "small.gguf", fmt)

    def ratio(dequantize: bool) -> float:
        run = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "big.gguf"), str(tmp_path / "small.gguf"),
                              "1" if dequantize else "0"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-2000:]
        return float(run.stdout.strip().splitlines()[-1])

    assert ratio(False) <= 1.3
    assert ratio(True) >= 3.0  # the measurement sees a float load


@pytest.mark.parametrize("name", ["gguf_load.json", "gguf_load_amd.json"])
def test_the_committed_gguf_benchmark_and_the_readmes_table_agree(name):
    """bench/bench_gguf_load.py's committed runs (smollm2-135m shapes; the Xeon's with our Q8_0
    and Q4_0 exports, the EPYC's with llama.cpp's own Q4_K_M, Q5_K_M and Q6_K files too, and its
    pure Q4_K and Q6_K files of a 768-wide model): loading kept the files' memory within 1.3x
    their size, and the README's tables are rendered from them. On the EPYC, at a commit where
    every ggml type decodes natively, llama.cpp's files decode and prefill faster than
    llama-bench runs them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_gguf_load import LLAMA_CPP_MIXES, PURE_K, TYPES, render_table

    result = json.loads((root / "bench" / "results" / name).read_text())
    mixes = set(LLAMA_CPP_MIXES) | set(PURE_K) if name == "gguf_load_amd.json" else set()
    assert set(result["files"]) == set(TYPES) | mixes
    for kind, r in result["files"].items():
        assert r["packed_rss_bytes"] <= 1.3 * r["file_bytes"] < r["float_rss_bytes"]
        keys = ["gguf_decode", "llama_bench_decode"] + (["quantized_decode"] if kind not in LLAMA_CPP_MIXES else [])
        keys += ["gguf_prefill", "llama_bench_prefill"] if mixes else []
        for key in keys:
            lo, hi = r[f"{key}_range"]
            assert lo <= r[f"{key}_tok_s"] <= hi
        if kind in mixes:
            assert r["gguf_decode_tok_s"] > r["llama_bench_decode_tok_s"]
            assert r["gguf_prefill_tok_s"] > r["llama_bench_prefill_tok_s"]
    assert render_table(result) in (root / "README.md").read_text()
