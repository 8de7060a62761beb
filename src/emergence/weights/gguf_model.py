"""Models in GGUF files, llama.cpp's format: read them into our Transformer, write ours out.

Each family is written as the llama.cpp architecture its converter (convert_hf_to_gguf.py)
makes of the Hugging Face checkpoint (`ARCHITECTURES`): llama (LLaMA, Mistral, Mixtral), qwen2,
gpt2, qwen3, gemma2, gemma3, phi3, olmo2, gptneox, falcon, phi2, smollm3, qwen2moe, olmoe and bitnet,
with the metadata keys and tensor names and layouts that llama.cpp's loader reads
(src/models/<arch>.cpp).

Tensors are named per block (`blk.{i}.attn_q.weight`, ...). Where our model fuses q, k and v
(or the gate and up projections) llama.cpp keeps them apart, except in the architectures whose
converter writes one `attn_qkv` matrix (gpt2, phi3, gptneox, falcon), always [q; k; v] (the
converter regroups GPT-NeoX's and Falcon's per-head rows, as emergence does on reading them),
and Phi-3's fused [gate; up] `ffn_up`. In the architectures llama.cpp rotates with GGML's
"normal" RoPE (llama, smollm3) adjacent pairs of each head's dimensions are rotated, while
Hugging Face checkpoints and our model rotate the two halves; so the q and k rows are permuted
on the way out and back on the way in, as llama.cpp's own converter does. The others use
"neox" RoPE, our layout, on the first `rope.dimension_count` dimensions (partial rotary), or
none (gpt2). Gemma's norms are stored as the whole gain (1 + w), in llama.cpp as in emergence.
Falcon's two-norm block stores its MLP norm (ln_mlp) as `attn_norm` and the attention's
(ln_attn) as `attn_norm_2`. Llama-3 rope scaling travels as llama.cpp's `rope_freqs.weight`
tensor of per-frequency divisors.

What llama.cpp fixes, a model must have to be written (`ConfigError` naming the switch
otherwise): its attention scale for Gemma (1/sqrt(head_dim); 1/sqrt(n_embd/n_head) for the
27B shapes), Gemma 2's two soft-caps and tied head, SmolLM3's RoPE-less layers every 4th,
an untied head for olmo2, gptneox and phi2 (and phi2's head bias), no biases in falcon, all of
them in gptneox and phi2. Gemma's window pattern is written as llama.cpp's per-layer
`attention.sliding_window_pattern` where it differs from the architecture's default (every
2nd layer global for Gemma 2, every 6th for Gemma 3). A Phi-3 window is recorded as the
converter records it, but llama.cpp disables Phi-3's sliding window (src/models/phi3.cpp), so
it attends to every earlier token. The GGUF gptneox and falcon architectures record no
activation (llama.cpp computes the tanh GELU): they are read back with the exact GELU of their
Hugging Face checkpoints.

Mixtures of experts are written as llama.cpp's converter writes them: Mixtral as `llama` (q/k
rows permuted as for LLaMA), Qwen2-MoE as `qwen2moe`, OLMoE as `olmoe`, with `expert_count` and
`expert_used_count`. Each layer's router is `ffn_gate_inp` (E, D), always F32 as llama.cpp keeps
it; the experts are stacked 3-D tensors `ffn_gate_exps` and `ffn_up_exps` (E, f, D) and
`ffn_down_exps` (E, D, f), ggml's {D, f, E} and {f, D, E}, block-quantized row by row like any
matrix. Qwen2-MoE's shared expert is `ffn_gate_shexp` / `ffn_up_shexp` / `ffn_down_shexp` with its
sigmoid gate `ffn_gate_inp_shexp` (1, D) (F32 too), and its widths travel as
`expert_feed_forward_length` and `expert_shared_feed_forward_length`; Mixtral's and OLMoE's
experts are `feed_forward_length` wide. llama.cpp hard-codes the routing of these three
architectures (src/models/llama.cpp, qwen2moe.cpp, olmoe.cpp: softmax over all experts, then the
top k, renormalised over them in llama, not in qwen2moe and olmoe), reads no
`expert_weights_norm` or `expert_gating_func` for them (its converter writes neither), and puts
experts in every layer; so a model must have norm_topk_prob=True (Mixtral) or False (the others)
and moe_every=1 to be written (`MOE_SWITCHES`). OLMoE's k norm is n_embd wide in llama.cpp
(n_kv_head == n_head). llama.cpp's llama architecture ignores a sliding window, so a Mixtral
window, like Mistral's, is recorded (`llama.attention.sliding_window`) but not applied by it.

On reading, a quantized file stays quantized (`load_gguf`): each matrix in a ggml format that
emergence has a layer for keeps its blocks, byte for byte, in a GGMLLinear (the token table in a
GGMLEmbedding, a tied head over the same blocks), so the model is the one `quantize_model`
makes from the float weights, decoding through the same kernels; q and k block rows are
permuted back like float rows (a row's blocks never mix with another row's).

The metadata must describe the tensors: a missing tensor, a tensor of another
shape and one the model has no place for (a block past `block_count`, say) are each a one-line
`CheckpointError`, as is an `expert_count` the expert tensors do not hold.

Norm weights are written as F32 and every matrix in the requested type (F32, F16, BF16 or a
ggml block format). A matrix whose rows do not fill whole blocks falls back as llama.cpp's
quantizer does: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0 (rows of 32-multiples), and to F16
when its rows do not fill blocks of 32 either (every 32-block type goes straight to F16).
Quantized layers (quant/linear.py) are written as their dequantized weights.

Ternary models (BitNet b1.58: a ternary checkpoint's TernaryLinear layers, or a model training
ternary, Config.ternary) are written in llama.cpp's ternary types, TQ2_0 (2.06 bits per weight)
or TQ1_0 (1.69), as its converter writes them: the blocks' matrices ternary, the token embedding
and an untied output head F16, norms F32, and a matrix whose rows are not a multiple of 256
(TQ blocks) F16, as the converter falls back (gguf.quants refuses the shape). Every TQ block
stores its absmax as its float16 scale, which for a matrix values * scale (one scale per
tensor, BitNet's absmean) is that scale in every block holding a nonzero value: the file holds
the model's values exactly and its scales rounded to float16 (F16 fallbacks hold the same
numbers). llama.cpp multiplies TQ weights by activations quantized to 8 bits per block of 256
(Q8_K), where the model quantizes them per token (act_bits=8): its logits differ by that.
A model whose layers are not ternary is refused (`ConfigError` stating the relative error of
rounding its matrices to ternary) unless forced: it is then rounded as quantize_model(model,
"ternary") rounds it (one absmean scale per matrix), a large loss for a model not trained so.
llama.cpp's bitnet architecture (BitNet's sub-norms; tied head; its MLP is SwiGLU, so the ReLU^2
MLP of BitNet b1.58 2B4T cannot be written) takes any of the types too.

On reading, TQ1_0 and TQ2_0 matrices whose nonzero values share one magnitude (all but BitNet's
separately scaled q, k and v, which emergence fuses) become TernaryLinear layers with 8-bit
activations again, the others float.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..errors import CheckpointError, ConfigError, InvalidArgument
from ..gguf import GGMLType, GGUFValue, GGUFValueType, read_gguf, write_gguf
from ..gguf.quants import BLOCK_SIZES, TORCH_DTYPES, quantize
from ..gguf.vocab import tokenizer_from_gguf_metadata, tokenizer_to_gguf_metadata
from ..model import BitLinear, Transformer, empty_model, finish_loading, rope_inv_freq
from ..tokenizer import Tokenizer

# our family -> llama.cpp architecture (the one convert_hf_to_gguf.py writes for its checkpoints)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2", "qwen3": "qwen3",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "olmo2": "olmo2", "gpt_neox": "gptneox",
                 "falcon": "falcon", "phi": "phi2", "smollm3": "smollm3", "mixtral": "llama",
                 "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "bitnet": "bitnet"}
# llama.cpp architecture -> our family (a llama file with a sliding window is Mistral's, one
# with experts Mixtral's)
FAMILIES = {arch: family for family, arch in ARCHITECTURES.items() if family not in ("mistral", "mixtral")}
# The types we write: those our block quantizers produce (Q2_K and Q3_K are read, not written).
FILE_TYPES = {t.name.lower(): t for t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                                          GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K,
                                          GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.TQ1_0, GGMLType.TQ2_0)}
TERNARY_TYPES = (GGMLType.TQ1_0, GGMLType.TQ2_0)
# llama.cpp's `general.file_type` (enum llama_ftype) for each file type we write. Our K-quant
# files hold one type throughout (no llama.cpp mix of Q6_K output and attn_v): Q4_K and Q5_K
# are named as llama.cpp's "small" variants (Q4_K_S, Q5_K_S), the mostly-uniform ones.
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12,
               "q4_k": 14, "q5_k": 16, "q6_k": 18, "bf16": 32, "tq1_0": 36, "tq2_0": 37}
# llama.cpp's replacement for a K-quant whose rows do not fill 256-blocks (llama_tensor_get_type).
K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}

# What llama.cpp's graph of each architecture computes (src/models/<arch>.cpp), as the values of
# our switches a model needs to be written in it: the first is what a file of it is read as.
_RMS_PRE = dict(norm=("rmsnorm",), mlp=("swiglu",), position=("rope",), bias=(False,), parallel=(None,),
                norm_position=("pre",), qk_norm=(None,), rope_scaling=(None,))
_GEMMA = dict(_RMS_PRE, mlp=("geglu",), norm_position=("sandwich",), scale_embeddings=(True,))
_LAYERNORM = dict(norm=("layernorm",), position=("rope",), qkv_bias=(False,), norm_position=("pre",),
                  qk_norm=(None,), sliding_window=(None,), rope_scaling=(None,))
ARCH_SWITCHES: dict[str, dict[str, tuple]] = {
    "qwen2": dict(rope_scaling=(None,)),  # llama.cpp's qwen2 loads no rope_freqs tensor
    "qwen3": dict(_RMS_PRE, qk_norm=("head",), sliding_window=(None,)),
    "smollm3": dict(_RMS_PRE, sliding_window=(None,)),
    "phi3": dict(_RMS_PRE),
    "olmo2": dict(_RMS_PRE, qk_norm=("all",), norm_position=("post",), sliding_window=(None,),
                  tie_embeddings=(False,)),
    "gemma2": dict(_GEMMA, tie_embeddings=(True,)),
    "gemma3": dict(_GEMMA, qk_norm=("head",), attn_softcap=(None,)),
    "gptneox": dict(_LAYERNORM, mlp=("gelu_exact", "gelu"), bias=(True,), parallel=("two-norms", None),
                    tie_embeddings=(False,)),
    "falcon": dict(_LAYERNORM, mlp=("gelu_exact", "gelu"), bias=(False,), parallel=("shared-norm", "two-norms"),
                   rotary_dim=(None,)),
    "phi2": dict(_LAYERNORM, mlp=("gelu",), bias=(True,), parallel=("shared-norm",), head_bias=(True,),
                 tie_embeddings=(False,)),
    # qwen2moe and olmoe load no window and require an output tensor (src/models/<arch>.cpp)
    "qwen2moe": dict(_RMS_PRE, sliding_window=(None,), tie_embeddings=(False,)),
    "olmoe": dict(_RMS_PRE, qk_norm=("all",), sliding_window=(None,), tie_embeddings=(False,)),
    # bitnet: SiLU-gated MLP (llama.cpp's graph, src/models/bitnet.cpp), the head tied to token_embd
    "bitnet": dict(_RMS_PRE, sub_norms=(True,), qkv_bias=(False,), sliding_window=(None,), tie_embeddings=(True,)),
}
# The routing llama.cpp's graph hard-codes for each architecture with experts (build_moe_ffn's
# norm_w, experts in every layer, a shared expert or none), as the values a model with experts
# needs to be written in it; the first is what a file of it is read as.
MOE_SWITCHES: dict[str, dict[str, tuple]] = {
    "llama": dict(norm_topk_prob=(True,), moe_every=(1,), shared_expert_size=(None,)),
    "qwen2moe": dict(norm_topk_prob=(False,), moe_every=(1,)),
    "olmoe": dict(norm_topk_prob=(False,), moe_every=(1,), shared_expert_size=(None,)),
}
MOE_ARCHS = ("qwen2moe", "olmoe")  # architectures that must have experts
# Tensors llama.cpp keeps in F32 whatever the file type (its converter and llama-quant.cpp)
F32_TENSORS = (".ffn_gate_inp.", ".ffn_gate_inp_shexp.")
# llama.cpp's default window pattern (load_swa_pattern): every n-th layer global.
SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
SMOLLM3_NOPE_EVERY = 4  # llama.cpp hard-codes n_no_rope_layer_step (src/models/smollm3.cpp)
# Architectures whose q/k rows llama.cpp rotates as adjacent pairs (LLAMA_ROPE_TYPE_NORM).
INTERLEAVED_ROPE = ("llama", "smollm3")
# Architectures whose converter writes q, k and v as one attn_qkv matrix.
FUSED_QKV = ("gpt2", "phi3", "gptneox", "falcon")
LAYERNORM_ARCHS = ("gpt2", "gptneox", "falcon", "phi2")


# ------------------------------------------------------------------------ RoPE layouts
def to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (or biases) from the rotate-half layout to GGML's adjacent-pair layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `to_interleaved`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------ tensor names
_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "pos_embeddings": "position_embd", "norm": "output_norm",
                 "lm_head": "output"}
_BLOCK_NAMES: dict[str, str | tuple[str, ...]] = {
    "attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn_post_norm": "post_attention_norm",
    "mlp_post_norm": "post_ffw_norm", "attn.q_norm": "attn_q_norm", "attn.k_norm": "attn_k_norm",
    "attn.qkv_proj": ("attn_q", "attn_k", "attn_v"), "attn.o_proj": "attn_output",
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"), "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.router": "ffn_gate_inp", "mlp.shared.gate_up_proj": ("ffn_gate_shexp", "ffn_up_shexp"),
    "mlp.shared.down_proj": "ffn_down_shexp", "mlp.shared_gate": "ffn_gate_inp_shexp",
    "attn.sub_norm": "attn_sub_norm", "mlp.sub_norm": "ffn_sub_norm"}
# model.MoE's stacked experts (parameters of the mlp module itself, no `.weight`)
_EXPERT_NAMES = {"gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "down_proj": ("ffn_down_exps",)}


def _is_experts(ours: str) -> bool:
    return ours.startswith("layers.") and ours.endswith((".mlp.gate_up_proj", ".mlp.down_proj"))


def gguf_names(config: Config, ours: str) -> tuple[str, ...]:
    """llama.cpp's name(s) for one of our tensors: one, or the parts our fused matrix splits into."""
    arch = ARCHITECTURES[config.family]
    if _is_experts(ours):
        i, kind = ours.split(".")[1], ours.rsplit(".", 1)[1]
        return tuple(f"blk.{i}.{name}.weight" for name in _EXPERT_NAMES[kind])
    module, kind = ours.rsplit(".", 1)
    if not module.startswith("layers."):
        return (f"{_GLOBAL_NAMES[module]}.{kind}",)
    _, i, sub = module.split(".", 2)
    theirs = _BLOCK_NAMES[sub]
    if sub == "attn.qkv_proj" and arch in FUSED_QKV:
        theirs = "attn_qkv"
    elif sub == "mlp.gate_up_proj" and arch == "phi3":
        theirs = "ffn_up"  # [gate; up], llama.cpp's fused SwiGLU input
    elif arch == "falcon" and config.parallel == "two-norms":  # Falcon-40B: ln_mlp, ln_attn
        theirs = {"mlp_norm": "attn_norm", "attn_norm": "attn_norm_2"}.get(sub, theirs)
    return tuple(f"blk.{i}.{name}.{kind}" for name in ((theirs,) if isinstance(theirs, str) else theirs))


def _split_sizes(config: Config, ours: str) -> list[int]:
    if ".qkv_proj." in ours:
        return [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
    if ".shared." in ours:
        return [config.shared_expert_size] * 2
    if _is_experts(ours):  # each expert's gate rows, then its up rows
        return [config.moe_intermediate_size or config.intermediate_size] * 2
    return [config.intermediate_size] * 2


def _split_dim(ours: str) -> int:
    """The dimension our fused tensor splits along: the rows, or each expert's rows (dim 1)."""
    return 1 if _is_experts(ours) else 0


def _interleaved_rope(config: Config) -> bool:
    return ARCHITECTURES[config.family] in INTERLEAVED_ROPE


# ------------------------------------------------------------------------------ reading
def is_gguf_file(path: Path) -> bool:
    """Recognised by content (the magic bytes), never by the file name."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _swa_layers(meta: dict, arch: str, n_layer: int, path: Path) -> list[bool]:
    """Which layers slide (llama.cpp's is_swa): the per-layer array, or every n-th global."""
    value = meta.get(f"{arch}.attention.sliding_window_pattern", SWA_PATTERN.get(arch, 0))
    if isinstance(value, (list, tuple, np.ndarray)):
        flags = [bool(v) for v in value]
        if len(flags) != n_layer:
            raise CheckpointError(f"{path}: {arch}.attention.sliding_window_pattern has {len(flags)} entries for "
                                  f"{n_layer} blocks")
        return flags
    n = int(value)
    return [n == 0 or i % n < n - 1 for i in range(n_layer)]


def _global_every(flags: list[bool], path: Path) -> int | None:
    """k with layer i global exactly when (i + 1) % k == 0 (None: no global layer)."""
    is_global = [not f for f in flags]
    if not any(is_global):
        return None
    k = is_global.index(True) + 1
    if any(g != ((i + 1) % k == 0) for i, g in enumerate(is_global)):
        raise CheckpointError(f"{path}: sliding-window layers {[i for i, f in enumerate(flags) if f]} do not leave "
                              "every k-th layer global, the only pattern emergence has")
    return k


def _float(value) -> float:
    """A float from the metadata (stored as F32), as the shortest decimal that is that F32:
    the 1e-6 a config says, not 9.999999974752427e-07."""
    return float(str(np.float32(value)))


def gemma_attention_scale(arch: str, n_layer: int, n_embd: int, n_head: int, head_dim: int) -> float:
    """The q.k scale llama.cpp's gemma2/gemma3 use whatever the file says (load_arch_hparams):
    1/sqrt(n_embd / n_head) for the 27B shapes (46 or 62 blocks), else 1/sqrt(head_dim)."""
    big = n_layer == {"gemma2": 46, "gemma3": 62}[arch]
    return float(n_embd // n_head if big else head_dim) ** -0.5


def config_from_gguf(meta: dict, tensor_shapes: dict[str, tuple[int, ...]], path: Path) -> Config:
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(FAMILIES)})")

    def need(key: str):
        value = meta.get(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    if "token_embd.weight" not in tensor_shapes:
        raise CheckpointError(f"{path}: no token_embd.weight tensor (a vocabulary-only GGUF file?)")
    vocab, n_embd = tensor_shapes["token_embd.weight"]
    n_head = int(need("attention.head_count"))
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    if any(isinstance(v, (list, tuple, np.ndarray)) for v in (n_kv, need("feed_forward_length"))):
        raise CheckpointError(f"{path}: per-layer head counts or MLP widths are not supported")
    head_dim = int(meta.get(f"{arch}.attention.key_length", int(need("embedding_length")) // max(n_head, 1)))
    if int(meta.get(f"{arch}.attention.value_length", head_dim)) != head_dim:
        raise CheckpointError(f"{path}: keys and values of different widths are not supported")
    n_layer = int(need("block_count"))
    common = dict(name=str(meta.get("general.name", path.stem)), vocab_size=int(vocab),
                  block_size=int(need("context_length")), n_layer=n_layer, n_head=n_head,
                  n_embd=int(need("embedding_length")), n_kv_head=int(n_kv), head_dim=head_dim,
                  intermediate_size=int(need("feed_forward_length")),
                  tie_embeddings="output.weight" not in tensor_shapes,
                  bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                  pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if int(n_embd) != common["n_embd"]:
        raise CheckpointError(f"{path}: token_embd.weight is {n_embd} wide, the metadata says {common['n_embd']}")
    if arch == "gpt2":
        switches = dict(family="gpt2", norm="layernorm", norm_eps=_float(need("attention.layer_norm_epsilon")),
                        mlp="gelu", position="learned", bias=True)
    else:
        switches = _rope_switches(arch, meta, head_dim, path)
        switches.update(_arch_switches(arch, meta, tensor_shapes, common, path))
        switches.update(_moe_switches(arch, meta, tensor_shapes, common, path))
        if switches.get("n_experts") and arch == "llama":
            switches["family"] = "mixtral"
        eps_key = "attention.layer_norm_epsilon" if arch in LAYERNORM_ARCHS else "attention.layer_norm_rms_epsilon"
        switches["norm_eps"] = _float(need(eps_key))
    try:
        return Config(**common, **switches)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _rope_switches(arch: str, meta: dict, head_dim: int, path: Path) -> dict:
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim and arch not in ("phi3", "gptneox", "phi2"):
        raise CheckpointError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dimensions) is not supported "
                              f"for GGUF {arch}")
    return dict(position="rope", rope_theta=_float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
                rotary_dim=None if rope_dims == head_dim else rope_dims)


def _arch_switches(arch: str, meta: dict, shapes: dict, common: dict, path: Path) -> dict:
    """The switches of a llama.cpp architecture: fixed by its graph, or read from its metadata
    and tensors as its loader reads them."""
    if arch in ("llama", "qwen2"):  # the families before issue 16
        window = meta.get(f"{arch}.attention.sliding_window")
        return dict(family="qwen2" if arch == "qwen2" else ("mistral" if window else "llama"), norm="rmsnorm",
                    mlp="swiglu", qkv_bias=arch == "qwen2", sliding_window=int(window) if window else None)
    def key(name: str, default=None):
        return meta.get(f"{arch}.{name}", default)

    out = {name: values[0] for name, values in ARCH_SWITCHES[arch].items() if name != "tie_embeddings"}
    out["family"] = FAMILIES[arch]
    if "qkv_bias" not in ARCH_SWITCHES[arch]:  # optional q/k/v biases (llama.cpp's create_tensor_qkv)
        out["qkv_bias"] = "blk.0.attn_q.bias" in shapes or "blk.0.attn_qkv.bias" in shapes
    n_layer = common["n_layer"]
    if arch in ("gemma2", "gemma3"):
        window = int(key("attention.sliding_window", 4096 if arch == "gemma2" else 0))
        # a gemma2 window as long as the context is none (how we write a model without one)
        windowed = window > 0 and not (arch == "gemma2" and window >= common["block_size"])
        flags = _swa_layers(meta, arch, n_layer, path) if windowed else [False] * n_layer
        if any(flags):
            out.update(sliding_window=window, global_every=_global_every(flags, path))
        out["attention_scale"] = gemma_attention_scale(arch, n_layer, common["n_embd"], common["n_head"],
                                                       common["head_dim"])
        out["final_softcap"] = key("final_logit_softcapping", 30.0 if arch == "gemma2" else None)
        if out["final_softcap"] is not None:
            out["final_softcap"] = _float(out["final_softcap"]) or None  # gemma3: 0 means none
        if arch == "gemma2":
            out["attn_softcap"] = _float(key("attn_logit_softcapping", 50.0))
            swa_theta = key("rope.freq_base_swa")
            if swa_theta is not None and float(swa_theta) != float(key("rope.freq_base", 10000.0)):
                raise CheckpointError(f"{path}: a gemma2 file with another RoPE base in its windowed layers "
                                      "(rope.freq_base_swa) is not supported")
        elif any(flags):
            out["rope_local_theta"] = _float(key("rope.freq_base_swa", 10000.0))
    elif arch == "phi3":
        window = int(key("attention.sliding_window", 0))
        out["sliding_window"] = window or None
    elif arch == "smollm3":
        out["nope_every"] = SMOLLM3_NOPE_EVERY  # a pattern longer than the model marks no layer
    elif arch == "olmo2" and int(key("attention.sliding_window", 0)) > 0:
        raise CheckpointError(f"{path}: an olmo2 file with sliding windows (OLMo 3) is not supported")
    elif arch == "gptneox":
        out["parallel"] = "two-norms" if key("use_parallel_residual", True) else None
    elif arch == "falcon":
        out["parallel"] = "two-norms" if "blk.0.attn_norm_2.weight" in shapes else "shared-norm"
    return out


def _moe_switches(arch: str, meta: dict, shapes: dict, common: dict, path: Path) -> dict:
    """The expert switches of a file (none without `expert_count`), after checking that its
    expert tensors hold that many experts."""
    count, used = meta.get(f"{arch}.expert_count"), meta.get(f"{arch}.expert_used_count")
    if any(isinstance(v, (list, tuple, np.ndarray)) for v in (count, used)):
        raise CheckpointError(f"{path}: per-layer expert counts are not supported")
    routers = [f"blk.{i}.ffn_gate_inp.weight" for i in range(common["n_layer"])]
    if not count:
        said = f"lacks {arch}.expert_count" if count is None else f"has {arch}.expert_count = 0"
        if arch in MOE_ARCHS:
            raise CheckpointError(f"{path}: GGUF metadata {said} (llama.cpp's {arch} needs experts)")
        stray = next((name for name in routers if name in shapes), None)
        if stray is not None:
            raise CheckpointError(f"{path}: {stray} is an expert router, but the metadata {said}")
        return {}
    if not used:
        said = f"lacks {arch}.expert_used_count" if used is None else f"has {arch}.expert_used_count = 0"
        raise CheckpointError(f"{path}: GGUF metadata {said} ({arch}.expert_count is {count})")
    count, used = int(count), int(used)
    for i in range(common["n_layer"]):
        for kind in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            shape = shapes.get(f"blk.{i}.{kind}.weight")
            if shape is not None and shape[0] != count:
                raise CheckpointError(f"{path}: {arch}.expert_count is {count}, but blk.{i}.{kind}.weight holds "
                                      f"{shape[0]} experts (shape {tuple(shape)})")
    out = {name: values[0] for name, values in MOE_SWITCHES[arch].items()}
    out.update(n_experts=count, experts_per_token=used)
    if arch == "qwen2moe":  # llama.cpp's defaults: n_ff / n_expert_used experts, an n_ff shared expert
        ff = common["intermediate_size"]
        out["moe_intermediate_size"] = int(meta.get(f"{arch}.expert_feed_forward_length", ff // used))
        out["shared_expert_size"] = int(meta.get(f"{arch}.expert_shared_feed_forward_length", ff))
    return out


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = None,
              dequantize: bool = False) -> tuple[Transformer, Config, Tokenizer]:
    """A GGUF model file -> (model, config, tokenizer).

    Matrices in a ggml block format emergence has a layer for (quant.GGML_FORMATS: Q8_0, Q4_0,
    Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) stay in it, their blocks unchanged (`_packed`): a
    GGMLLinear per layer (a stack of experts: one per expert), a quantized token_embd a
    GGMLEmbedding, and a tied head a GGMLLinear over the embedding's own blocks. A tensor that is
    one of the file's is a view of the file's memory map; q/k/v and gate/up, which our layers
    fuse, are read from the file into one buffer, or, where their types differ (llama.cpp's _M
    mixes), kept apart in a StackedLinear. Quantized matrices without a layer (Q2_K, Q3_K, ...)
    are dequantized, to bf16 by default; `model.gguf_dequantized` names them (GGUF name ->
    type), as `emergence info` reports.
    TQ1_0/TQ2_0 layers become TernaryLinear (`_ternary_layers`).

    dtype: the float tensors' dtype and so the activations' (default: the float matrices' type
    where the file has only one, bf16 where a quantized matrix was dequantized, else float32).
    dequantize: every tensor dequantized to float `dtype` instead (default float32 for a
    quantized file), as the file's values.
    """
    path = Path(path)
    f = read_gguf(path)
    shapes = {name: info.torch_shape for name, info in f.tensors.items()}
    config = config_from_gguf(f.metadata, shapes, path)
    used = set()
    if "rope_freqs.weight" in f.tensors and ARCHITECTURES[config.family] == "llama":
        # Llama-3 scaling as per-frequency divisors
        config.rope_scaling = {"factors": f.tensor("rope_freqs.weight").float().tolist()}
        used.add("rope_freqs.weight")
    model = empty_model(config)
    plan = _packed(f, model, dequantize)
    dequantized = {name: f.tensors[name].type.name for name in plan.dequantized}
    if dtype is None:  # the matrices' type (routers are F32 in any file); bf16 where any is dequantized
        kinds = {info.type for name, info in f.tensors.items()
                 if len(info.shape) >= 2 and not any(part in name for part in F32_TENSORS)}
        dtype = torch.bfloat16 if dequantized and not dequantize else torch.float32 if len(kinds) != 1 else \
            {GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}.get(kinds.pop(), torch.float32)

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in f.tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing (a partial file, or metadata describing "
                                  "another model)")
        if tuple(f.tensors[name].torch_shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(f.tensors[name].torch_shape)}, the metadata "
                                  f"implies {tuple(shape)}")
        return f.tensor(name).to(dtype)

    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    H, K = config.n_head, config.n_kv_head
    state = {}
    for ours, tensor in expected.items():
        names = gguf_names(config, ours)
        if ours in plan.formats:
            used.update(names)
            continue
        if len(names) == 1:
            used.add(names[0])
            if ours.endswith(".shared_gate.weight") and names[0] in f.tensors \
                    and tuple(f.tensors[names[0]].torch_shape) == tuple(tensor.shape[1:]):
                state[ours] = get(names[0], tensor.shape[1:])[None]  # a 1-D gate, llama.cpp's {n_embd}
            else:
                state[ours] = get(names[0], tensor.shape)
            continue
        sizes, dim = _split_sizes(config, ours), _split_dim(ours)

        def part(size: int) -> tuple[int, ...]:
            return (*tensor.shape[:dim], size, *tensor.shape[dim + 1:])

        fused = names[0].replace(".attn_q.", ".attn_qkv.")
        if len(names) == 3 and names[0] not in f.tensors and fused in f.tensors:
            # one attn_qkv where the converter now writes three (older Phi-2 files): llama.cpp reads either
            used.add(fused)
            parts = list(get(fused, part(sum(sizes))).split(sizes))
        else:
            used.update(names)
            parts = [get(name, part(size)) for name, size in zip(names, sizes)]
        if _interleaved_rope(config) and ".qkv_proj." in ours:
            parts[0], parts[1] = from_interleaved(parts[0], H), from_interleaved(parts[1], K)
        state[ours] = torch.cat(parts, dim=dim)
    extra = [name for name in f.tensors if name not in used]
    if extra:
        raise CheckpointError(f"{path}: tensor {extra[0]} has no place in the {ARCHITECTURES[config.family]} model "
                              f"its metadata describes (block_count={config.n_layer}): {len(extra)} tensors left over")
    _swap_packed(model, f, plan, state, dtype)
    model = finish_loading(model, {k: v.contiguous() for k, v in state.items()})
    ternary = {n for n, info in f.tensors.items() if info.type in TERNARY_TYPES}
    if ternary:
        _ternary_layers(model, config, ternary)
    model.gguf_dequantized = dequantized
    tokenizer = tokenizer_from_gguf_metadata(f.metadata)
    return model, config, tokenizer


@dataclass
class _Packing:
    """Which of our tensors keep a GGUF file's blocks: `formats` maps our name
    ("layers.0.attn.qkv_proj.weight", "tok_embeddings.weight", a stack "layers.0.mlp.down_proj")
    to the ggml format of each of its GGUF parts (None: a float part, in a StackedLinear);
    `dequantized` lists the quantized GGUF tensors that are not kept."""

    formats: dict[str, list[str | None]]
    dequantized: list[str]


def _packed(f, model: Transformer, dequantize: bool) -> _Packing:
    """The packing plan of file `f` for `model` (its skeleton on the meta device): every linear
    layer, expert stack and token embedding whose GGUF tensors hold a format of
    quant.GGML_FORMATS (all one format, or, for a linear layer, some of them: a StackedLinear)."""
    from ..model import MoE
    from ..quant.linear import GGML_FORMATS

    by_type = {qtype: name for name, qtype in GGML_FORMATS.items()}
    formats: dict[str, list[str | None]] = {}
    config = model.config
    if not dequantize and not config.ternary:
        candidates = ["tok_embeddings.weight"]
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith((".router", ".shared_gate")) \
                    and not (name == "lm_head" and config.tie_embeddings):
                candidates.append(f"{name}.weight")
            elif isinstance(module, MoE):
                candidates += [f"{name}.{leaf}" for leaf in ("gate_up_proj", "down_proj")]
        for ours in candidates:
            names = gguf_names(config, ours)
            if not all(name in f.tensors for name in names):
                continue  # missing (load_gguf names it) or an older file's fused attn_qkv: read as float
            parts = [by_type.get(f.tensors[name].type) for name in names]
            one_format = len(set(parts)) == 1 and parts[0] is not None
            stacked = len(parts) > 1 and any(parts) and ours.endswith(".weight")  # a fused linear layer's parts
            if one_format or stacked:
                formats[ours] = parts
    kept = {name for ours, parts in formats.items() for name, fmt in zip(gguf_names(config, ours), parts) if fmt}
    return _Packing(formats, [name for name, info in f.tensors.items() if info.type not in TORCH_DTYPES
                              and info.type not in TERNARY_TYPES and name not in kept])


def _read_packed(f, config: Config, ours: str) -> torch.Tensor:
    """The blocks of our tensor `ours` whose GGUF parts share one format (uint8 (N, row bytes);
    a stack of experts (E, N, row bytes)): a view of the file's map where it is one GGUF tensor,
    else its parts read into one buffer, q and k rows back in our order (`_rope_order`)."""
    names = gguf_names(config, ours)
    if len(names) == 1:
        return f.blocks(names[0])
    parts = [f.tensors[name] for name in names]
    row_bytes = parts[0].nbytes // math.prod(parts[0].torch_shape[:-1])
    if _is_experts(ours):  # (E, rows, bytes) per part, fused per expert: [gate_e; up_e]
        E, rows = parts[0].torch_shape[0], [p.torch_shape[1] for p in parts]
        out = torch.empty(E, sum(rows), row_bytes, dtype=torch.uint8)
        for e in range(E):
            start = 0
            for name, n in zip(names, rows):
                f.read_rows(name, out[e, start:start + n], first=e * n)
                start += n
        return out
    rows = [p.torch_shape[0] for p in parts]
    out = torch.empty(sum(rows), row_bytes, dtype=torch.uint8)
    start = 0
    for i, (name, n) in enumerate(zip(names, rows)):
        f.read_rows(name, out[start:start + n])
        out[start:start + n] = _rope_order(config, ours, i, out[start:start + n])
        start += n
    return out


def _rope_heads(config: Config, ours: str, part: int) -> int | None:
    """The heads whose rows part `part` of our fused tensor `ours` permutes back to our order (q
    and k, where llama.cpp stores them in adjacent pairs: INTERLEAVED_ROPE), or None."""
    if _interleaved_rope(config) and ".qkv_proj." in ours and part < 2:
        return config.n_head if part == 0 else config.n_kv_head
    return None


def _rope_order(config: Config, ours: str, part: int, rows: torch.Tensor) -> torch.Tensor:
    """Part `part` of our fused tensor `ours` (float rows or block rows) in our row order."""
    heads = _rope_heads(config, ours, part)
    return rows if heads is None else from_interleaved(rows, heads)


def _swap_packed(model: Transformer, f, plan: _Packing, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Put the packed layers of `plan` into `model` (on the meta device, before finish_loading),
    each with its blocks and with its bias taken out of `state`."""
    from ..quant.linear import GGMLEmbedding, GGMLLinear, StackedLinear

    config = model.config

    def linear(blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None) -> GGMLLinear:
        layer = GGMLLinear(in_features, blocks.shape[0], bias is not None, device="meta", ggml_format=fmt)
        layer.blocks = blocks
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return layer

    def stack(ours: str, formats: list[str | None], bias: torch.Tensor | None) -> StackedLinear:
        parts = []
        for i, (name, fmt) in enumerate(zip(gguf_names(config, ours), formats)):
            info = f.tensors[name]
            if fmt is None:  # a float part
                weight = _rope_order(config, ours, i, f.tensor(name).to(dtype))
                part = nn.Linear(info.torch_shape[1], info.torch_shape[0], bias=False, device="meta")
                part.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
            else:
                blocks = f.blocks(name)  # a view of the map, or permuted rows: a copy
                if _rope_heads(config, ours, i) is not None:
                    blocks = torch.empty_like(blocks)
                    f.read_rows(name, blocks)
                    blocks = _rope_order(config, ours, i, blocks).contiguous()
                part = linear(blocks, fmt, info.torch_shape[1], None)
            parts.append(part)
        return StackedLinear(parts, None if bias is None else bias.to(dtype))

    for ours, formats in plan.formats.items():
        fmt = formats[0]
        in_features = f.tensors[gguf_names(config, ours)[0]].torch_shape[-1]
        if ours == "tok_embeddings.weight":
            table = GGMLEmbedding(config.vocab_size, config.n_embd, ggml_format=fmt, device="meta", dtype=dtype)
            table.blocks, table.probe = _read_packed(f, config, ours), torch.empty(0, dtype=dtype)
            model.tok_embeddings = table
            if config.tie_embeddings:
                model.lm_head = table.tied_head(state.pop("lm_head.bias", None))
            continue
        if _is_experts(ours):  # one layer per expert, as quantize_model unstacks them
            parent, _, leaf = ours.rpartition(".")
            moe = model.get_submodule(parent)
            delattr(moe, leaf)
            setattr(moe, leaf, nn.ModuleList(linear(b, fmt, in_features, None) for b in _read_packed(f, config, ours)))
            continue
        module = ours.removesuffix(".weight")
        parent, _, leaf = module.rpartition(".")
        bias = state.pop(f"{module}.bias", None)
        layer = linear(_read_packed(f, config, ours), fmt, in_features, bias) if len(set(formats)) == 1 \
            else stack(ours, formats, bias)
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)


def _ternary_layers(model: Transformer, config: Config, ternary: set[str]) -> None:
    """Turn each block linear layer read from TQ1_0/TQ2_0 tensors only, whose nonzero values share
    one magnitude, into a TernaryLinear (values, that scale, 8-bit activations) in place."""
    from ..quant.linear import TernaryLinear

    for name, linear in _block_linears(model).items():
        if not isinstance(linear, nn.Linear) or linear.bias is not None \
                or not set(gguf_names(config, f"{name}.weight")) <= ternary:
            continue
        w = linear.weight.detach().float()
        magnitudes = w.abs()[w != 0].unique()
        if magnitudes.numel() > 1:
            continue  # several scales (BitNet's separately scaled q, k and v): kept float
        layer = TernaryLinear(linear.in_features, linear.out_features, bias=False, act_bits=8)
        layer.qweight = torch.sign(w).to(torch.int8)
        layer.scale = magnitudes.reshape(1) if magnitudes.numel() else torch.ones(1)
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, layer)


# ------------------------------------------------------------------------------ writing
def check_gguf_representable(config: Config) -> None:
    """Raise a one-line ConfigError, naming the switch, for a model llama.cpp's architecture for
    its family would compute differently."""
    if config.family not in ARCHITECTURES:
        raise InvalidArgument(f"no GGUF architecture for family {config.family!r}")
    arch = ARCHITECTURES[config.family]
    where = f"llama.cpp's {arch} architecture"
    _check_experts_representable(config, arch, where)
    if arch not in ARCH_SWITCHES:
        return
    for name, allowed in ARCH_SWITCHES[arch].items():
        value = getattr(config, name)
        if value not in allowed:
            wanted = " or ".join(repr(v) for v in allowed)
            raise ConfigError(f"{where} cannot represent {name}={value!r} (it has {name}={wanted})")
    if arch in ("phi3", "olmo2", "gptneox", "falcon", "phi2", "qwen2moe", "olmoe", "bitnet") \
            and config.n_head * config.head_dim != config.n_embd:
        raise ConfigError(f"{where} needs n_head * head_dim == n_embd, got head_dim={config.head_dim}")
    if arch in ("gemma2", "gemma3"):
        theirs = gemma_attention_scale(arch, config.n_layer, config.n_embd, config.n_head, config.head_dim)
        ours = config.attention_scale if config.attention_scale is not None else config.head_dim ** -0.5
        if not math.isclose(ours, theirs, rel_tol=1e-6):
            raise ConfigError(f"{where} scales q.k by {theirs:.6g} whatever the file says; attention_scale="
                              f"{config.attention_scale!r} differs")
        if arch == "gemma2" and (config.attn_softcap is None or config.final_softcap is None):
            name = "attn_softcap" if config.attn_softcap is None else "final_softcap"
            raise ConfigError(f"{where} always soft-caps scores and logits; {name}=None cannot be written")
    if arch == "smollm3":
        theirs = [(i + 1) % SMOLLM3_NOPE_EVERY == 0 for i in range(config.n_layer)]
        if [config.layer_rope(i) is None for i in range(config.n_layer)] != theirs:
            raise ConfigError(f"{where} drops RoPE in every {SMOLLM3_NOPE_EVERY}th layer (hard-coded); "
                              f"nope_every={config.nope_every!r} differs")


def _check_experts_representable(config: Config, arch: str, where: str) -> None:
    """The expert switches llama.cpp's graph fixes (MOE_SWITCHES), as one-line ConfigErrors."""
    if not config.n_experts:
        if arch in MOE_ARCHS:
            raise ConfigError(f"{where} needs experts (n_expert > 0); n_experts=0 cannot be written")
        return
    if arch not in MOE_SWITCHES:
        raise ConfigError(f"{where} has no experts; n_experts={config.n_experts} cannot be written")
    for name, allowed in MOE_SWITCHES[arch].items():
        value = getattr(config, name)
        if value not in allowed:
            wanted = " or ".join(repr(v) for v in allowed)
            raise ConfigError(f"{where} cannot represent {name}={value!r} (its experts have {name}={wanted})")
    if arch == "qwen2moe" and not config.shared_expert_size:
        raise ConfigError(f"{where} always runs a shared expert; shared_expert_size=None cannot be written")
    if arch == "olmoe" and config.n_kv_head != config.n_head:
        raise ConfigError(f"{where} normalises k over n_embd (attn_k_norm), so it needs n_kv_head == n_head, "
                          f"got n_kv_head={config.n_kv_head}")
    if arch != "qwen2moe" and config.moe_intermediate_size not in (None, config.intermediate_size):
        raise ConfigError(f"{where} has one MLP width (feed_forward_length) for its experts; moe_intermediate_size="
                          f"{config.moe_intermediate_size} differs from intermediate_size={config.intermediate_size}")


def _matrix_type(requested: GGMLType, shape: tuple[int, ...]) -> GGMLType:
    if shape[-1] % BLOCK_SIZES[requested][0] == 0:
        return requested
    fallback = K_FALLBACK.get(requested, GGMLType.F16)
    return fallback if shape[-1] % BLOCK_SIZES[fallback][0] == 0 else GGMLType.F16


def _encode(tensor: torch.Tensor, qtype: GGMLType) -> np.ndarray | torch.Tensor:
    t = tensor.detach().float().contiguous()
    if qtype == GGMLType.F32:
        return t
    if qtype == GGMLType.F16:
        return t.half()
    if qtype == GGMLType.BF16:
        return t.bfloat16()
    return quantize(t, qtype)


def _block_linears(model: Transformer) -> dict[str, nn.Module]:
    """The blocks' linear layers by name (float, BitLinear or quantized; routers and shared-expert
    gates excluded: they stay in full precision as llama.cpp keeps them)."""
    from ..quant.linear import QuantizedLinear, StackedLinear

    return {name: m for name, m in model.named_modules() if name.startswith("layers.")
            and isinstance(m, (nn.Linear, QuantizedLinear, StackedLinear))
            and not name.endswith((".router", ".shared_gate"))
            and not name.rsplit(".", 1)[1].isdigit()}  # quantize_model's experts, one layer each


def _is_ternary(module: nn.Module) -> bool:
    from ..quant.linear import TernaryLinear

    return isinstance(module, (TernaryLinear, BitLinear))


def ternary_rounding_error(model: Transformer) -> tuple[float, int]:
    """(relative RMS error, matrix count) of rounding the blocks' non-ternary matrices to BitNet's
    ternary values times their absmean: sqrt(sum |W - Q(W)|^2 / sum |W|^2) over them."""
    from ..quant.methods import quantize_ternary

    num = den = 0.0
    count = 0
    for m in _block_linears(model).values():
        if _is_ternary(m):
            continue
        w = (m.dequantize() if not isinstance(m, nn.Linear) else m.weight).detach().float()
        values, scale = quantize_ternary(w)
        num += float(((values.float() * scale - w) ** 2).sum())
        den += float((w ** 2).sum())
        count += 1
    return (math.sqrt(num / den) if den > 0 else 0.0), count


def check_ternary_export(model: Transformer, file_type: str, force: bool = False) -> None:
    """A TQ1_0/TQ2_0 export of a model whose layers are not ternary: a one-line ConfigError with the
    quality loss measured on the model, or with `force` a warning saying it."""
    if FILE_TYPES.get(file_type) not in TERNARY_TYPES:
        return
    error, count = ternary_rounding_error(model)
    if count == 0:
        return
    total = len(_block_linears(model))
    what = (f"{count} of the {total} block matrices of this model are not ternary (it was not trained ternary): "
            f"{file_type.upper()} rounds them to BitNet's {{-1, 0, 1}} x absmean, a relative RMS weight error of "
            f"{error:.0%}; expect a model not trained for ternary weights to lose most of its quality")
    if not force:
        raise ConfigError(f"{what}. Export a ternary checkpoint (a model trained with ternary=True), choose another "
                          "--type, or pass --force to round it anyway")
    warnings.warn(what, stacklevel=3)


def _float_state(model: Transformer, ternarize: bool) -> dict[str, torch.Tensor]:
    """The model's state under canonical names with every quantized layer's `weight` as float
    (dequantized) and every BitLinear's as the ternary weight it computes with; with `ternarize`
    the other block matrices rounded to ternary as quantize_model(model, "ternary") rounds them."""
    from ..quant.linear import GGMLEmbedding, QuantizedLinear
    from ..quant.methods import quantize_ternary

    linears = _block_linears(model)
    if isinstance(model.lm_head, QuantizedLinear):  # a quantized GGUF's head (maybe tied to its table)
        linears["lm_head"] = model.lm_head
    if isinstance(model.tok_embeddings, GGMLEmbedding):
        linears["tok_embeddings"] = model.tok_embeddings
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module_name, leaf = key.rsplit(".", 1)
        if ".parts." in module_name and module_name.split(".parts.")[0] in linears:  # a StackedLinear's part
            module_name, leaf = module_name.split(".parts.")[0], "part"
        module = linears.get(module_name)
        if module is None:
            if isinstance(model.get_submodule(module_name), QuantizedLinear):  # an expert, quantized on its own
                raise InvalidArgument(f"{module_name} is a quantized expert: export the full-precision model instead")
            out[key] = tensor
            continue
        if leaf == "bias":
            out[key] = tensor
            continue
        if f"{module_name}.weight" in out:
            continue  # a quantized layer's other buffers (its scale, ...)
        w = (module.weight if isinstance(module, nn.Linear) else module.dequantize()).detach().float()
        if module_name in ("lm_head", "tok_embeddings"):
            out[f"{module_name}.weight"] = w
            continue
        if isinstance(module, BitLinear) or (ternarize and not _is_ternary(module)):
            values, scale = quantize_ternary(w)
            w = values.float() * scale
        out[f"{module_name}.weight"] = w
    order = {name: i for i, name in enumerate(empty_model(model.config).state_dict())}  # a packed layer lists
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))  # its bias first


def gguf_tensors(model: Transformer, file_type: str,
                 force: bool = False) -> list[tuple[str, GGMLType, tuple[int, ...], object]]:
    """Our model's tensors in llama.cpp's names, layout and types. TQ1_0/TQ2_0 need ternary
    layers, or `force` (check_ternary_export)."""
    if file_type not in FILE_TYPES:
        raise InvalidArgument(f"unknown GGUF type {file_type!r} (one of {', '.join(FILE_TYPES)})")
    requested = FILE_TYPES[file_type]
    config = model.config
    check_gguf_representable(config)
    check_ternary_export(model, file_type, force)
    H, K = config.n_head, config.n_kv_head
    named: list[tuple[str, torch.Tensor]] = []
    for ours, tensor in _float_state(model, ternarize=requested in TERNARY_TYPES).items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        names, tensor = gguf_names(config, ours), tensor.detach()
        if len(names) == 1:
            named.append((names[0], tensor))
            continue
        parts = list(tensor.split(_split_sizes(config, ours), dim=_split_dim(ours)))
        if _interleaved_rope(config) and ".qkv_proj." in ours:
            parts[0], parts[1] = to_interleaved(parts[0], H), to_interleaved(parts[1], K)
        named += zip(names, parts)
    if config.rope_scaling is not None:
        base = rope_inv_freq(Config(**{**config.to_dict(), "rope_scaling": None}))
        named.append(("rope_freqs.weight", (base / rope_inv_freq(config)).float()))
    out = []
    for name, tensor in named:
        # matrices and stacked experts (3-D: blocks along each expert's rows) in the requested type
        qtype = _matrix_type(requested, tuple(tensor.shape)) if tensor.dim() >= 2 else GGMLType.F32
        if name == "rope_freqs.weight" or any(part in name for part in F32_TENSORS):
            qtype = GGMLType.F32
        elif requested in TERNARY_TYPES and tensor.dim() >= 2 and not name.startswith("blk."):
            qtype = GGMLType.F16  # token_embd and output: F16 in ternary files, as llama.cpp's converter writes
        out.append((name, qtype, tuple(tensor.shape), _encode(tensor, qtype)))
    return out


def _f32(value: float) -> GGUFValue:
    return GGUFValue(float(value), GGUFValueType.FLOAT32)


def gguf_metadata(config: Config, tokenizer: Tokenizer, file_type: str) -> dict:
    """The keys llama.cpp's converter writes for the family's architecture (and those its loader
    needs to run our model as we do: a Gemma window pattern other than its default, say)."""
    check_gguf_representable(config)
    arch = ARCHITECTURES[config.family]
    meta: dict = {"general.architecture": arch, "general.name": config.name,
                  "general.file_type": GGUFValue(LLAMA_FTYPE[file_type], GGUFValueType.UINT32),
                  f"{arch}.context_length": config.block_size, f"{arch}.embedding_length": config.n_embd,
                  f"{arch}.block_count": config.n_layer, f"{arch}.feed_forward_length": config.intermediate_size,
                  f"{arch}.attention.head_count": config.n_head}
    if arch == "gpt2":
        meta[f"{arch}.attention.layer_norm_epsilon"] = _f32(config.norm_eps)
        meta.update(tokenizer_to_gguf_metadata(tokenizer, config))
        return meta
    if arch != "gptneox" or config.n_kv_head != config.n_head:  # the gptneox converter writes no kv count
        meta[f"{arch}.attention.head_count_kv"] = config.n_kv_head
    if arch in LAYERNORM_ARCHS:
        meta[f"{arch}.attention.layer_norm_epsilon"] = _f32(config.norm_eps)
    else:
        meta[f"{arch}.attention.layer_norm_rms_epsilon"] = _f32(config.norm_eps)
    meta[f"{arch}.rope.freq_base"] = _f32(config.rope_theta)
    if arch != "falcon":  # llama.cpp's falcon rotates every dimension, and its converter says nothing
        meta[f"{arch}.rope.dimension_count"] = config.rotary_dim or config.head_dim
    if config.head_dim * config.n_head != config.n_embd or arch in ("qwen3", "gemma2", "gemma3"):
        meta[f"{arch}.attention.key_length"] = config.head_dim
        meta[f"{arch}.attention.value_length"] = config.head_dim
    if arch in ("llama", "qwen2") and config.sliding_window:
        meta[f"{arch}.attention.sliding_window"] = config.sliding_window
    if arch == "phi3":  # 0 for none, as its converter writes (llama.cpp disables Phi-3 windows anyway)
        meta[f"{arch}.attention.sliding_window"] = config.sliding_window or 0
    if arch in ("gemma2", "gemma3"):
        meta.update(_gemma_metadata(config, arch))
    if arch == "gptneox":
        meta[f"{arch}.use_parallel_residual"] = config.parallel is not None
    if arch == "falcon":
        meta[f"{arch}.tensor_data_layout"] = "jploski"  # q, k, v regrouped as [q; k; v]
    if arch == "smollm3":
        meta[f"{arch}.vocab_size"] = config.vocab_size
    if config.n_experts:
        meta.update(_expert_metadata(config, arch))
    meta.update(tokenizer_to_gguf_metadata(tokenizer, config))
    return meta


def _expert_metadata(config: Config, arch: str) -> dict:
    """The expert keys the converter writes: counts, and Qwen2-MoE's expert and shared widths
    (Mixtral's and OLMoE's experts are feed_forward_length wide)."""
    meta: dict = {f"{arch}.expert_count": config.n_experts, f"{arch}.expert_used_count": config.experts_per_token}
    if arch == "qwen2moe":
        meta[f"{arch}.expert_feed_forward_length"] = config.moe_intermediate_size or config.intermediate_size
        meta[f"{arch}.expert_shared_feed_forward_length"] = config.shared_expert_size
    return meta


def _gemma_metadata(config: Config, arch: str) -> dict:
    meta: dict = {}
    if arch == "gemma2":
        meta[f"{arch}.attn_logit_softcapping"] = _f32(config.attn_softcap)
    if config.final_softcap is not None:
        meta[f"{arch}.final_logit_softcapping"] = _f32(config.final_softcap)
    flags = [config.layer_window(i) is not None for i in range(config.n_layer)]
    if arch == "gemma2" and not any(flags):
        # llama.cpp's gemma2 always has windowed layers (an iSWA cache that asserts one, in
        # src/llama-model.cpp): a window as long as the context is no window.
        meta[f"{arch}.attention.sliding_window"] = config.block_size
        return meta
    if any(flags):
        meta[f"{arch}.attention.sliding_window"] = config.sliding_window
        if arch == "gemma3":  # the windowed layers' RoPE base (llama.cpp's default: 10000)
            meta[f"{arch}.rope.freq_base_swa"] = _f32(config.rope_local_theta or config.rope_theta)
    n = SWA_PATTERN[arch]
    if any(flags) and flags != [i % n < n - 1 for i in range(config.n_layer)]:
        meta[f"{arch}.attention.sliding_window_pattern"] = flags
    return meta


# --------------------------------------------------------------------------------- T5
def t5_gguf_tensors(model, file_type: str) -> list[tuple[str, GGMLType, tuple[int, ...], object]]:
    """A T5 in llama.cpp's `t5` names: enc.blk.N.* and dec.blk.N.* with separate q/k/v, the
    relative bias tables in each stack's first layer. llama.cpp applies no scaling before a
    tied head, so a v1.0 model (tied, scaled by d_model ** -0.5) gets an explicit output.weight
    holding the scaled embedding: the same logits."""
    if file_type not in FILE_TYPES:
        raise InvalidArgument(f"unknown GGUF type {file_type!r} (one of {', '.join(FILE_TYPES)})")
    c = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    inner, F = c.n_head * c.head_dim, c.intermediate_size

    def mlp(blk: str, ours: str) -> list[tuple[str, torch.Tensor]]:
        if c.mlp == "geglu":
            gate, up = state[ours + "mlp.gate_up_proj.weight"].split([F, F])
            named = [(blk + "ffn_gate.weight", gate), (blk + "ffn_up.weight", up)]
        else:
            named = [(blk + "ffn_up.weight", state[ours + "mlp.up_proj.weight"])]
        return named + [(blk + "ffn_down.weight", state[ours + "mlp.down_proj.weight"]),
                        (blk + "ffn_norm.weight", state[ours + "mlp_norm.weight"])]

    def self_attention(blk: str, ours: str) -> list[tuple[str, torch.Tensor]]:
        q, k, v = state[ours + "attn.qkv_proj.weight"].split([inner, inner, inner])
        return [(blk + "attn_norm.weight", state[ours + "attn_norm.weight"]), (blk + "attn_q.weight", q),
                (blk + "attn_k.weight", k), (blk + "attn_v.weight", v), (blk + "attn_o.weight", state[ours + "attn.o_proj.weight"])]

    named = [("token_embd.weight", state["tok_embeddings.weight"]),
             ("enc.output_norm.weight", state["encoder_norm.weight"]), ("dec.output_norm.weight", state["norm.weight"]),
             ("enc.blk.0.attn_rel_b.weight", state["encoder_bias.weight"]),  # (buckets, heads): ggml's {heads, buckets}
             ("dec.blk.0.attn_rel_b.weight", state["decoder_bias.weight"])]
    if not c.tie_embeddings:
        named.append(("output.weight", state["lm_head.weight"]))
    elif c.scale_head:
        named.append(("output.weight", state["tok_embeddings.weight"] * c.n_embd ** -0.5))
    for i in range(c.n_encoder_layer):
        blk, ours = f"enc.blk.{i}.", f"encoder_layers.{i}."
        named += self_attention(blk, ours) + mlp(blk, ours)
    for i in range(c.n_layer):
        blk, ours = f"dec.blk.{i}.", f"layers.{i}."
        k, v = state[ours + "cross_attn.kv_proj.weight"].split([inner, inner])
        named += self_attention(blk, ours) + mlp(blk, ours) + [
            (blk + "cross_attn_norm.weight", state[ours + "cross_norm.weight"]),
            (blk + "cross_attn_q.weight", state[ours + "cross_attn.q_proj.weight"]),
            (blk + "cross_attn_k.weight", k), (blk + "cross_attn_v.weight", v),
            (blk + "cross_attn_o.weight", state[ours + "cross_attn.o_proj.weight"])]
    requested = FILE_TYPES[file_type]
    out = []
    for name, tensor in named:
        plain = tensor.dim() < 2 or "attn_rel_b" in name  # norms and bias tables stay F32, as llama.cpp's converter
        qtype = GGMLType.F32 if plain else _matrix_type(requested, tuple(tensor.shape))
        out.append((name, qtype, tuple(tensor.shape), _encode(tensor, qtype)))
    return out


def t5_gguf_metadata(config, tokenizer: Tokenizer, file_type: str) -> dict:
    if config.max_distance != 128:
        raise InvalidArgument(f"llama.cpp's T5 fixes the relative attention's max distance at 128; this model "
                              f"uses {config.max_distance}")
    eps = GGUFValue(float(config.norm_eps), GGUFValueType.FLOAT32)
    meta = {"general.architecture": "t5", "general.name": config.name,
            "general.file_type": GGUFValue(LLAMA_FTYPE[file_type], GGUFValueType.UINT32),
            "t5.context_length": config.block_size, "t5.embedding_length": config.n_embd,
            "t5.feed_forward_length": config.intermediate_size, "t5.block_count": config.n_encoder_layer,
            "t5.decoder_block_count": config.n_layer, "t5.attention.head_count": config.n_head,
            "t5.attention.key_length": config.head_dim, "t5.attention.value_length": config.head_dim,
            "t5.attention.layer_norm_epsilon": eps, "t5.attention.layer_norm_rms_epsilon": eps,
            "t5.attention.relative_buckets_count": config.num_buckets,
            "t5.decoder_start_token_id": GGUFValue(config.decoder_start_token_id, GGUFValueType.UINT32)}
    meta.update(tokenizer_to_gguf_metadata(tokenizer, config))
    return meta


def save_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, file_type: str = "f32", *,
              force: bool = False) -> None:
    """Write a model and its tokenizer as one GGUF v3 file (atomically) that llama.cpp loads.
    `force`: write TQ1_0/TQ2_0 for a model whose layers are not ternary (rounding them)."""
    config = model.config
    if config.is_encoder_decoder:
        tensors = t5_gguf_tensors(model, file_type)
        write_gguf(path, t5_gguf_metadata(config, tokenizer, file_type), tensors)
        return
    if config.family not in ARCHITECTURES:
        raise InvalidArgument(f"no GGUF architecture for family {config.family!r}")
    if file_type not in FILE_TYPES:
        raise InvalidArgument(f"unknown GGUF type {file_type!r} (one of {', '.join(FILE_TYPES)})")
    metadata = gguf_metadata(config, tokenizer, file_type)  # refuses what llama.cpp cannot represent
    write_gguf(path, metadata, gguf_tensors(model, file_type, force))
