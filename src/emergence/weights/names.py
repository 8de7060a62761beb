"""Canonical parameter names <-> Hugging Face checkpoint names, one table per family.

A `Rule` ties checkpoint tensors to canonical tensors, with two small functions converting
between them: identity for most, a transpose for GPT-2's Conv1D layout, and a fusion for
the projections emergence keeps in one matrix (q/k/v, gate/up). The
reverse direction (saving) uses the same table, so the two can never drift apart.
`{}` in a name stands for the layer index.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import Config

Tensor = torch.Tensor
Convert = Callable[[list[Tensor], Config], list[Tensor]]


def _identity(ts: list[Tensor], c: Config) -> list[Tensor]:
    return ts


def _transpose(ts: list[Tensor], c: Config) -> list[Tensor]:
    """GPT-2's Conv1D stores weights as (in, out); nn.Linear wants (out, in), and back."""
    return [t.t().contiguous() for t in ts]


def _fuse(ts: list[Tensor], c: Config) -> list[Tensor]:
    """Stack separate projections (q, k, v or gate, up) into one matrix along the output dim."""
    return [torch.cat(ts, dim=0)]


def _split_qkv(ts: list[Tensor], c: Config) -> list[Tensor]:
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    return [part.contiguous() for part in ts[0].split([q, kv, kv], dim=0)]


def _split_halves(ts: list[Tensor], c: Config) -> list[Tensor]:
    return [part.contiguous() for part in ts[0].chunk(2, dim=0)]


def _plus_one(ts: list[Tensor], c: Config) -> list[Tensor]:
    """Gemma's RMSNorm multiplies by (1 + w): emergence keeps the gain itself, 1 + w."""
    return [t + 1 for t in ts]


def _minus_one(ts: list[Tensor], c: Config) -> list[Tensor]:
    return [t - 1 for t in ts]


def _grouped_qkv(ts: list[Tensor], c: Config) -> list[Tensor]:
    """A q/k/v matrix laid out per key/value head, [q of the group's H/K heads, k, v] for each of
    the K groups (GPT-NeoX: K = H, one [q, k, v] per head; Falcon) -> emergence's [q; k; v]."""
    H, K, hd = c.n_head, c.n_kv_head, c.head_dim
    t = ts[0]
    g = t.reshape(K, H // K + 2, hd, *t.shape[1:])  # (K, H/K + 2, hd[, D])
    q, k, v = g[:, :H // K], g[:, H // K], g[:, H // K + 1]
    return [torch.cat([q.reshape(H * hd, *t.shape[1:]), k.reshape(K * hd, *t.shape[1:]),
                       v.reshape(K * hd, *t.shape[1:])]).contiguous()]


def _ungrouped_qkv(ts: list[Tensor], c: Config) -> list[Tensor]:
    H, K, hd = c.n_head, c.n_kv_head, c.head_dim
    t = ts[0]
    q, k, v = t.split([H * hd, K * hd, K * hd])
    g = torch.cat([q.reshape(K, H // K, hd, *t.shape[1:]), k.reshape(K, 1, hd, *t.shape[1:]),
                   v.reshape(K, 1, hd, *t.shape[1:])], dim=1)
    return [g.reshape(t.shape).contiguous()]


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # canonical names
    theirs: tuple[str, ...]  # names in the checkpoint
    to_ours: Convert = _identity  # checkpoint tensors (in `theirs` order) -> canonical tensors
    to_theirs: Convert = _identity  # and back

    @property
    def is_identity(self) -> bool:
        return self.to_ours is _identity


def _same(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


# Where each family's block norms sit: our name -> theirs (model.layers.{}.<theirs>). LLaMA's
# post_attention_layernorm is the MLP's pre-norm; in OLMo 2 and Gemma it follows the attention.
LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
OLMO2_NORMS = {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
GEMMA_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}


def _llama_rules(norms: dict[str, str] = LLAMA_NORMS, fused: bool = False, gemma: bool = False) -> list[Rule]:
    """The LLaMA layout and its relatives (Qwen2/3, SmolLM3, OLMo 2, Gemma 2/3, Phi-3). `fused`:
    q/k/v and gate/up stored fused as emergence keeps them (Phi-3); `gemma`: norms store w for (1 + w)."""
    a, m = "model.layers.{}.self_attn", "model.layers.{}.mlp"

    def norm(ours: str, theirs: str) -> Rule:
        return Rule((ours,), (theirs,), _plus_one, _minus_one) if gemma else _same(ours, theirs)

    rules = [
        _same("tok_embeddings.weight", "model.embed_tokens.weight"),
        *(norm(f"layers.{{}}.{ours}.weight", f"model.layers.{{}}.{theirs}.weight") for ours, theirs in norms.items()),
        norm("layers.{}.attn.q_norm.weight", f"{a}.q_norm.weight"),
        norm("layers.{}.attn.k_norm.weight", f"{a}.k_norm.weight"),
        _same("layers.{}.attn.o_proj.weight", f"{a}.o_proj.weight"),
        _same("layers.{}.mlp.down_proj.weight", f"{m}.down_proj.weight"),
        norm("norm.weight", "model.norm.weight"),
        _same("lm_head.weight", "lm_head.weight"),
    ]
    if fused:
        return rules + [_same("layers.{}.attn.qkv_proj.weight", f"{a}.qkv_proj.weight"),
                        _same("layers.{}.mlp.gate_up_proj.weight", f"{m}.gate_up_proj.weight")]
    rules.append(Rule(("layers.{}.mlp.gate_up_proj.weight",), (f"{m}.gate_proj.weight", f"{m}.up_proj.weight"),
                      _fuse, _split_halves))
    for kind in ("weight", "bias"):
        rules.append(Rule((f"layers.{{}}.attn.qkv_proj.{kind}",), tuple(f"{a}.{p}_proj.{kind}" for p in "qkv"),
                          _fuse, _split_qkv))
    return rules


def _bitnet_rules() -> list[Rule]:
    """BitNet (BitNetForCausalLM): the LLaMA layout plus its two sub-norms, before o_proj and down_proj."""
    return _llama_rules() + [_same("layers.{}.attn.sub_norm.weight", "model.layers.{}.self_attn.attn_sub_norm.weight"),
                             _same("layers.{}.mlp.sub_norm.weight", "model.layers.{}.mlp.ffn_sub_norm.weight")]


def _stack_pairs(ts: list[Tensor], c: Config) -> list[Tensor]:
    """Each expert's gate and up matrices, [g0, u0, g1, u1, ...] -> (E, 2f, D)."""
    return [torch.stack([torch.cat(ts[i:i + 2]) for i in range(0, len(ts), 2)])]


def _unstack_pairs(ts: list[Tensor], c: Config) -> list[Tensor]:
    return [part.contiguous() for expert in ts[0] for part in expert.chunk(2, dim=0)]


def _stack(ts: list[Tensor], c: Config) -> list[Tensor]:
    """One matrix per expert -> (E, ...)."""
    return [torch.stack(ts)]


def _unstack(ts: list[Tensor], c: Config) -> list[Tensor]:
    return [t.contiguous() for t in ts[0]]


def moe_rules(c: Config) -> list[Rule]:
    """A mixture of experts' tensors: the router, every expert's matrices (stacked in emergence,
    one tensor per expert in the checkpoint) and Qwen2-MoE's shared expert and its gate."""
    moe = "model.layers.{}." + ("block_sparse_moe" if c.family == "mixtral" else "mlp")
    names = ("w1", "w3", "w2") if c.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    gate, up, down = (tuple(f"{moe}.experts.{e}.{n}.weight" for e in range(c.n_experts)) for n in names)
    shared = f"{moe}.shared_expert"
    return [_same("layers.{}.mlp.router.weight", f"{moe}.gate.weight"),
            Rule(("layers.{}.mlp.gate_up_proj",), tuple(n for pair in zip(gate, up) for n in pair),
                 _stack_pairs, _unstack_pairs),
            Rule(("layers.{}.mlp.down_proj",), down, _stack, _unstack),
            Rule(("layers.{}.mlp.shared.gate_up_proj.weight",), (f"{shared}.gate_proj.weight", f"{shared}.up_proj.weight"),
                 _fuse, _split_halves),
            _same("layers.{}.mlp.shared.down_proj.weight", f"{shared}.down_proj.weight"),
            _same("layers.{}.mlp.shared_gate.weight", f"{moe}.shared_expert_gate.weight")]


def _with_bias(ours: str, theirs: str, weight: Rule | None = None) -> list[Rule]:
    """A linear layer or LayerNorm's weight and bias under one name each (weight rule optional)."""
    weight = weight or _same(f"{ours}.weight", f"{theirs}.weight")
    bias = Rule((f"{ours}.bias",), (f"{theirs}.bias",), weight.to_ours, weight.to_theirs)
    return [weight, bias]


def _gpt_neox_rules() -> list[Rule]:
    h = "gpt_neox.layers.{}"
    qkv = Rule(("layers.{}.attn.qkv_proj.weight",), (f"{h}.attention.query_key_value.weight",),
               _grouped_qkv, _ungrouped_qkv)
    return [_same("tok_embeddings.weight", "gpt_neox.embed_in.weight"), _same("lm_head.weight", "embed_out.weight"),
            *_with_bias("norm", "gpt_neox.final_layer_norm"),
            *_with_bias("layers.{}.attn_norm", f"{h}.input_layernorm"),
            *_with_bias("layers.{}.mlp_norm", f"{h}.post_attention_layernorm"),
            *_with_bias("layers.{}.attn.qkv_proj", f"{h}.attention.query_key_value", qkv),
            *_with_bias("layers.{}.attn.o_proj", f"{h}.attention.dense"),
            *_with_bias("layers.{}.mlp.up_proj", f"{h}.mlp.dense_h_to_4h"),
            *_with_bias("layers.{}.mlp.down_proj", f"{h}.mlp.dense_4h_to_h")]


def falcon_rules(two_norms: bool) -> list[Rule]:
    """Falcon: q/k/v grouped by key/value head (multi-query 7B: [q, k, v]); ln_attn and ln_mlp
    where the parallel block has two norms (new_decoder_architecture), else input_layernorm
    (and post_attention_layernorm before a sequential MLP)."""
    h = "transformer.h.{}"
    qkv = Rule(("layers.{}.attn.qkv_proj.weight",), (f"{h}.self_attention.query_key_value.weight",),
               _grouped_qkv, _ungrouped_qkv)
    norms = (("attn_norm", "ln_attn"), ("mlp_norm", "ln_mlp")) if two_norms else \
        (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
    rules = [_same("tok_embeddings.weight", "transformer.word_embeddings.weight"), _same("lm_head.weight", "lm_head.weight"),
             *_with_bias("norm", "transformer.ln_f"),
             *_with_bias("layers.{}.attn.qkv_proj", f"{h}.self_attention.query_key_value", qkv),
             *_with_bias("layers.{}.attn.o_proj", f"{h}.self_attention.dense"),
             *_with_bias("layers.{}.mlp.up_proj", f"{h}.mlp.dense_h_to_4h"),
             *_with_bias("layers.{}.mlp.down_proj", f"{h}.mlp.dense_4h_to_h")]
    for ours, theirs in norms:
        rules += _with_bias(f"layers.{{}}.{ours}", f"{h}.{theirs}")
    return rules


def _phi_rules() -> list[Rule]:
    """Phi-2 (model_type "phi"): separate biased q/k/v, one LayerNorm per parallel block, a biased head."""
    h = "model.layers.{}"
    rules = [_same("tok_embeddings.weight", "model.embed_tokens.weight"),
             *_with_bias("lm_head", "lm_head"), *_with_bias("norm", "model.final_layernorm"),
             *_with_bias("layers.{}.attn_norm", f"{h}.input_layernorm"),
             *_with_bias("layers.{}.attn.o_proj", f"{h}.self_attn.dense"),
             *_with_bias("layers.{}.mlp.up_proj", f"{h}.mlp.fc1"),
             *_with_bias("layers.{}.mlp.down_proj", f"{h}.mlp.fc2")]
    for kind in ("weight", "bias"):
        rules.append(Rule((f"layers.{{}}.attn.qkv_proj.{kind}",), tuple(f"{h}.self_attn.{p}_proj.{kind}" for p in "qkv"),
                          _fuse, _split_qkv))
    return rules


def _gpt2_rules() -> list[Rule]:
    h = "transformer.h.{}"
    rules = [
        _same("tok_embeddings.weight", "transformer.wte.weight"),
        _same("pos_embeddings.weight", "transformer.wpe.weight"),
        _same("lm_head.weight", "lm_head.weight"),
    ]
    for ours, theirs in (("layers.{}.attn_norm", f"{h}.ln_1"), ("layers.{}.mlp_norm", f"{h}.ln_2"),
                         ("norm", "transformer.ln_f")):
        rules += [_same(f"{ours}.weight", f"{theirs}.weight"), _same(f"{ours}.bias", f"{theirs}.bias")]
    for ours, theirs in (("layers.{}.attn.qkv_proj", f"{h}.attn.c_attn"), ("layers.{}.attn.o_proj", f"{h}.attn.c_proj"),
                         ("layers.{}.mlp.up_proj", f"{h}.mlp.c_fc"), ("layers.{}.mlp.down_proj", f"{h}.mlp.c_proj")):
        rules += [Rule((f"{ours}.weight",), (f"{theirs}.weight",), _transpose, _transpose),
                  _same(f"{ours}.bias", f"{theirs}.bias")]
    return rules


def t5_rules(c) -> list[Rule]:
    """T5ForConditionalGeneration's names, every layer spelled out (the two stacks differ in depth)."""
    def mlp(ours: str, theirs: str) -> list[Rule]:
        if c.mlp == "geglu":  # wi_0 is the gated (GELU) half, wi_1 the linear one
            up = Rule((f"{ours}.gate_up_proj.weight",), (f"{theirs}.wi_0.weight", f"{theirs}.wi_1.weight"),
                      _fuse, _split_halves)
        else:
            up = _same(f"{ours}.up_proj.weight", f"{theirs}.wi.weight")
        return [up, _same(f"{ours}.down_proj.weight", f"{theirs}.wo.weight")]

    def self_attention(ours: str, theirs: str) -> list[Rule]:
        return [Rule((f"{ours}.qkv_proj.weight",), tuple(f"{theirs}.{p}.weight" for p in "qkv"), _fuse, _split_qkv),
                _same(f"{ours}.o_proj.weight", f"{theirs}.o.weight")]

    rules = [_same("tok_embeddings.weight", "shared.weight"),
             _same("encoder_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
             _same("encoder_norm.weight", "encoder.final_layer_norm.weight"),
             _same("decoder_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
             _same("norm.weight", "decoder.final_layer_norm.weight")]
    if not c.tie_embeddings:
        rules.append(_same("lm_head.weight", "lm_head.weight"))
    for i in range(c.n_encoder_layer):
        e = f"encoder.block.{i}.layer"
        rules += [_same(f"encoder_layers.{i}.attn_norm.weight", f"{e}.0.layer_norm.weight"),
                  *self_attention(f"encoder_layers.{i}.attn", f"{e}.0.SelfAttention"),
                  _same(f"encoder_layers.{i}.mlp_norm.weight", f"{e}.1.layer_norm.weight"),
                  *mlp(f"encoder_layers.{i}.mlp", f"{e}.1.DenseReluDense")]
    for i in range(c.n_layer):
        d = f"decoder.block.{i}.layer"
        rules += [_same(f"layers.{i}.attn_norm.weight", f"{d}.0.layer_norm.weight"),
                  *self_attention(f"layers.{i}.attn", f"{d}.0.SelfAttention"),
                  _same(f"layers.{i}.cross_norm.weight", f"{d}.1.layer_norm.weight"),
                  _same(f"layers.{i}.cross_attn.q_proj.weight", f"{d}.1.EncDecAttention.q.weight"),
                  Rule((f"layers.{i}.cross_attn.kv_proj.weight",),
                       (f"{d}.1.EncDecAttention.k.weight", f"{d}.1.EncDecAttention.v.weight"), _fuse, _split_halves),
                  _same(f"layers.{i}.cross_attn.o_proj.weight", f"{d}.1.EncDecAttention.o.weight"),
                  _same(f"layers.{i}.mlp_norm.weight", f"{d}.2.layer_norm.weight"),
                  *mlp(f"layers.{i}.mlp", f"{d}.2.DenseReluDense")]
    return rules


# Copies of the shared embedding some T5 checkpoints also store under each stack's name.
T5_DUPLICATES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


HF_RULES: dict[str, list[Rule]] = {
    "gpt2": _gpt2_rules(),
    **{family: _llama_rules() for family in ("llama", "mistral", "qwen2", "qwen3", "smollm3")},
    "phi3": _llama_rules(fused=True),
    "olmo2": _llama_rules(OLMO2_NORMS),
    "gemma2": _llama_rules(GEMMA_NORMS, gemma=True),
    "gemma3_text": _llama_rules(GEMMA_NORMS, gemma=True),
    "gpt_neox": _gpt_neox_rules(),
    "falcon": falcon_rules(two_norms=False),  # hf_rules() picks the two-norm table where it applies
    "phi": _phi_rules(),
    **{family: _llama_rules() for family in ("mixtral", "qwen2_moe", "olmoe")},  # + moe_rules(config)
    "bitnet": _bitnet_rules(),
}


def hf_rules(config: Config) -> list[Rule]:
    """The name table of a config's family (Falcon's norm names depend on its block)."""
    if config.family == "falcon" and config.parallel == "two-norms":
        return falcon_rules(two_norms=True)
    if config.n_experts:  # the expert count names the tensors
        return HF_RULES[config.family] + moe_rules(config)
    return HF_RULES[config.family]

# Tensors some checkpoints carry that hold no weights (causal-mask buffers, RoPE tables).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".attention.bias",
                    ".attention.masked_bias")


def expand(rules: list[Rule], config: Config, wanted: set[str]) -> list[Rule]:
    """Rules with `{}` filled for every layer, keeping those whose canonical names the model has
    (so biases, learned positions and an untied head are mapped only when the config has them)."""
    out = []
    for rule in rules:
        layers = range(config.n_layer) if "{}" in rule.ours[0] else [None]
        for i in layers:
            ours = tuple(n.format(i) for n in rule.ours)
            if all(n in wanted for n in ours):
                out.append(Rule(ours, tuple(n.format(i) for n in rule.theirs), rule.to_ours, rule.to_theirs))
    return out


def canonical_names(model: torch.nn.Module) -> set[str]:
    """Parameter names the model owns, counting a tied output head once (as its embedding)."""
    return {name for name, _ in model.named_parameters(remove_duplicate=True)}
