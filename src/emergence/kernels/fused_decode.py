"""The native backend of a decode batch: whole forward passes in one native call on the CPU.

`NativeBackend.forward` runs the rows of a decode batch through decode.cpp's `DecodePlan`:
one token per sequence (a decoding step; one row uses GEMVs, several rows one GEMM per linear
layer), or a few tokens per sequence (short prompts prefilled together, their tokens as the
GEMM's rows, each attending causally within its own sequence). Keys and values go straight
into the paged KV cache's blocks. Prompts longer than `max_prefill` go to the eager forward
(the model's own, over a CacheView), whose large GEMMs and fused attention serve them better.
An fp32 T5's decoder steps the same way: its sequences' cross-attention keys and values (computed
once by the eager encoder) go with each call, and its relative position bias is a table by
distance.

A backend belongs to one decode batch: it builds its plan from the model's weights as they
are when the batch starts (after quantizing, loading or moving the model, the next batch
sees the change) and owns the plan's scratch memory, so two threads decoding at once never
share it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidArgument
from ..kv_cache import PagedKVCache

# The longest prompt prefilled natively, where that is faster than the eager forward
# (bench/bench_batched.py, smollm2-135m shapes, 2 threads; bench/results/batched.json): fp32
# weights up to 64 tokens; bf16 up to 16 (from 32, oneDNN's bf16 GEMM is ahead); q8_0 and q4_0
# blocks (and the other ggml formats', on the same kernels) up to 128 (both paths multiply on
# the packed blocks, qgemm_ggml); the other packed
# formats up to 4 (their kernels read the weights once per token, where the eager path
# multiplies all the tokens at once, the weight widened a tile of rows at a time).
# Where the fp32 products run on oneDNN (AMD CPUs, blas.h), the native prefill stays ahead of
# the eager forward (whose torch.mm is MKL's, about half oneDNN's rate there) at every
# length measured, up to 1,024 tokens (bench/bench_onednn.py, bench/results/onednn_amd.json); there
# int4 and NF4 prompts too are prefilled natively, up to 256 tokens, their products from 16
# rows on those of the eager forward (decode.cpp's prompt_products: the weight widened a tile of
# rows at a time, in bf16 where kernels.native_qgemm takes bf16), without the eager forward's
# own norms, rotations and attention around them; at 512 tokens the two are within 2% of each
# other, at 1,024 the eager forward is ahead (the same benchmark). A bf16 model's prompt there
# (with AVX512-BF16) multiplies on oneDNN's bf16 product, the eager forward's own, and is
# prefilled natively up to 256 tokens (bench/bench_onednn.py's bf16 prefill sweep).
MAX_NATIVE_PREFILL, MAX_NATIVE_PREFILL_BF16, MAX_NATIVE_PREFILL_GGML, MAX_NATIVE_PREFILL_PACKED = 64, 16, 128, 4
MAX_NATIVE_PREFILL_ONEDNN, MAX_NATIVE_PREFILL_4BIT_ONEDNN, MAX_NATIVE_PREFILL_BF16_ONEDNN = 1024, 256, 256
# The linear layers of a block, by decode.cpp's slot number ("mlp.up": SwiGLU's fused gate_up
# or the GELU MLP's up projection).
LINEAR_SLOTS = ("attn.qkv_proj", "attn.o_proj", "mlp.up", "mlp.down_proj")
# ... and a mixture of experts' shared expert (slots 4 and 5; the experts themselves are 6 and 7).
MOE_LINEAR_SLOTS = ("mlp.shared.gate_up_proj", "mlp.shared.down_proj")
# Tensor slots per layer in the order decode.cpp expects them.
LAYER_SLOTS = ("attn_norm.weight", "attn_norm.bias", "attn.qkv_proj.weight", "attn.qkv_proj.bias",
               "attn.o_proj.weight", "attn.o_proj.bias", "mlp_norm.weight", "mlp_norm.bias",
               "mlp.up.weight", "mlp.up.bias", "mlp.down_proj.weight", "mlp.down_proj.bias",
               "attn_post_norm.weight", "mlp_post_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight",
               "attn.sub_norm.weight", "mlp.sub_norm.weight", "mlp.router.weight", "mlp.gate_up_proj", "mlp.down_proj", "mlp.shared.gate_up_proj.weight",
               "mlp.shared.down_proj.weight", "mlp.shared_gate.weight", "cross_norm.weight",
               "cross_attn.q_proj.weight", "cross_attn.o_proj.weight")
MOE_SLOTS = range(18, 24)  # a mixture of experts' (router, experts, shared expert); the last three: T5's cross-attention
# The family switches as decode.cpp numbers them (its enums Mlp, Placement, Parallel, QkNorm).
MLP_KINDS = {"swiglu": 0, "geglu": 1, "gelu": 2, "gelu_exact": 3, "relu2_glu": 4, "relu": 5}
PLACEMENTS = {"pre": 0, "post": 1, "sandwich": 2}
PARALLEL = {None: 0, "shared-norm": 1, "two-norms": 2}
QK_NORMS = {None: 0, "head": 1, "all": 2}
ROPES = {None: 0, "global": 1, "local": 2}


def unsupported(model: nn.Module, cache: PagedKVCache | None = None) -> str | None:
    """Why the native step cannot run `model` (on `cache`), or None when it can: CPU weights,
    all fp32 or all bf16, only the modules model.py builds, quantized linear layers (and a
    quantized GGUF token table) in a format with a kernel, and a CPU cache in the model's dtype."""
    from ..model import MLP, Attention, Block, MoE, RMSNorm, Transformer
    from ..quant.linear import GGMLEmbedding, QuantizedLinear, StackedLinear
    from ..t5 import T5, CrossAttention, DecoderBlock, RelativeBias
    from .. import products
    from . import SmallBatchLinear, gemv_extension

    if gemv_extension() is None:
        return "the native kernels are not available on this machine"
    if not isinstance(model, (Transformer, T5)):
        return f"{type(model).__name__} is neither emergence's Transformer nor its T5"
    dtypes = {p.dtype for p in model.parameters()}
    if isinstance(model, T5) and dtypes != {torch.float32}:
        return "a T5 steps natively in fp32 only"
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices != {"cpu"}:
        return "the model is not on the CPU"
    if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.float32, torch.bfloat16):
        return f"the weights are {', '.join(sorted(str(d) for d in dtypes))}, not all fp32 or all bf16"
    known = {Transformer, Block, Attention, MLP, MoE, nn.ModuleList, nn.Linear, products.Linear, nn.Embedding,
             nn.LayerNorm, RMSNorm, nn.Identity, T5, DecoderBlock, CrossAttention, RelativeBias, SmallBatchLinear}
    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, GGMLEmbedding)):
            if isinstance(model, T5):
                return f"{name} is quantized: a quantized T5 steps through the eager forward"
            if m.kernel_operands() is None:
                return f"{name} is quantized as {m.format}, which has no native kernel for its shape"
        elif isinstance(m, StackedLinear):
            if any(not isinstance(p, QuantizedLinear) for p in m.parts):
                return f"{name} stacks {m.format}: the native step takes stacks of quantized parts only"
        elif type(m) not in known:
            return f"{name} is a {type(m).__name__}, a module the native step does not know"
    if not all(p.is_contiguous() for p in model.parameters()):
        return "a weight is not contiguous"
    if cache is not None and (cache.device.type != "cpu" or cache.dtype != model.dtype):
        return "the KV cache is not a CPU cache in the model's dtype"
    return None


class NativeBackend:
    """Runs a decode batch's forward passes through one DecodePlan (see the module docstring)."""

    name = "native"

    def __init__(self, model: nn.Module, cache: PagedKVCache) -> None:
        from ..decode import EagerBackend
        from . import gemv_extension

        why = unsupported(model, cache)
        if why is not None:
            raise InvalidArgument(f"the native decode step cannot run this model: {why}")
        self.cache, self.vocab_size, self.context = cache, model.config.vocab_size, model.config.block_size
        self.eager = EagerBackend(model, cache)  # for prompts longer than max_prefill
        self.plan, packed = build_plan(model, gemv_extension())
        self.max_prefill = max_native_prefill(model.dtype, packed)
        self.native_calls = 0  # forward passes run natively (the rest went to the eager forward)

    def forward(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]],
                cross: list | None = None, every: bool = False) -> torch.Tensor:
        """Sequence j, holding starts[j] tokens in the blocks tables[j], is extended by
        chunks[j]; returns each sequence's last-token logits (J, V) float32 (`every`: the
        logits of every token fed, in order). An encoder-decoder's sequences bring their
        cross-attention states (`cross`, t5.CrossStates)."""
        long = [j for j, c in enumerate(chunks) if len(c) > self.max_prefill]
        if not long:
            return self._native(chunks, starts, tables, cross, every)
        extra = {} if cross is None else {"cross": cross}
        if len(long) == len(chunks) or every:
            return self.eager.forward(chunks, starts, tables, every=every, **extra)
        short = [j for j, c in enumerate(chunks) if len(c) <= self.max_prefill]
        out = torch.empty(len(chunks), self.vocab_size)
        for part, run in ((short, self._native), (long, self.eager.forward)):
            part_cross = None if cross is None else [cross[j] for j in part]
            out[part] = run([chunks[j] for j in part], [starts[j] for j in part], [tables[j] for j in part],
                            part_cross)
        return out

    def _native(self, chunks: list[list[int]], starts: list[int], tables: list[list[int]],
                cross: list | None = None, every: bool = False) -> torch.Tensor:
        longest = max(start + len(c) for start, c in zip(starts, chunks))
        if longest > self.context:  # as the eager forward checks it
            raise InvalidArgument(f"{longest} tokens exceed the context window of {self.context}")
        self.native_calls += 1
        keys, values = ([], []) if cross is None else ([c.k for c in cross], [c.v for c in cross])
        if all(len(c) == 1 for c in chunks):  # a decoding step: one token per sequence
            every = list(range(len(chunks)))
            return self.plan.forward([c[0] for c in chunks], every, starts, every, tables, self.cache.k, self.cache.v,
                                     keys, values)
        tokens, rows, positions, last = [], [], [], []
        for j, (chunk, start) in enumerate(zip(chunks, starts)):
            tokens += chunk
            rows += [j] * len(chunk)
            positions += range(start, start + len(chunk))
            last.append(len(tokens) - 1)
        if every:
            last = list(range(len(tokens)))
        # a prompt's int4 / NF4 products as the eager forward's (bf16 where it takes bf16); a
        # decoding step (above) keeps the GEMV, so that a row's result never depends on its batch
        from . import bf16_prompt_products

        products = 2 if bf16_prompt_products() else 1
        return self.plan.forward(tokens, rows, positions, last, tables, self.cache.k, self.cache.v, keys, values,
                                 products)


def max_native_prefill(dtype: torch.dtype, packed: set[str]) -> int:
    """The longest prompt the plan prefills (MAX_NATIVE_PREFILL*) for weights of `dtype` and the
    packed formats `packed` of its linear layers."""
    from . import BF16_FORMATS, _cpu_flags, gemv_extension
    from ..quant.linear import GGML_KERNEL_FORMATS

    extension = gemv_extension()
    onednn = extension is not None and extension.onednn_products()
    if packed:
        on_blocks = packed <= set(GGML_KERNEL_FORMATS) and "avx512_vnni" in _cpu_flags()
        if on_blocks:
            return MAX_NATIVE_PREFILL_GGML
        return MAX_NATIVE_PREFILL_4BIT_ONEDNN if onednn and packed <= set(BF16_FORMATS) else MAX_NATIVE_PREFILL_PACKED
    if dtype == torch.bfloat16:
        return MAX_NATIVE_PREFILL_BF16_ONEDNN if onednn and "avx512_bf16" in _cpu_flags() else MAX_NATIVE_PREFILL_BF16
    return MAX_NATIVE_PREFILL_ONEDNN if onednn else MAX_NATIVE_PREFILL


def relative_bias_table(model: nn.Module) -> torch.Tensor:
    """T5's decoder self-attention bias by distance, (block_size, H) fp32: row d is the bias of
    a key d positions before its query (t5.RelativeBias over causal buckets); empty for the
    other models."""
    bias = getattr(model, "decoder_bias", None)
    if bias is None:
        return torch.empty(0)
    from ..t5 import relative_bucket

    distance = torch.arange(model.config.block_size)
    bucket = relative_bucket(-distance, bias.bidirectional, bias.num_buckets, bias.max_distance)
    return bias.weight.detach()[bucket].float().contiguous()


def build_plan(model: nn.Module, extension) -> tuple[object, set[str]]:
    """decode.cpp's DecodePlan over the model's current weights; and the packed formats of its
    linear layers (a quantized token table aside)."""
    from ..model import MoE
    from ..quant.linear import StackedLinear

    c = model.config
    none = torch.empty(0, dtype=model.dtype)

    def module_at(block: nn.Module, name: str) -> nn.Module | None:
        if name == "mlp.up":
            name = "mlp.gate_up_proj" if c.mlp in ("swiglu", "geglu", "relu2_glu") else "mlp.up_proj"
        try:
            return block.get_submodule(name)
        except AttributeError:  # a norm this block does not have (post norms, q/k norms)
            return None

    def tensor_at(block: nn.Module, name: str) -> torch.Tensor:
        path, leaf = name.rsplit(".", 1)
        tensor = getattr(module_at(block, path), leaf, None)  # quantized experts: a ModuleList, set below
        return tensor.detach() if isinstance(tensor, torch.Tensor) else none

    def detached(tensor: torch.Tensor | None) -> torch.Tensor:
        return none if tensor is None else tensor.detach()

    layers = [[tensor_at(block, slot) if j not in MOE_SLOTS or isinstance(block.mlp, MoE) else none
               for j, slot in enumerate(LAYER_SLOTS)] for block in model.layers]
    # (T5's config has none of the decoder-only families' switches below: their defaults)
    n_experts, position = getattr(c, "n_experts", 0), getattr(c, "position", None)
    dims = [c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.intermediate_size, c.vocab_size,
            getattr(c, "rotary_dim", None) or c.head_dim,
            (c.moe_intermediate_size or c.intermediate_size) if n_experts else 0,
            getattr(c, "shared_expert_size", None) or 0]
    kinds = [c.norm == "rmsnorm", MLP_KINDS[c.mlp], PLACEMENTS[c.norm_position], PARALLEL[c.parallel],
             QK_NORMS[c.qk_norm], n_experts, getattr(c, "experts_per_token", 0), getattr(c, "norm_topk_prob", True)]
    scalars = [float(c.norm_eps), c.attention_scale or 0.0, c.attn_softcap or 0.0, getattr(c, "final_softcap", None)
               or 0.0, c.n_embd ** 0.5 if getattr(c, "scale_embeddings", False) else 0.0,
               c.n_embd ** -0.5 if getattr(c, "scale_head", False) else 0.0]
    windows = [c.layer_window(i) or 0 for i in range(c.n_layer)]
    ropes = [ROPES[c.layer_rope(i)] for i in range(c.n_layer)]
    pos = model.pos_embeddings.weight.detach() if position == "learned" else none
    inv_freq = model.rope_inv_freq.float().contiguous() if position == "rope" else torch.empty(0)
    local = getattr(model, "rope_local_inv_freq", None)
    local = local.float().contiguous() if local is not None else torch.empty(0)
    table = model.tok_embeddings  # a quantized table: looked up through set_quantized's layer -2
    table = table.weight.detach() if isinstance(table, nn.Embedding) else none
    plan = extension.DecodePlan(
        dims, [int(k) for k in kinds], scalars, windows, ropes, table, pos, inv_freq,
        local, model.norm.weight.detach(), detached(getattr(model.norm, "bias", None)),
        detached(getattr(model.lm_head, "weight", None)), detached(getattr(model.lm_head, "bias", None)), layers,
        relative_bias_table(model))
    # (layer, slot, expert, module) of every linear layer that may be packed; slots as decode.cpp's
    # set_quantized numbers them
    linears = [(i, slot, -1, module_at(block, name)) for i, block in enumerate(model.layers)
               for slot, name in enumerate(LINEAR_SLOTS + MOE_LINEAR_SLOTS)] + [(-1, 0, -1, model.lm_head)]
    linears.append((-2, 0, -1, model.tok_embeddings))  # a quantized table (an nn.Embedding has no kernel_operands)
    for i, block in enumerate(model.layers):
        if isinstance(block.mlp, MoE):
            for slot, stack in ((6, block.mlp.gate_up_proj), (7, block.mlp.down_proj)):
                if isinstance(stack, nn.ModuleList):  # experts quantized one by one (quant/linear.py)
                    linears += [(i, slot, e, module) for e, module in enumerate(stack)]
    packed = set()
    for layer, slot, expert, module in linears:
        # (part index or -1, first row, rows, module): a StackedLinear's parts one by one
        parts = ([(-1, 0, 0, module)] if not isinstance(module, StackedLinear) else
                 [(j, sum(p.out_features for p in module.parts[:j]), part.out_features, part)
                  for j, part in enumerate(module.parts)])
        for part, row0, rows, m in parts:
            ops = m.kernel_operands() if hasattr(m, "kernel_operands") else None
            if ops is not None:
                plan.set_quantized(layer, slot, expert, extension.weight_kinds[ops.format], ops.data, ops.scales,
                                   ops.offsets, ops.group, ops.tensor_scale, ops.act_bits, part, row0, rows)
                if layer != -2:  # (the table's rows are looked up, not multiplied)
                    packed.add(ops.format)
    return plan, packed
