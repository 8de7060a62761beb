"""GGUF mixtures of experts, judged by llama.cpp (llama-cpp-python, built from source).

The tiny random Mixtral, Qwen2-MoE and OLMoE of tests/test_moe.py (vocabulary widened to the
stories260K tokenizer's 512 tokens, weights of std 0.2) are exported as llama.cpp's converter
writes them: Mixtral as `llama` (q/k rows permuted), Qwen2-MoE as `qwen2moe` (shared expert),
OLMoE as `olmoe`, with the router `ffn_gate_inp`, the stacked `ffn_gate_exps` / `ffn_up_exps` /
`ffn_down_exps`, `expert_count` and `expert_used_count`. From the F32 files llama.cpp must choose
emergence's greedy 64 tokens and give its logits within 1e-3 at every position (measured: at
most 7e-7, max |logit| ~1.5), and emergence must read them back as the same model, bit for bit.
A transformers checkpoint through `emergence convert` gives the very file llama.cpp's own
convert_hf_to_gguf.py writes (tensors byte for byte, metadata value for value), which llama.cpp
runs within 1e-4 of transformers.

A few switches are set to what llama.cpp's architectures fix: Qwen2-MoE with experts in every
layer (llama.cpp's qwen2moe has no dense layers; test_moe's model has them every 2nd), OLMoE
with as many k/v heads as q heads (llama.cpp's olmoe k norm is n_embd wide), Mixtral without
its window of 8 (llama.cpp's llama architecture ignores windows:
`test_llama_cpp_ignores_mixtral_windows`).

Q8_0 and Q4_0 exports hold the experts block-quantized row by row, each expert's slice as
llama.cpp's quantizer writes it (`test_llama_cpps_quantizer_writes_our_bytes`), and llama.cpp
runs them. emergence reading the same file (dequantized to float) differs from llama.cpp by
what llama.cpp does to the activations: its CPU matrix products take them in the weight's
"vec_dot" type, Q8_0 blocks of 32 for Q8_0 and Q4_0 weights and F16 for F16 ones (Qwen2-MoE's
expert rows of 40 and shared-expert rows of 72 fall back to F16). That rounding moves logits
(max |logit| ~1.5) by up to 0.06 (measured 0.017-0.057), and a greedy token now and then
(89-100% of them agree).
With the same rounding applied to emergence's activations (`GGMLActivations`), logits agree
within 1e-5 at nearly every position (median ~2e-7) and the greedy tokens agree (63 or 64 of
64); but Q8_0 rounding is not continuous: where an activation lies within float rounding of a
code boundary one int8 code flips, and that position moves by up to ~1e-2 (measured: 0-11 of
72 positions per file, at most 8.7e-3). Jittering emergence's own activations by a relative
1e-7 does the same to it (up to 1.2e-2 at 35-40 positions of the Qwen2-MoE Q4_0 file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import emergence
from emergence.config import Config
from emergence.errors import CheckpointError, ConfigError
from emergence.gguf import GGMLType, read_gguf, write_gguf
from emergence.gguf.quants import dequantize, quantize
from emergence.model import Transformer
from emergence.weights.gguf_model import gguf_names, load_gguf, save_gguf, to_interleaved
from emergence.weights.hf_config import config_from_hf

from conftest import kernel_setting  # noqa: E402
from test_gguf_families import PROMPT, TOKENIZER, our_logits, random_model, rewrite  # noqa: E402
from test_gguf_model import llama_cpp_greedy, llama_cpp_model  # noqa: E402
from test_moe import tiny_configs as moe_configs  # noqa: E402

import llama_cpp  # noqa: E402

LLAMA_CPP_SOURCE = Path(__file__).resolve().parents[1] / "build" / f"llama.cpp-{llama_cpp.__version__}"

# case -> (changes to test_moe's tiny config.json, llama.cpp architecture)
CASES = {
    "mixtral": (dict(sliding_window=None), "llama"),
    "qwen2_moe": (dict(decoder_sparse_step=1), "qwen2moe"),
    "olmoe": (dict(num_key_value_heads=4), "olmoe"),
}


def moe_config(case: str, **changes) -> Config:
    """The case's tiny config.json through emergence's reader, named neutrally."""
    hf = moe_configs()[case].to_dict()
    hf.update(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=None, _name_or_path="tiny-random")
    hf.update(CASES[case][0])
    hf.update(changes)
    return config_from_hf(hf)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """torch on one thread (the module-wide `one_thread`): tiny models decode fastest so, and a
    busy machine cannot stall a two-thread parallel region (index_add_ of a (1, 64) tensor
    measured at 21 ms so, 8 us on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_EXPORTS: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (model, F32 GGUF path, llama.cpp's greedy 64 tokens, its logits at every position)."""
    def get(case: str) -> tuple:
        if case not in _EXPORTS:
            model = random_model(moe_config(case), seed=20 + list(CASES).index(case))
            path = tmp_path_factory.mktemp(case) / "model.gguf"
            save_gguf(model, TOKENIZER, path, "f32")
            tokens, logits = llama_cpp_greedy(llama_cpp_model(path, n_ctx=128, n_threads=1), PROMPT, 64)
            _EXPORTS[case] = (model, path, tokens, logits)
        return _EXPORTS[case]
    return get


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


# ------------------------------------------------------------------------------------ F32
def test_llama_cpp_runs_our_f32_export_token_for_token(case, exported):
    model, path, theirs, their_logits = exported(case)
    c = model.config
    meta = read_gguf(path).metadata
    arch = CASES[case][1]
    assert meta["general.architecture"] == arch
    assert (meta[f"{arch}.expert_count"], meta[f"{arch}.expert_used_count"]) == (c.n_experts, c.experts_per_token)
    lm = emergence.LanguageModel(model, TOKENIZER, c)
    ours = lm.complete(PROMPT, temperature=0, max_new_tokens=64, ignore_eos=True).token_ids  # KV-cache decoding
    assert ours == theirs
    logits = our_logits(model, PROMPT + ours)
    assert logits.shape == their_logits.shape == (72, 512)
    assert np.abs(logits - their_logits).max() <= 1e-3


def test_our_export_reads_back_as_the_same_model(case, exported):
    model, path, _, _ = exported(case)
    c = model.config
    back, config, _ = load_gguf(path)
    assert config.to_dict() == c.to_dict()  # every switch, shape and token id, the experts' included
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # llama.cpp's layout: ggml {D, f, E} and {f, D, E}, the router (E, D) in F32, each expert's gate then up rows
    f = read_gguf(path)
    E, D, width = c.n_experts, c.n_embd, c.moe_intermediate_size or c.intermediate_size
    assert f.tensors["blk.1.ffn_gate_exps.weight"].shape == (D, width, E)
    assert f.tensors["blk.1.ffn_down_exps.weight"].shape == (width, D, E)
    assert f.tensors["blk.1.ffn_gate_inp.weight"].shape == (D, E)
    gate_up = model.layers[1].mlp.gate_up_proj.detach()
    assert torch.equal(f.tensor("blk.1.ffn_up_exps.weight")[2], gate_up[2, width:])
    if case == "qwen2_moe":
        assert f.tensors["blk.1.ffn_gate_inp_shexp.weight"].shape == (D, 1)
        assert f.metadata["qwen2moe.expert_feed_forward_length"] == 40
        assert f.metadata["qwen2moe.expert_shared_feed_forward_length"] == 72
    if case == "mixtral":  # q/k rows permuted for llama.cpp's adjacent-pair RoPE, as for LLaMA
        q_rows = model.layers[0].attn.qkv_proj.weight.detach()[:64]
        assert torch.equal(f.tensor("blk.0.attn_q.weight"), to_interleaved(q_rows, 4))


def test_llama_cpp_renormalises_the_chosen_experts_where_emergence_does(case, exported):
    """The other choice of norm_topk_prob gives other logits: llama.cpp renormalises Mixtral's
    top-k weights and not Qwen2-MoE's or OLMoE's (hard-coded in its graphs), as emergence does."""
    model, _, tokens, their_logits = exported(case)
    other = Transformer(Config(**{**model.config.to_dict(), "norm_topk_prob": not model.config.norm_topk_prob}))
    other.load_state_dict(model.state_dict())
    assert np.abs(our_logits(other.eval(), PROMPT + tokens) - their_logits).max() > 1e-2


def test_llama_cpp_ignores_mixtral_windows(tmp_path):
    """llama.cpp's llama architecture reads no sliding window (src/models/llama.cpp): the window
    of 8 a Mixtral file records, as a Mistral one does, is run with full attention there, while
    emergence keeps it on reading the file back."""
    model = random_model(moe_config("mixtral", sliding_window=8), seed=3)
    save_gguf(model, TOKENIZER, tmp_path / "m.gguf", "f32")
    assert read_gguf(tmp_path / "m.gguf").metadata["llama.attention.sliding_window"] == 8
    ids = PROMPT + list(range(100, 132))
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64, n_threads=1)
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    unwindowed = Transformer(Config(**{**model.config.to_dict(), "sliding_window": None})).eval()
    unwindowed.load_state_dict(model.state_dict())
    assert np.abs(our_logits(unwindowed, ids) - theirs).max() <= 1e-3
    assert np.abs(our_logits(model, ids) - theirs).max() > 1e-2
    assert load_gguf(tmp_path / "m.gguf")[1].to_dict() == model.config.to_dict()


# ------------------------------------------------------------- transformers checkpoints
# llama.cpp's convert_hf_to_gguf.py (argv: the source folder, then pairs of checkpoint folder and
# output file), its vocabulary step skipped: it knows no pre-tokenizer hash for the test tokenizer.
CONVERTER = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base
conversion.base.TextModel.set_vocab = lambda self: None
for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):
    sys.argv = [root + "/convert_hf_to_gguf.py", src, "--outfile", dst, "--outtype", "f32"]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case -> (transformers model, its folder, emergence convert's GGUF, llama.cpp converter's GGUF)."""
    import transformers as tf

    from emergence.cli import main as cli

    assert LLAMA_CPP_SOURCE.is_dir(), f"no llama.cpp source at {LLAMA_CPP_SOURCE}: make test fetches it " \
        "(bench/llama_cpp_source.py)"
    out, pairs = {}, []
    for case in CASES:
        folder = tmp_path_factory.mktemp(f"hf-{case}")
        hf_config = moe_configs()[case].to_dict()
        hf_config.update(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=None, _name_or_path="tiny-random")
        hf_config.update(CASES[case][0])
        torch.manual_seed(7)
        hf = tf.AutoModelForCausalLM.from_config(type(moe_configs()[case]).from_dict(hf_config)).eval()
        hf.save_pretrained(folder / "hf")
        TOKENIZER.save(folder / "hf")
        assert cli(["convert", str(folder / "hf"), str(folder / "ours.gguf")]) == 0
        out[case] = (hf, folder / "hf", folder / "ours.gguf", folder / "theirs.gguf")
        pairs += [str(folder / "hf"), str(folder / "theirs.gguf")]
    run = subprocess.run([sys.executable, "-c", CONVERTER, str(LLAMA_CPP_SOURCE), *pairs], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_llama_cpps_converter_writes_the_file_emergence_writes(case, converted):
    """The transformers checkpoint through `emergence convert` and through llama.cpp's own
    convert_hf_to_gguf.py: the same tensors (names, ggml shapes, types, bytes: experts stacked,
    Mixtral's q/k permuted, the shared expert's gate (1, D)) and the same metadata values. The
    converter writes a few keys more (general.type, general.size_label,
    general.quantization_version, and llama.vocab_size, which the llama loader reads only when
    the tokenizer lacks a token list); emergence adds rope.dimension_count where the converter
    leaves llama.cpp to default it to the head width."""
    _, _, ours_path, theirs_path = converted[case]
    ours, theirs = read_gguf(ours_path), read_gguf(theirs_path)
    assert ours.tensors.keys() == theirs.tensors.keys()
    for name, info in theirs.tensors.items():
        mine = ours.tensors[name]
        assert (mine.shape, mine.type) == (info.shape, info.type), name
        assert np.array_equal(ours.raw(name), theirs.raw(name)), name
    arch = CASES[case][1]
    keys = {k for k in ours.metadata if not k.startswith("tokenizer.")}
    their_keys = {k for k in theirs.metadata if not k.startswith("tokenizer.")} - {
        "general.type", "general.size_label", "general.quantization_version"}
    assert keys - their_keys == ({f"{arch}.rope.dimension_count"} if arch != "llama" else set())
    assert their_keys - keys == ({"llama.vocab_size"} if arch == "llama" else set())
    for key in (keys & their_keys) - {"general.name"}:
        assert ours.metadata[key] == theirs.metadata[key], key
    if arch == "llama":
        assert theirs.metadata["llama.vocab_size"] == 512
    else:
        assert ours.metadata[f"{arch}.rope.dimension_count"] == 16  # = the head width


def test_transformers_checkpoints_converted_by_the_cli_run_in_llama_cpp_as_in_transformers(case, converted):
    """transformers -> `emergence convert` -> GGUF -> llama.cpp, against transformers itself
    (weights from transformers' initialisation, std 0.2: logits up to ~6.7): within 1e-4
    (measured 9e-6 to 1.7e-5)."""
    hf, _, path, _ = converted[case]
    ids = PROMPT + list(range(100, 132))
    llm = llama_cpp_model(path, n_ctx=64, n_threads=1)
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[:len(ids)]) - reference).max() <= 1e-4


# ------------------------------------------------------------------------------ quantized
class GGMLActivations(TorchFunctionMode):
    """Round the input of each F.linear whose weight came from a quantized or F16 tensor of the
    file as llama.cpp's CPU matrix products do: to Q8_0 blocks for Q8_0 and Q4_0 weights, to F16
    for F16 ones (each type's vec_dot_type). Expert slices share their stacked tensor's storage.
    Within it the model's products stay torch's F.linear (products would otherwise take
    them to oneDNN on an AMD CPU, past this mode)."""

    def __enter__(self):
        self.torch_products = kernel_setting("onednn_products", False)
        self.torch_products.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.torch_products.__exit__(*exc)

    def __init__(self, model: Transformer, path) -> None:
        super().__init__()
        f = read_gguf(path)
        self.types = {}
        for name, p in model.named_parameters():
            qtype = f.tensors[gguf_names(model.config, name)[0]].type
            if qtype != GGMLType.F32:
                self.types[p.untyped_storage().data_ptr()] = qtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            qtype = self.types.get(args[1].untyped_storage().data_ptr())
            x = args[0]
            if qtype == GGMLType.F16:
                x = x.half().float()
            elif qtype is not None:
                rows = x.reshape(-1, x.shape[-1])
                x = dequantize(quantize(rows, GGMLType.Q8_0), GGMLType.Q8_0, rows.shape).reshape(x.shape)
            return func(x, *args[1:], **kwargs)
        return func(*args, **kwargs)


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_llama_cpp_runs_our_quantized_exports(case, file_type, exported, tmp_path):
    model, _, _, _ = exported(case)
    c = model.config
    qtype = GGMLType[file_type.upper()]
    save_gguf(model, TOKENIZER, tmp_path / "m.gguf", file_type)
    f = read_gguf(tmp_path / "m.gguf")
    width = c.moe_intermediate_size or c.intermediate_size
    # the 3-D experts quantized row by row, each expert's slice as a matrix would be; routers F32
    gate_up, down = model.layers[0].mlp.gate_up_proj.detach(), model.layers[0].mlp.down_proj.detach()
    assert f.tensors["blk.0.ffn_gate_exps.weight"].type == qtype  # rows of n_embd = 64
    assert np.array_equal(f.raw("blk.0.ffn_gate_exps.weight")[1], quantize(gate_up[1, :width], qtype))
    down_type = qtype if width % 32 == 0 else GGMLType.F16  # Qwen2-MoE's rows of 40: F16, as llama.cpp falls back
    assert f.tensors["blk.0.ffn_down_exps.weight"].type == down_type
    if down_type == qtype:
        assert np.array_equal(f.raw("blk.0.ffn_down_exps.weight")[3], quantize(down[3], qtype))
    assert {info.type for name, info in f.tensors.items() if "ffn_gate_inp" in name} == {GGMLType.F32}

    theirs, their_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "m.gguf", n_ctx=128, n_threads=1), PROMPT, 64)
    back, config, _ = load_gguf(tmp_path / "m.gguf")
    assert config.to_dict() == c.to_dict()
    ids, start = PROMPT + theirs[:-1], len(PROMPT) - 1
    plain = our_logits(back, ids)
    assert np.abs(plain - their_logits[:len(ids)]).max() <= 0.1
    assert (plain[start:].argmax(-1) == theirs).mean() >= 0.8
    with GGMLActivations(back, tmp_path / "m.gguf"):
        rounded = our_logits(back, ids)
    diff = np.abs(rounded - their_logits[:len(ids)]).max(-1)
    assert np.median(diff) <= 1e-5 and diff.max() <= 3e-2
    assert (rounded[start:].argmax(-1) == theirs).mean() >= 0.95


def test_llama_cpps_quantizer_writes_our_bytes(exported, tmp_path):
    """llama.cpp's own "pure" Q8_0 and Q4_0 quantization of our F32 Mixtral export is our Q8_0
    and Q4_0 export, tensor for tensor: types and bytes, the stacked experts included (and the
    routers kept in F32)."""
    model, path, _, _ = exported("mixtral")
    targets = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    code = ["import sys, llama_cpp", "p = llama_cpp.llama_model_quantize_default_params()",
            "p.nthread, p.pure = 1, True"]
    for file_type, ftype in targets.items():
        dst = str(tmp_path / f"theirs-{file_type}.gguf").encode()
        code += [f"p.ftype = {ftype}",
                 f"assert llama_cpp.llama_model_quantize({str(path).encode()!r}, {dst!r}, p) == 0"]
    run = subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    for file_type in targets:
        save_gguf(model, TOKENIZER, tmp_path / "ours.gguf", file_type)
        theirs, ours = read_gguf(tmp_path / f"theirs-{file_type}.gguf"), read_gguf(tmp_path / "ours.gguf")
        assert ours.tensors.keys() == theirs.tensors.keys()
        for name, info in theirs.tensors.items():
            assert ours.tensors[name].type == info.type, (file_type, name)
            assert np.array_equal(ours.raw(name), theirs.raw(name)), (file_type, name)
        assert theirs.tensors["blk.1.ffn_down_exps.weight"].type == GGMLType[file_type.upper()]
        assert theirs.tensors["blk.1.ffn_gate_inp.weight"].type == GGMLType.F32


def test_a_one_dimensional_shared_expert_gate_loads_too(exported, tmp_path):
    """llama.cpp's qwen2moe asks for ffn_gate_inp_shexp as {n_embd}: a file holding it 1-D (the
    converter writes transformers' (1, D)) runs in llama.cpp, and emergence reads the same model."""
    model, path, tokens, their_logits = exported("qwen2_moe")
    f = read_gguf(path)
    tensors = []
    for name, info in f.tensors.items():
        if "ffn_gate_inp_shexp" in name:
            gate = f.tensor(name).reshape(-1)
            tensors.append((name, info.type, tuple(gate.shape), gate))
        else:
            tensors.append((name, info.type, info.torch_shape, f.raw(name)))
    write_gguf(tmp_path / "m.gguf", f.metadata, tensors)
    assert read_gguf(tmp_path / "m.gguf").tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (64,)
    back, config, _ = load_gguf(tmp_path / "m.gguf")
    assert config.to_dict() == model.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    again, again_logits = llama_cpp_greedy(llama_cpp_model(tmp_path / "m.gguf", n_ctx=128, n_threads=1), PROMPT, 64)
    assert again == tokens and np.abs(again_logits - their_logits).max() <= 1e-6


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case, changes, match", [
    ("qwen2_moe", dict(decoder_sparse_step=2),
     r"llama\.cpp's qwen2moe architecture cannot represent moe_every=2 \(its experts have moe_every=1\)"),
    ("qwen2_moe", dict(norm_topk_prob=True), r"qwen2moe architecture cannot represent norm_topk_prob=True"),
    ("olmoe", dict(num_key_value_heads=2), r"olmoe architecture normalises k over n_embd \(attn_k_norm\), so it "
                                           r"needs n_kv_head == n_head, got n_kv_head=2"),
    ("qwen2_moe", dict(tie_word_embeddings=True), r"qwen2moe architecture cannot represent tie_embeddings=True"),
])
def test_configs_llama_cpp_cannot_represent_are_refused(case, changes, match, tmp_path):
    model = random_model(moe_config(case, **changes))
    with pytest.raises(ConfigError, match=match) as e:
        save_gguf(model, TOKENIZER, tmp_path / "m.gguf", "f32")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("config, match", [
    (dict(family="mixtral", norm_topk_prob=False), r"llama architecture cannot represent norm_topk_prob=False \(its "
                                                   r"experts have norm_topk_prob=True\)"),
    (dict(family="mixtral", moe_intermediate_size=64), r"llama architecture has one MLP width \(feed_forward_length\) "
                                                       r"for its experts; moe_intermediate_size=64 differs"),
    (dict(family="qwen2_moe", norm_topk_prob=False), r"qwen2moe architecture always runs a shared expert; "
                                                     r"shared_expert_size=None cannot be written"),
    (dict(family="olmoe", n_experts=0, qk_norm="all"), r"olmoe architecture needs experts \(n_expert > 0\)"),
])
def test_expert_switches_llama_cpp_fixes_are_refused(config, match, tmp_path):
    model = random_model(Config(**{**dict(vocab_size=512, n_layer=1, n_head=4, n_embd=64, intermediate_size=96,
                                          n_experts=4), **config}))
    with pytest.raises(ConfigError, match=match):
        save_gguf(model, TOKENIZER, tmp_path / "m.gguf", "f32")


@pytest.mark.parametrize("case, changes, drop, match, llama_cpp_refuses", [
    ("mixtral", {"llama.expert_count": 8}, (),
     r"llama\.expert_count is 8, but blk\.0\.ffn_gate_inp\.weight holds 4 experts \(shape \(4, 64\)\)", True),
    ("olmoe", {"olmoe.expert_count": 4}, (),
     r"olmoe\.expert_count is 4, but blk\.0\.ffn_gate_inp\.weight holds 8 experts", True),
    ("qwen2_moe", {}, ("blk.3.ffn_up_exps.weight",), r"tensor blk\.3\.ffn_up_exps\.weight is missing", True),
    ("mixtral", {}, tuple(f"blk.{i}.ffn_{k}.weight" for i in (0, 1) for k in ("gate_inp", "gate_exps", "up_exps",
                                                                               "down_exps")),
     r"tensor blk\.0\.ffn_gate_exps\.weight is missing", True),
    # no experts announced (llama.cpp asserts, aborting, on an expert_used_count without an expert_count)
    ("mixtral", {"llama.expert_count": 0, "llama.expert_used_count": 0}, (),
     r"blk\.0\.ffn_gate_inp\.weight is an expert router, but the metadata has llama\.expert_count = 0", True),
    ("qwen2_moe", {"qwen2moe.expert_count": 0, "qwen2moe.expert_used_count": 0}, (),
     r"GGUF metadata has qwen2moe\.expert_count = 0 \(llama\.cpp's qwen2moe needs experts\)", True),
    ("mixtral", {"llama.expert_used_count": 5}, (), r"experts_per_token=5 exceeds n_experts=4", None),
    ("qwen2_moe", {"qwen2moe.expert_used_count": 0}, (), r"has qwen2moe\.expert_used_count = 0 \(qwen2moe\."
                                                         r"expert_count is 6\)", None),
    ("qwen2_moe", {"qwen2moe.expert_feed_forward_length": 32}, (),
     r"blk\.0\.ffn_gate_exps\.weight has shape \(6, 40, 64\), the metadata implies \(6, 32, 64\)", True),
])
def test_files_whose_experts_and_metadata_disagree_are_refused_in_one_line(case, changes, drop, match,
                                                                            llama_cpp_refuses, exported, tmp_path):
    _, path, _, _ = exported(case)
    rewrite(path, tmp_path / "bad.gguf", changes, drop)
    with pytest.raises(CheckpointError, match=match) as e:
        load_gguf(tmp_path / "bad.gguf")
    assert "\n" not in str(e.value) and str(tmp_path / "bad.gguf") in str(e.value)
    if llama_cpp_refuses:  # (llama.cpp aborts the process on more experts used than there are: not run here)
        with pytest.raises(ValueError):
            llama_cpp_model(tmp_path / "bad.gguf", n_ctx=64, n_threads=1)
