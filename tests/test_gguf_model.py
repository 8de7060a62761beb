"""GGUF models: our export read back exactly, and llama.cpp itself (llama-cpp-python, built
from source as a test dependency) as the judge of the files we write and read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import emergence
from emergence import Config
from emergence.cli import main as cli
from emergence.gguf import GGMLType, read_gguf
from emergence.gguf.quants import dequantize, quantize
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


def llama_cpp_model(path, n_ctx: int = 256):
    # fp32 KV cache: llama.cpp's default f16 cache alone moves logits by ~1e-2.
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)


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
    assert torch.equal(back.layers[0].attn.qkv_proj.weight[:256],
                       dequantize(f.raw("blk.0.attn_q.weight"), qtype, (256, 256)).reshape(4, 32, 2, 256)
                       .swapaxes(1, 2).reshape(256, 256))


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
    from emergence.gguf_vocab import tokenizer_to_gguf_metadata

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
    assert torch.equal(back.layers[0].mlp.gate_up_proj.weight[96:], expected_up)
    for name in ("tok_embeddings.weight", "layers.1.attn.qkv_proj.weight", "lm_head.weight", "norm.weight"):
        assert torch.equal(back.state_dict()[name], expected[name]), name
