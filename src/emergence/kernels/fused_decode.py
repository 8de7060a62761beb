"""Whole decoding steps in one native call, for batch-1 decoding on the CPU.

`Transformer.forward` hands a step here when it is batch-1, one new token, with a KV cache
and no padding, and no gradient is needed. The native `DecodePlan` (decode.cpp) keeps
references to the model's weight tensors; when any parameter is replaced (a new state dict,
a dtype change, swapped modules) the plan is rebuilt at the next generation (the first step
with a new KV cache), so it never computes with stale weights.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import InvalidArgument

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
        """CPU weights, all fp32 or all bf16, and only the modules model.py builds (no quantized or
        adapter modules swapped in)."""
        from ..model import MLP, Attention, Block, RMSNorm, Transformer
        from . import DecodeLinear

        if not isinstance(model, Transformer):
            return False
        dtypes = {p.dtype for p in model.parameters()}
        devices = {p.device.type for p in model.parameters()}
        if devices != {"cpu"} or len(dtypes) != 1 or dtypes.pop() not in (torch.float32, torch.bfloat16):
            return False
        known = {Transformer, Block, Attention, MLP, nn.ModuleList, nn.Linear, DecodeLinear, nn.Embedding,
                 nn.LayerNorm, RMSNorm}
        return all(type(m) in known for m in model.modules()) and all(p.is_contiguous() for p in model.parameters())

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        """input_ids (1, 1) -> logits (1, 1, V), writing the token's keys and values into cache;
        None when the model no longer suits the plan (the caller then runs the eager forward)."""
        position = cache.length
        if position + 1 > model.config.block_size:
            raise InvalidArgument(f"{position + 1} tokens exceed the context window of {model.config.block_size}")
        if self.checked_cache is None or self.checked_cache() is not cache:
            if self._fingerprint(model) != self.fingerprint:
                if not self.supports(model):
                    return None
                self._build(model)
            self.checked_cache = weakref.ref(cache)
        logits = self.plan.step(int(input_ids[0, 0]), position, cache.k, cache.v)
        cache.advance(1)
        return logits

    @staticmethod
    def _fingerprint(model: nn.Module) -> list:
        """Each module's class and each parameter's storage address and dtype (~0.3 ms for 30
        layers, where model.parameters() takes ~3 ms)."""
        out, stack = [], [model]
        while stack:
            module = stack.pop()
            out.append(type(module))
            out.extend((p.data_ptr(), p.dtype) for p in module._parameters.values() if p is not None)
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
            model.lm_head.weight.detach(), layers)
        self.fingerprint = self._fingerprint(model)
