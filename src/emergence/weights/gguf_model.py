"""Models in GGUF files, llama.cpp's format: read them into our Transformer, write ours out.

llama.cpp names tensors per block (`blk.{i}.attn_q.weight`, ...) and keeps q, k and v (and
the SwiGLU gate and up projections) apart, where our model fuses them. For its "llama"
architecture, llama.cpp rotates adjacent pairs of each head's dimensions (GGML's "normal"
RoPE), while Hugging Face checkpoints and our model rotate the two halves; so the q and k
rows are permuted on the way out and back on the way in, as llama.cpp's own converter does.
Qwen2 ("neox" RoPE) and GPT-2 (no RoPE) need no permutation. Llama-3 rope scaling travels as
llama.cpp's `rope_freqs.weight` tensor of per-frequency divisors.

Norm weights are written as F32 and every matrix in the requested type (F32, F16, BF16 or a
ggml block format). A matrix whose rows do not fill whole blocks falls back as llama.cpp's
quantizer does: Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0 (rows of 32-multiples), and to F16
when its rows do not fill blocks of 32 either (every 32-block type goes straight to F16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import CheckpointError, InvalidArgument
from ..gguf import GGMLType, GGUFValue, GGUFValueType, read_gguf, write_gguf
from ..gguf.quants import BLOCK_SIZES, quantize
from ..gguf.vocab import tokenizer_from_gguf_metadata, tokenizer_to_gguf_metadata
from ..model import Transformer, empty_model, finish_loading, rope_inv_freq
from ..tokenizer import Tokenizer

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}  # our family -> GGUF arch
# The types we write: those our block quantizers produce (Q2_K and Q3_K are read, not written).
FILE_TYPES = {t.name.lower(): t for t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0, GGMLType.Q4_0,
                                          GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K,
                                          GGMLType.Q5_K, GGMLType.Q6_K)}
# llama.cpp's `general.file_type` (enum llama_ftype) for each file type we write. Our K-quant
# files hold one type throughout (no llama.cpp mix of Q6_K output and attn_v): Q4_K and Q5_K
# are named as llama.cpp's "small" variants (Q4_K_S, Q5_K_S), the mostly-uniform ones.
LLAMA_FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k": 12,
               "q4_k": 14, "q5_k": 16, "q6_k": 18, "bf16": 32}
# llama.cpp's replacement for a K-quant whose rows do not fill 256-blocks (llama_tensor_get_type).
K_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}


# ------------------------------------------------------------------------ RoPE layouts
def to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows (or biases) from the rotate-half layout to GGML's adjacent-pair layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `to_interleaved`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------ reading
def is_gguf_file(path: Path) -> bool:
    """Recognised by content (the magic bytes), never by the file name."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def config_from_gguf(meta: dict, tensor_shapes: dict[str, tuple[int, ...]], path: Path) -> Config:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2, gpt2)")

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
    if isinstance(n_kv, list):
        raise CheckpointError(f"{path}: per-layer head counts are not supported")
    head_dim = meta.get(f"{arch}.attention.key_length", int(need("embedding_length")) // max(n_head, 1))
    common = dict(name=str(meta.get("general.name", path.stem)), vocab_size=int(vocab),
                  block_size=int(need("context_length")), n_layer=int(need("block_count")), n_head=n_head,
                  n_embd=int(need("embedding_length")), n_kv_head=int(n_kv), head_dim=int(head_dim),
                  intermediate_size=int(need("feed_forward_length")),
                  tie_embeddings="output.weight" not in tensor_shapes,
                  bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                  pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if int(n_embd) != common["n_embd"]:
        raise CheckpointError(f"{path}: token_embd.weight is {n_embd} wide, the metadata says {common['n_embd']}")
    if arch == "gpt2":
        return Config(family="gpt2", norm="layernorm", norm_eps=float(need("attention.layer_norm_epsilon")),
                      mlp="gelu", position="learned", bias=True, **common)
    rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dimensions) is not supported")
    window = meta.get(f"{arch}.attention.sliding_window")
    return Config(family="qwen2" if arch == "qwen2" else ("mistral" if window else "llama"), norm="rmsnorm",
                  norm_eps=float(need("attention.layer_norm_rms_epsilon")), mlp="swiglu", position="rope",
                  rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), qkv_bias=arch == "qwen2",
                  sliding_window=int(window) if window else None, **common)


def _gguf_names(config: Config) -> list[tuple[str, str]]:
    """(our canonical name, llama.cpp name) pairs for tensors that map one to one."""
    pairs = [("tok_embeddings.weight", "token_embd.weight"), ("norm.weight", "output_norm.weight")]
    if config.position == "learned":
        pairs.append(("pos_embeddings.weight", "position_embd.weight"))
    if config.norm == "layernorm":
        pairs.append(("norm.bias", "output_norm.bias"))
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "output.weight"))
    for i in range(config.n_layer):
        ours, theirs = f"layers.{i}.", f"blk.{i}."
        pairs += [(ours + "attn_norm.weight", theirs + "attn_norm.weight"),
                  (ours + "mlp_norm.weight", theirs + "ffn_norm.weight"),
                  (ours + "attn.o_proj.weight", theirs + "attn_output.weight"),
                  (ours + "mlp.down_proj.weight", theirs + "ffn_down.weight")]
        if config.bias:
            pairs += [(ours + "attn_norm.bias", theirs + "attn_norm.bias"),
                      (ours + "mlp_norm.bias", theirs + "ffn_norm.bias"),
                      (ours + "attn.o_proj.bias", theirs + "attn_output.bias"),
                      (ours + "mlp.down_proj.bias", theirs + "ffn_down.bias")]
        if config.mlp == "gelu":
            pairs.append((ours + "mlp.up_proj.weight", theirs + "ffn_up.weight"))
            if config.bias:
                pairs.append((ours + "mlp.up_proj.bias", theirs + "ffn_up.bias"))
    return pairs


def _interleaved_rope(config: Config) -> bool:
    return config.family in ("llama", "mistral")


def load_gguf(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[Transformer, Config, Tokenizer]:
    """A GGUF model file -> (model, config, tokenizer). Every tensor is dequantized to float
    and cast to `dtype` (default: float32 for quantized files, else the file's float type)."""
    path = Path(path)
    f = read_gguf(path)
    shapes = {name: info.torch_shape for name, info in f.tensors.items()}
    config = config_from_gguf(f.metadata, shapes, path)
    if dtype is None:
        kinds = {info.type for info in f.tensors.values() if len(info.shape) == 2}
        dtype = {GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}.get(kinds.pop(), torch.float32) \
            if len(kinds) == 1 else torch.float32

    def get(name: str) -> torch.Tensor:
        if name not in f.tensors:
            raise CheckpointError(f"{path}: tensor {name} is missing (a partial or unsupported file?)")
        return f.tensor(name).to(dtype)

    state = {ours: get(theirs) for ours, theirs in _gguf_names(config)}
    H, K = config.n_head, config.n_kv_head
    for i in range(config.n_layer):
        blk = f"blk.{i}."
        if config.family == "gpt2":
            state[f"layers.{i}.attn.qkv_proj.weight"] = get(blk + "attn_qkv.weight")
            state[f"layers.{i}.attn.qkv_proj.bias"] = get(blk + "attn_qkv.bias")
        else:
            parts = {"weight": ["attn_q.weight", "attn_k.weight", "attn_v.weight"]}
            if config.qkv_bias:
                parts["bias"] = ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
            for kind, names in parts.items():
                q, k, v = (get(blk + n) for n in names)
                if _interleaved_rope(config):
                    q, k = from_interleaved(q, H), from_interleaved(k, K)
                state[f"layers.{i}.attn.qkv_proj.{kind}"] = torch.cat([q, k, v])
            state[f"layers.{i}.mlp.gate_up_proj.weight"] = torch.cat([get(blk + "ffn_gate.weight"),
                                                                      get(blk + "ffn_up.weight")])
    if "rope_freqs.weight" in f.tensors:  # Llama-3 scaling as per-frequency divisors
        config.rope_scaling = {"factors": f.tensor("rope_freqs.weight").float().tolist()}
    model = empty_model(config)
    expected = dict(model.state_dict())
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: no tensor for {name}")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(state[name].shape)}, the metadata implies "
                                  f"{tuple(tensor.shape)}")
    model = finish_loading(model, {k: v.contiguous() for k, v in state.items()})
    tokenizer = tokenizer_from_gguf_metadata(f.metadata)
    return model, config, tokenizer


# ------------------------------------------------------------------------------ writing
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


def gguf_tensors(model: Transformer, file_type: str) -> list[tuple[str, GGMLType, tuple[int, ...], object]]:
    """Our model's tensors in llama.cpp's names, layout and types."""
    if file_type not in FILE_TYPES:
        raise InvalidArgument(f"unknown GGUF type {file_type!r} (one of {', '.join(FILE_TYPES)})")
    requested = FILE_TYPES[file_type]
    config = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    named: list[tuple[str, torch.Tensor]] = [(theirs, state[ours]) for ours, theirs in _gguf_names(config)]
    H, K, hd, F = config.n_head, config.n_kv_head, config.head_dim, config.intermediate_size
    for i in range(config.n_layer):
        blk, ours = f"blk.{i}.", f"layers.{i}."
        if config.family == "gpt2":
            named += [(blk + "attn_qkv.weight", state[ours + "attn.qkv_proj.weight"]),
                      (blk + "attn_qkv.bias", state[ours + "attn.qkv_proj.bias"])]
            continue
        kinds = ["weight"] + (["bias"] if config.qkv_bias else [])
        for kind in kinds:
            q, k, v = state[f"{ours}attn.qkv_proj.{kind}"].split([H * hd, K * hd, K * hd])
            if _interleaved_rope(config):
                q, k = to_interleaved(q, H), to_interleaved(k, K)
            named += [(f"{blk}attn_q.{kind}", q), (f"{blk}attn_k.{kind}", k), (f"{blk}attn_v.{kind}", v)]
        gate, up = state[ours + "mlp.gate_up_proj.weight"].split([F, F])
        named += [(blk + "ffn_gate.weight", gate), (blk + "ffn_up.weight", up)]
    if config.rope_scaling is not None:
        base = rope_inv_freq(Config(**{**config.to_dict(), "rope_scaling": None}))
        named.append(("rope_freqs.weight", (base / rope_inv_freq(config)).float()))
    out = []
    for name, tensor in named:
        qtype = _matrix_type(requested, tuple(tensor.shape)) if tensor.dim() == 2 else GGMLType.F32
        if name == "rope_freqs.weight":
            qtype = GGMLType.F32
        out.append((name, qtype, tuple(tensor.shape), _encode(tensor, qtype)))
    return out


def gguf_metadata(config: Config, tokenizer: Tokenizer, file_type: str) -> dict:
    arch = ARCHITECTURES[config.family]
    meta: dict = {"general.architecture": arch, "general.name": config.name,
                  "general.file_type": GGUFValue(LLAMA_FTYPE[file_type], GGUFValueType.UINT32),
                  f"{arch}.context_length": config.block_size, f"{arch}.embedding_length": config.n_embd,
                  f"{arch}.block_count": config.n_layer, f"{arch}.feed_forward_length": config.intermediate_size,
                  f"{arch}.attention.head_count": config.n_head}
    if config.family == "gpt2":
        meta[f"{arch}.attention.layer_norm_epsilon"] = GGUFValue(float(config.norm_eps), GGUFValueType.FLOAT32)
    else:
        meta[f"{arch}.attention.head_count_kv"] = config.n_kv_head
        meta[f"{arch}.attention.layer_norm_rms_epsilon"] = GGUFValue(float(config.norm_eps), GGUFValueType.FLOAT32)
        meta[f"{arch}.rope.freq_base"] = GGUFValue(float(config.rope_theta), GGUFValueType.FLOAT32)
        meta[f"{arch}.rope.dimension_count"] = config.head_dim
        if config.head_dim * config.n_head != config.n_embd:
            meta[f"{arch}.attention.key_length"] = config.head_dim
            meta[f"{arch}.attention.value_length"] = config.head_dim
        if config.sliding_window:
            meta[f"{arch}.attention.sliding_window"] = config.sliding_window
    meta.update(tokenizer_to_gguf_metadata(tokenizer, config))
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


def save_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, file_type: str = "f32") -> None:
    """Write a model and its tokenizer as one GGUF v3 file (atomically) that llama.cpp loads."""
    config = model.config
    if config.is_encoder_decoder:
        tensors = t5_gguf_tensors(model, file_type)
        write_gguf(path, t5_gguf_metadata(config, tokenizer, file_type), tensors)
        return
    if config.family not in ARCHITECTURES:
        raise InvalidArgument(f"no GGUF architecture for family {config.family!r}")
    tensors = gguf_tensors(model, file_type)
    write_gguf(path, gguf_metadata(config, tokenizer, file_type), tensors)
