"""Whole decoding steps in one native call, for decoding on the CPU.

`Transformer.forward` hands a step here when every row brings one new token, with a KV cache,
and no gradient is needed: one row without padding runs `DecodePlan.step` (GEMVs), several
left-padded rows (batched generation, the serving engine) run `step_batch` (one GEMM per
linear layer over the rows). A short prompt of one row whose last logits alone are wanted
runs `prefill_rows` (its tokens as the GEMM's rows), and the serving engine prefills the
prompts that join together with `prefill_many` (the same call, one cache row per prompt); longer prompts stay with the eager forward, whose
large GEMMs and fused attention serve them better. The native `DecodePlan` (decode.cpp) keeps
references to the model's weight tensors; when any parameter is replaced (a new state dict,
a dtype change, swapped modules) the plan is rebuilt at the next generation (the first step
with a new KV cache), so it never computes with stale weights.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import InvalidArgument

# Quantized formats (emergence.quant) with a native kernel -> decode.cpp's WeightKind.
KERNEL_KINDS = {"q8_0": 2, "q4_0": 3, "int8": 4, "int4": 5, "ternary": 6, "nf4": 7}
# The longest prompt prefilled natively, where that is at least as fast as the eager forward
# (bench/bench_batched.py, smollm2-135m shapes): fp32 weights up to 32 tokens; bf16 up to 16
# (at 32, oneDNN's bf16 GEMM is level or ahead); packed quantized weights up to 4 (their kernels
# read the weights once per token, where the eager path dequantizes once per call).
MAX_NATIVE_PREFILL, MAX_NATIVE_PREFILL_BF16, MAX_NATIVE_PREFILL_PACKED = 32, 16, 4
# The linear layers of a block, by decode.cpp's slot number.
_LINEAR_SLOTS = ("attn.qkv_proj", "attn.o_proj", "mlp.up", "mlp.down_proj")

# Tensor slots per layer in the order decode.cpp expects them.
_LAYER_SLOTS = ("attn_norm.weight", "attn_norm.bias", "attn.qkv_proj.weight", "attn.qkv_proj.bias",
                "attn.o_proj.weight", "attn.o_proj.bias", "mlp_norm.weight", "mlp_norm.bias",
                "mlp.up.weight", "mlp.up.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


class FusedDecoder:
    def __init__(self, model: nn.Module, extension) -> None:
        self.extension = extension
        self.plan = None
        self.fingerprint: list = []
        self.checked_cache = None  # weak reference to the KV cache whose generation was checked
        self._build(model)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """CPU weights, all fp32 or all bf16, and only the modules model.py builds, or quantized
        linear layers in a format with a kernel (no adapters or other modules swapped in)."""
        from ..model import MLP, Attention, Block, RMSNorm, Transformer
        from ..quant.linear import QuantizedLinear
        from . import DecodeLinear

        if not isinstance(model, Transformer):
            return False
        dtypes = {p.dtype for p in model.parameters()}
        devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
        if devices != {"cpu"} or len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.bfloat16):
            return False
        known = {Transformer, Block, Attention, MLP, nn.ModuleList, nn.Linear, DecodeLinear, nn.Embedding,
                 nn.LayerNorm, RMSNorm}
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                if not _has_kernel(m):
                    return False
            elif type(m) not in known:
                return False
        return all(p.is_contiguous() for p in model.parameters())

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        """input_ids (B, 1) -> logits (B, 1, V), or a one-row prompt (1, T) -> its last token's
        logits (1, 1, V), writing the keys and values into cache; None when the model, the
        cache or the prompt's length does not suit the plan (the caller then runs the eager
        forward)."""
        slot, (B, T) = cache.length, input_ids.shape
        if T > 1 and (B > 1 or cache.has_padding or T > self.max_prefill):
            return None
        # the longest row (least padding) must fit the context, as in the eager forward
        longest = slot + T - (int(cache.pad.min()) if cache.has_padding else 0)
        if longest > model.config.block_size:
            raise InvalidArgument(f"{longest} tokens exceed the context window of {model.config.block_size}")
        if not self._ready(model, cache):
            return None
        if T > 1:  # one row's prompt, at slots slot .. slot + T - 1, no padding
            tokens = input_ids[0].to(device="cpu", dtype=torch.long).contiguous()
            zeros = torch.zeros(T, dtype=torch.long)
            logits = self.plan.prefill_rows(tokens, zeros, torch.arange(slot, slot + T), zeros, [T - 1],
                                            cache.k, cache.v)
        elif B == 1 and not cache.has_padding:
            logits = self.plan.step(int(input_ids[0, 0]), slot, cache.k, cache.v)
        else:
            tokens = input_ids[:, 0].to(device="cpu", dtype=torch.long).contiguous()
            pads = cache.pad.to(device="cpu", dtype=torch.long).contiguous()
            logits = self.plan.step_batch(tokens, pads, slot, cache.k, cache.v)
        cache.advance(T)
        return logits

    @property
    def max_prefill(self) -> int:
        """The longest prompt prefilled natively."""
        if self.packed:
            return MAX_NATIVE_PREFILL_PACKED
        return MAX_NATIVE_PREFILL_BF16 if self.dtype == torch.bfloat16 else MAX_NATIVE_PREFILL

    def prefill_many(self, model: nn.Module, prompts: list[list[int]], cache) -> torch.Tensor | None:
        """Prefill several prompts (each at most max_prefill tokens) in one call, prompt j
        left-padded into row j of `cache` so that it ends at slot cache.max_len - 1 (which is
        the longest prompt's length). Returns each prompt's last-token logits (J, 1, V), or None
        when the model no longer suits the plan. cache.length is left untouched."""
        width = cache.max_len
        if any(not 0 < len(p) <= min(self.max_prefill, width) for p in prompts) or len(prompts) > cache.k[0].shape[0]:
            raise InvalidArgument("prefill_many: every prompt must fit max_prefill and the cache's width")
        if width > model.config.block_size:
            raise InvalidArgument(f"{width} tokens exceed the context window of {model.config.block_size}")
        if not self._ready(model, cache):
            return None
        rows = torch.tensor([j for j, p in enumerate(prompts) for _ in p])
        slots = torch.tensor([width - len(p) + i for p in prompts for i in range(len(p))])
        firsts = torch.tensor([width - len(p) for p in prompts for _ in p])
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1  # each prompt's last row
        tokens = torch.tensor([t for p in prompts for t in p])
        return self.plan.prefill_rows(tokens, rows, slots, firsts, ends.tolist(), cache.k, cache.v)

    def _ready(self, model: nn.Module, cache) -> bool:
        """Whether the plan can run on `cache`: contiguous tensors, and the model's weights
        still those the plan holds (checked once per cache object: the first step of a new
        generation rebuilds the plan if parameters were replaced)."""
        if any(not (k.is_contiguous() and v.is_contiguous()) for k, v in zip(cache.k, cache.v)):
            return False
        if self.checked_cache is None or self.checked_cache() is not cache:
            if self._fingerprint(model) != self.fingerprint:
                if not self.supports(model):
                    return False
                self._build(model)
            self.checked_cache = weakref.ref(cache)
        return True

    @staticmethod
    def _fingerprint(model: nn.Module) -> list:
        """Each module's class and each parameter's storage address and dtype (~0.3 ms for 30
        layers, where model.parameters() takes ~3 ms)."""
        out, stack = [], [model]
        while stack:
            module = stack.pop()
            out.append(type(module))
            out.extend((p.data_ptr(), p.dtype) for p in module._parameters.values() if p is not None)
            out.extend((b.data_ptr(), b.dtype) for b in module._buffers.values() if b is not None)
            stack.extend(m for m in module._modules.values() if m is not None)
        return out

    def _build(self, model: nn.Module) -> None:
        c = model.config
        none = torch.empty(0, dtype=model.tok_embeddings.weight.dtype)

        def get(module: nn.Module, name: str) -> torch.Tensor:
            if name.startswith("mlp.up."):  # SwiGLU's fused gate_up or the GELU MLP's up projection
                name = name.replace("mlp.up.", "mlp.gate_up_proj." if c.mlp == "swiglu" else "mlp.up_proj.")
            *path, leaf = name.split(".")
            for part in path:
                module = getattr(module, part)
            tensor = getattr(module, leaf, None)
            return none if tensor is None else tensor.detach()

        layers = [[get(block, slot) for slot in _LAYER_SLOTS] for block in model.layers]
        dims = [c.n_layer, c.n_head, c.n_kv_head, c.head_dim, c.n_embd, c.intermediate_size, c.vocab_size,
                c.sliding_window or 0]
        pos = model.pos_embeddings.weight.detach() if c.position == "learned" else none
        inv_freq = model.rope_inv_freq.float().contiguous() if c.position == "rope" else torch.empty(0)
        norm_bias = getattr(model.norm, "bias", None)
        self.plan = self.extension.DecodePlan(
            dims, c.norm == "rmsnorm", c.mlp == "swiglu", float(c.norm_eps), model.tok_embeddings.weight.detach(),
            pos, inv_freq, model.norm.weight.detach(), none if norm_bias is None else norm_bias.detach(),
            model.lm_head.weight.detach() if hasattr(model.lm_head, "weight") else none, layers)
        self.dtype = model.tok_embeddings.weight.dtype
        self.packed = False  # any packed quantized weight
        for i, block in enumerate(model.layers):
            for slot, name in enumerate(_LINEAR_SLOTS):
                module = _submodule(block, name, c.mlp)
                if _has_kernel(module):
                    self.plan.set_quantized(i, slot, *_kernel_operands(module))
                    self.packed = True
        if _has_kernel(model.lm_head):
            self.plan.set_quantized(-1, 0, *_kernel_operands(model.lm_head))
            self.packed = True
        self.fingerprint = self._fingerprint(model)


def _submodule(block: nn.Module, name: str, mlp: str) -> nn.Module:
    if name == "mlp.up":  # SwiGLU's fused gate_up or the GELU MLP's up projection
        name = "mlp.gate_up_proj" if mlp == "swiglu" else "mlp.up_proj"
    for part in name.split("."):
        block = getattr(block, part)
    return block


def _has_kernel(module: nn.Module) -> bool:
    """A quantized linear layer whose format and shape a native kernel handles."""
    fmt = getattr(module, "format", None)
    if fmt not in KERNEL_KINDS or not hasattr(module, "dequantize"):
        return False
    return module.in_features % (64 if fmt in ("ternary", "nf4") else 32) == 0


def pack_ternary(values: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 in {-1, 0, 1} -> (N, K / 4) uint8, the 2-bit layout of quant_rows.h: within each
    64-column chunk, byte j holds columns j, j+16, j+32, j+48 (bits 0-1, 2-3, 4-5, 6-7) as value + 1."""
    N, K = values.shape
    codes = (values.to(torch.int32) + 1).view(N, K // 64, 4, 16)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.to(torch.uint8).reshape(N, K // 4).contiguous()


def _kernel_operands(m: nn.Module) -> tuple:
    """(kind, data, scales, offsets, group, tensor scale, act_bits) for DecodePlan.set_quantized."""
    none = torch.empty(0)
    kind = KERNEL_KINDS[m.format]
    if m.format in ("q8_0", "q4_0"):
        return kind, m.blocks.contiguous(), none, none, 0, 0.0, 0
    if m.format == "int8":
        return kind, m.qweight.view(torch.uint8).contiguous(), m.scales.float().contiguous(), none, 0, 0.0, 0
    if m.format == "int4":
        group = m.in_features // m.scales.shape[1]
        return kind, m.qweight.contiguous(), m.scales.float().contiguous(), m.offsets.float().contiguous(), group, 0.0, 0
    if m.format == "nf4":
        from ..quant.methods import NF4_TABLE

        absmax = m.absmax().float().reshape(m.out_features, m.in_features // 64).contiguous()
        return kind, m.qweight.contiguous(), absmax, NF4_TABLE.contiguous(), 64, 0.0, 0
    return kind, pack_ternary(m.qweight), none, none, 0, float(m.scale), m.act_bits or 0
