"""GGUF models: our export read back exactly, and llama.cpp itself (llama-cpp-python, built
from source as a test dependency) as the judge of the files we write and read."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import emergence
from emergence import Config
from emergence.cli import main as cli
from emergence.gguf import GGMLType, read_gguf
from emergence.gguf.quants import BLOCK_SIZES, dequantize, quantize
from emergence.model import Transformer
from emergence.tokenizer import Tokenizer
from emergence.weights.gguf_model import load_gguf, save_gguf, to_interleaved

from conftest import SHARED_DATA

import llama_cpp  # noqa: E402  (a test dependency, built from source)

STORIES_TOKENIZER = emergence.api.PACKAGED_MODELS / "stories260K"
GPT2_TOKENIZER = SHARED_DATA / "gpt2_tokenizer"
TINY_RANDOM_GGUF = SHARED_DATA / "gguf_models" / "llama-2-tiny-random.gguf"
PROMPT = [1, 403, 407, 261, 378, 300, 42, 17]


def random_model(family: str, **overrides) -> Transformer:
    """A tiny random model; std 0.2 makes logits peaked, so greedy decoding has clear winners."""
    shapes = dict(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_embd=64, intermediate_size=96)
    families = {
        "llama": dict(family="llama", n_kv_head=2, rope_theta=500000.0,
                      rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=32)),
        "mistral": dict(family="mistral", n_kv_head=2, sliding_window=8),
        "qwen2": dict(family="qwen2", n_kv_head=1, qkv_bias=True, tie_embeddings=True),
        "gpt2": dict(family="gpt2", vocab_size=50257, n_embd=32, norm="layernorm", mlp="gelu", position="learned",
                     bias=True, tie_embeddings=True, intermediate_size=128, bos_token_id=50256,
                     eos_token_id=50256),
    }
    config = Config(name=f"tiny-{family}", **{**shapes, **families[family], **overrides})
    torch.manual_seed(len(family))
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def tokenizer_for(family: str) -> Tokenizer:
    return Tokenizer.load(GPT2_TOKENIZER if family == "gpt2" else STORIES_TOKENIZER)


def llama_cpp_model(path, n_ctx: int = 256, n_threads: int = 2):
    # fp32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-2. One thread is
    # steadier on a loaded machine (two spin at their barriers: 0.1 to 15 s for the same decode).
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=True, verbose=False, type_k=0,
                           type_v=0)


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation by llama.cpp, and its logits for every prompt and generated position."""
    llm.reset()
    llm.eval(prompt)
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return tokens, np.array(llm.scores[:llm.n_tokens])


def our_logits(model: Transformer, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


# ----------------------------------------------------------------------- our own round trip
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_f32_export_reads_back_exactly(family, tmp_path):
    model = random_model(family)
    save_gguf(model, tokenizer_for(family), tmp_path / "m.gguf", "f32")
    back, config, tokenizer = load_gguf(tmp_path / "m.gguf")
    assert config.family == family and config.n_kv_head == model.config.n_kv_head
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    logits_diff = np.abs(our_logits(back, PROMPT) - our_logits(model, PROMPT)).max()
    # Llama-3 rope scaling travels as per-frequency divisors: the frequencies agree to 1 ulp.
    assert logits_diff <= (1e-5 if family == "llama" else 0.0)
    assert tokenizer.encode("Once upon a time, Lily") == tokenizer_for(family).encode("Once upon a time, Lily")


@pytest.mark.parametrize("file_type, qtype", [("q8_0", GGMLType.Q8_0), ("q4_0", GGMLType.Q4_0),
                                              ("f16", GGMLType.F16), ("q5_1", GGMLType.Q5_1)])
def test_quantized_export_holds_ggml_blocks_of_the_permuted_weights(file_type, qtype, tmp_path):
    model = random_model("llama", n_embd=256, intermediate_size=256)
    save_gguf(model, tokenizer_for("llama"), tmp_path / "m.gguf", file_type)
    f = read_gguf(tmp_path / "m.gguf")
    q_rows = model.layers[0].attn.qkv_proj.weight.detach()[:256]
    assert f.tensors["blk.0.attn_q.weight"].type == qtype
    assert f.tensors["blk.0.attn_norm.weight"].type == GGMLType.F32  # norms stay F32, as llama.cpp writes them
    expected = quantize(to_interleaved(q_rows, 4), qtype) if qtype != GGMLType.F16 else \
        to_interleaved(q_rows, 4).half().numpy().view(np.uint8).reshape(256, -1)
    assert np.array_equal(f.raw("blk.0.attn_q.weight"), np.asarray(expected).reshape(256, -1))
    back, _, _ = load_gguf(tmp_path / "m.gguf")
    qkv = back.layers[0].attn.qkv_proj  # a quantized file's matrices stay in their blocks (GGMLLinear)
    weight = qkv.weight if file_type == "f16" else qkv.dequantize()
    assert torch.equal(weight[:256], dequantize(f.raw("blk.0.attn_q.weight"), qtype, (256, 256)).reshape(4, 32, 2, 256)
                       .swapaxes(1, 2).reshape(256, 256))
    if file_type != "f16":  # the very bytes of the file, rows back in the rotate-half order
        assert qkv.format == file_type
        assert torch.equal(qkv.blocks[:256], torch.from_numpy(f.raw("blk.0.attn_q.weight").copy())
                           .reshape(4, 32, 2, -1).swapaxes(1, 2).reshape(256, -1))


def test_gguf_files_load_through_emergence_load_and_the_cli(tmp_path, capsys):
    assert cli(["convert", "stories260K", str(tmp_path / "s.gguf")]) == 0
    lm = emergence.load(tmp_path / "s.gguf", device="cpu")  # recognised by its magic bytes, not its name
    (tmp_path / "renamed.bin").write_bytes((tmp_path / "s.gguf").read_bytes())
    assert emergence.load(tmp_path / "renamed.bin", device="cpu").config == lm.config
    reference = emergence.load(device="cpu")
    assert lm.generate("", temperature=0, max_new_tokens=200) == reference.generate("", temperature=0,
                                                                                    max_new_tokens=200)
    # GGUF -> HF layout -> GGUF: the same bytes (the model's name comes from the folder's)
    assert cli(["convert", str(tmp_path / "s.gguf"), str(tmp_path / "stories260K")]) == 0
    assert cli(["convert", str(tmp_path / "stories260K"), str(tmp_path / "again.gguf")]) == 0
    assert (tmp_path / "again.gguf").read_bytes() == (tmp_path / "s.gguf").read_bytes()
    capsys.readouterr()
    assert cli(["convert", "stories260K", str(tmp_path / "x.gguf"), "--type", "q9_9"]) == 1
    assert "unknown GGUF type 'q9_9'" in capsys.readouterr().err
    assert cli(["convert", "stories260K", str(tmp_path / "folder"), "--type", "q8_0"]) == 1
    assert "--type applies to a GGUF output" in capsys.readouterr().err


# ----------------------------------------------------------------------- llama.cpp as the judge
def test_llama_cpp_runs_our_f32_llama_export_token_for_token(tmp_path):
    # GQA, Llama-3 rope scaling (rope_freqs) and the q/k permutation are all on this path.
    model = random_model("llama")
    save_gguf(model, tokenizer_for("llama"), tmp_path / "m.gguf", "f32")
    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "m.gguf"), PROMPT, 64)
    lm = emergence.LanguageModel(model, tokenizer_for("llama"), model.config)
    ours = lm.complete(PROMPT, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids
    assert ours == theirs
    logits = our_logits(model, PROMPT + ours[:-1])
    assert np.abs(logits - their_logits[:len(logits)]).max() <= 1e-3


def llama_cpp_quantize_file(src, dst, ftype: int, pure: bool) -> None:
    """llama.cpp's `llama-quantize` (no importance matrix), in a subprocess: it prints a lot."""
    code = ("import sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype, p.nthread, p.pure = {ftype}, 1, {pure}\n"
            f"sys.exit(llama_cpp.llama_model_quantize({str(src).encode()!r}, {str(dst).encode()!r}, p))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


K_TYPES = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


def test_llama_cpp_quantizes_our_f32_export_into_our_k_quant_bytes(tmp_path):
    """llama.cpp's quantizer as the judge of ours. Its "pure" Q4_K_S / Q5_K_S / Q6_K quantization
    of our F32 export is our q4_k / q5_k / q6_k export, tensor for tensor: types and bytes. The
    shapes include llama.cpp's fallbacks: attn_output rows of 192 (4 heads of 48) become
    Q5_0 / Q5_1 / Q8_0, ffn_down rows of 300 (not a multiple of 32) F16. Its Q4_K_M and Q5_K_M
    mixes (Q6_K output and attn_v, ...) are compared by the type each tensor got: our quantizer,
    given the same F32 values, writes the same bytes. In all: 12 tensors of 2,992 super-blocks
    per type in the pure files, then 10 Q4_K (2,384), 10 Q5_K (2,384) and 4 Q6_K (1,216) in the
    mixes."""
    model = random_model("llama", n_embd=256, intermediate_size=300, head_dim=48)
    save_gguf(model, tokenizer_for("llama"), tmp_path / "f32.gguf", "f32")
    source = read_gguf(tmp_path / "f32.gguf")
    for file_type, ftype in [("q4_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S),
                             ("q5_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S), ("q6_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K)]:
        llama_cpp_quantize_file(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", ftype, pure=True)
        save_gguf(model, tokenizer_for("llama"), tmp_path / "ours.gguf", file_type)
        theirs, ours = read_gguf(tmp_path / "theirs.gguf"), read_gguf(tmp_path / "ours.gguf")
        assert ours.tensors.keys() == theirs.tensors.keys()
        for name, info in theirs.tensors.items():
            assert ours.tensors[name].type == info.type, (file_type, name)
            assert np.array_equal(ours.raw(name), theirs.raw(name)), (file_type, name)
        fallback = {"q4_k": GGMLType.Q5_0, "q5_k": GGMLType.Q5_1, "q6_k": GGMLType.Q8_0}[file_type]
        assert theirs.tensors["blk.0.attn_q.weight"].type == GGMLType[file_type.upper()]
        assert theirs.tensors["blk.0.attn_output.weight"].type == fallback
        assert theirs.tensors["blk.1.ffn_down.weight"].type == GGMLType.F16
        k_quantized = [info for info in theirs.tensors.values() if info.type in K_TYPES]
        assert len(k_quantized) == 12 and sum(info.nbytes // BLOCK_SIZES[info.type][1] for info in k_quantized) == 2992
    compared = {t: [0, 0] for t in K_TYPES}
    for ftype in (llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M):
        llama_cpp_quantize_file(tmp_path / "f32.gguf", tmp_path / "mix.gguf", ftype, pure=False)
        mix = read_gguf(tmp_path / "mix.gguf")
        for name, info in mix.tensors.items():
            if info.type in K_TYPES:
                raw = quantize(source.tensor(name), info.type)
                assert np.array_equal(raw, mix.raw(name)), (name, info.type.name)
                compared[info.type][0] += 1
                compared[info.type][1] += raw.size // BLOCK_SIZES[info.type][1]
    assert {t.name: c for t, c in compared.items()} == {"Q4_K": [10, 2384], "Q5_K": [10, 2384], "Q6_K": [4, 1216]}


@pytest.mark.parametrize("file_type", ["q4_k", "q5_k", "q6_k"])
def test_llama_cpp_runs_our_k_quant_exports(file_type, tmp_path):
    """A K-quant export, run by llama.cpp, against our model with the same weights. Our GGMLLinear
    layers (Q8_K activations, as llama.cpp's K-quant dot products quantize them) choose the same
    32 greedy tokens and stay within 0.1 of its logits (measured: q4_k 3e-6, q5_k 0.039, q6_k 0.035:
    float sums in another order move an activation across a rounding boundary now and then, and
    the KV cache carries it on). load_gguf keeps the file's blocks in those layers, so the loaded
    model is that model, logit for logit; the float forward of the dequantized file
    (load_gguf(dequantize=True)) stays within 0.15 (measured 0.07-0.09; max |logit| ~2.8) but
    may pick other tokens."""
    qtype = GGMLType[file_type.upper()]
    model = random_model("llama", n_embd=256, intermediate_size=512)
    save_gguf(model, tokenizer_for("llama"), tmp_path / "m.gguf", file_type)
    f = read_gguf(tmp_path / "m.gguf")
    assert {info.type for info in f.tensors.values() if len(info.shape) == 2} == {qtype}
    assert f.metadata["general.file_type"] == {"q4_k": 14, "q5_k": 16, "q6_k": 18}[file_type]
    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "m.gguf", n_threads=1), PROMPT, 32)

    floats, _, _ = load_gguf(tmp_path / "m.gguf", dequantize=True)
    embedding = model.tok_embeddings.weight.detach()
    assert torch.equal(floats.tok_embeddings.weight, dequantize(quantize(embedding, qtype), qtype, embedding.shape))
    logits = our_logits(floats, PROMPT + theirs[:-1])
    assert np.abs(logits - their_logits[:len(logits)]).max() <= 0.15

    from emergence.quant import quantize_model

    quantize_model(model, file_type, skip=())  # row by row the same blocks as the export's
    assert np.array_equal(model.layers[1].mlp.down_proj.blocks.numpy(), f.raw("blk.1.ffn_down.weight"))
    assert np.array_equal(model.lm_head.blocks.numpy(), f.raw("output.weight"))
    with torch.no_grad():
        model.tok_embeddings.weight.copy_(floats.tok_embeddings.weight)
    logits = our_logits(model, PROMPT + theirs[:-1])
    assert logits[len(PROMPT) - 1:].argmax(-1).tolist() == theirs  # (KV-cache decoding: test_quant.py)
    assert np.abs(logits - their_logits[:len(logits)]).max() <= 0.1
    back, _, _ = load_gguf(tmp_path / "m.gguf")  # the file's blocks kept: the same model
    assert back.tok_embeddings.format == back.lm_head.format == back.layers[1].mlp.down_proj.format == file_type
    model.rope_inv_freq = back.rope_inv_freq  # from rope_theta as the file stores it (float32)
    assert np.array_equal(our_logits(back, PROMPT + theirs[:-1]), our_logits(model, PROMPT + theirs[:-1]))
    assert np.abs(logits - their_logits[:len(logits)]).max() <= 0.1


def test_k_quant_conversion_falls_back_like_llama_cpp(tmp_path):
    """stories260K (rows of 64 and 172) through `emergence convert --type q4_k`: no 256-blocks, so
    rows of 64 fall back to Q5_0 and ffn_down's rows of 172 to F16, as llama.cpp does; llama.cpp
    runs the file and agrees with our reading of it."""
    assert cli(["convert", "stories260K", str(tmp_path / "s.gguf"), "--type", "q4_k"]) == 0
    f = read_gguf(tmp_path / "s.gguf")
    kinds = {name: info.type for name, info in f.tensors.items() if len(info.shape) == 2}
    assert kinds["token_embd.weight"] == kinds["blk.0.attn_q.weight"] == kinds["blk.0.ffn_up.weight"] == GGMLType.Q5_0
    assert kinds["blk.0.ffn_down.weight"] == GGMLType.F16 and set(kinds.values()) == {GGMLType.Q5_0, GGMLType.F16}
    lm = emergence.load(tmp_path / "s.gguf", device="cpu")
    prompt = PROMPT[:4]
    theirs, _ = llama_cpp_greedy(llama_cpp_model(tmp_path / "s.gguf", n_threads=1), prompt, 16)
    logits = our_logits(lm.model, prompt + theirs[:-1])
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == theirs


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_llama_cpp_agrees_on_qwen2_and_gpt2_exports(family, tmp_path):
    model = random_model(family)
    save_gguf(model, tokenizer_for(family), tmp_path / "m.gguf", "f32")
    prompt = PROMPT if family != "gpt2" else [50256, 464, 3290, 318, 257, 1332]
    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "m.gguf"), prompt, 24)
    logits = our_logits(model, prompt + theirs[:-1])
    assert np.abs(logits - their_logits[:len(logits)]).max() <= 1e-3
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == theirs


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_llama_cpp_tokenizes_our_exported_vocabulary_like_us(family, tmp_path):
    model = random_model(family)
    tok = tokenizer_for(family)
    save_gguf(model, tok, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    texts = ["Once upon a time, there was a little girl named Lily.", " leading space", "two  spaces\tand tab",
             "new\nlines\n\n", "numbers 12345 and 3.14", "Ünïcödé çàfé 日本語 🦙", "", " ", "a"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_bos=False), text


def test_the_shared_tiny_random_gguf_loads_and_matches_llama_cpp():
    lm = emergence.load(TINY_RANDOM_GGUF, device="cpu", dtype="fp32")
    assert lm.config.n_layer == 1 and lm.config.n_embd == 8 and lm.config.vocab_size == 32000
    prompt = lm.tokenizer.encode("Hello world")
    assert prompt[0] == lm.tokenizer.bos_id == 1
    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(TINY_RANDOM_GGUF, n_ctx=64), prompt, 16)
    logits = our_logits(lm.model, prompt + theirs[:-1])
    # The weights are F16; llama.cpp also rounds the activations to F16 for its F16 dot products.
    assert np.abs(logits - their_logits[:len(logits)]).max() <= 5e-3
    text = lm.generate("Hello world", temperature=0, max_new_tokens=16)
    assert isinstance(text, str) and lm.complete("Hello world", temperature=0, max_new_tokens=16).token_ids


def test_files_from_the_gguf_package_writer_load(tmp_path):
    import gguf

    model = random_model("llama", rope_scaling=None)
    c = model.config
    writer = gguf.GGUFWriter(str(tmp_path / "w.gguf"), "llama")
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layer)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    tok = tokenizer_for("llama")
    from emergence.gguf.vocab import tokenizer_to_gguf_metadata

    meta = tokenizer_to_gguf_metadata(tok, c)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_scores(meta["tokenizer.ggml.scores"].value)
    writer.add_token_types(meta["tokenizer.ggml.token_type"].value)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    s = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hd = c.head_dim
    writer.add_tensor("token_embd.weight", s["tok_embeddings.weight"])
    writer.add_tensor("output_norm.weight", s["norm.weight"])
    writer.add_tensor("output.weight", s["lm_head.weight"].astype(np.float16))
    for i in range(c.n_layer):
        qkv = torch.from_numpy(s[f"layers.{i}.attn.qkv_proj.weight"])
        q, k, v = qkv.split([c.n_head * hd, c.n_kv_head * hd, c.n_kv_head * hd])
        gate, up = np.split(s[f"layers.{i}.mlp.gate_up_proj.weight"], 2)
        for name, value in [("attn_norm.weight", s[f"layers.{i}.attn_norm.weight"]),
                            ("attn_q.weight", to_interleaved(q, c.n_head).numpy()),
                            ("attn_k.weight", to_interleaved(k, c.n_kv_head).numpy()), ("attn_v.weight", v.numpy()),
                            ("attn_output.weight", s[f"layers.{i}.attn.o_proj.weight"]),
                            ("ffn_norm.weight", s[f"layers.{i}.mlp_norm.weight"]), ("ffn_gate.weight", gate),
                            ("ffn_up.weight", up), ("ffn_down.weight", s[f"layers.{i}.mlp.down_proj.weight"])]:
            raw = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0) if name == "ffn_up.weight" else value
            qtype = gguf.GGMLQuantizationType.Q8_0 if name == "ffn_up.weight" else None
            writer.add_tensor(f"blk.{i}.{name}", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    back, config, _ = load_gguf(tmp_path / "w.gguf")
    assert config.n_kv_head == 2 and not config.tie_embeddings
    expected = dict(model.state_dict())
    expected["lm_head.weight"] = expected["lm_head.weight"].half().float()
    up = expected["layers.0.mlp.gate_up_proj.weight"][96:]
    expected_up = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(up.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                                          gguf.GGMLQuantizationType.Q8_0))
    gate_up = back.layers[0].mlp.gate_up_proj  # an F32 gate beside a Q8_0 up: each part kept as stored
    assert gate_up.format == "float32+q8_0"
    assert np.array_equal(gate_up.parts[1].blocks.numpy(), gguf.quants.quantize(up.numpy(), gguf.GGMLQuantizationType.Q8_0))
    assert torch.equal(gate_up.dequantize()[96:], expected_up)
    assert torch.equal(gate_up.parts[0].weight, expected["layers.0.mlp.gate_up_proj.weight"][:96])
    for name in ("tok_embeddings.weight", "layers.1.attn.qkv_proj.weight", "lm_head.weight", "norm.weight"):
        assert torch.equal(back.state_dict()[name], expected[name]), name


def test_an_adapter_merged_and_converted_runs_in_llama_cpp_as_it_runs_unmerged(tmp_path, capsys):
    """emergence merge -> a plain HF folder -> emergence convert -> a GGUF llama.cpp decodes with
    the adapted model's greedy tokens (the adapter applied unmerged, as peft applies it)."""
    from emergence.adapters import LoraSpec, add_adapter, save_adapter
    from emergence.cli import main as cli
    from emergence.weights.hf import save_hf

    model = random_model("llama")
    save_hf(model, tmp_path / "base")
    tokenizer_for("llama").save(tmp_path / "base")
    add_adapter(model, LoraSpec(r=4, alpha=8, targets="all-linear", dora=True), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(model, tmp_path / "adapter")
    assert cli(["merge", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                str(tmp_path / "merged")]) == 0
    assert cli(["convert", str(tmp_path / "merged"), str(tmp_path / "m.gguf")]) == 0
    adapted = emergence.load(tmp_path / "base", device="cpu", adapter=tmp_path / "adapter")
    ours = adapted.complete(PROMPT, temperature=0, max_new_tokens=32, ignore_eos=True).token_ids
    plain = emergence.load(tmp_path / "base", device="cpu").complete(PROMPT, temperature=0, max_new_tokens=32,
                                                                       ignore_eos=True).token_ids
    theirs, _ = llama_cpp_greedy(llama_cpp_model(tmp_path / "m.gguf", n_threads=1), PROMPT, 32)
    assert ours != plain  # the adapter changes what the model says
    assert theirs == ours
