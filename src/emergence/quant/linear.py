"""Quantized linear layers and `quantize_model`, which swaps them in for nn.Linear.

Each format is a `QuantizedLinear` subclass holding its packed data as buffers (they are what
the checkpoint stores, bit for bit) and a `format` name. `dequantize()` gives the (N, K)
float32 weight; `forward` is the reference path F.linear(x, W_deq in x.dtype, bias), any
batch shape. N = out_features, K = in_features. Storage, exactly:

    int8     qweight int8 (N, K); scales float32 (N,)
             W[n, k] = qweight[n, k] * scales[n]
    int4     qweight uint8 (N, K/2): byte j of row n holds column 2j in bits 0-3 (low nibble)
             and column 2j+1 in bits 4-7 (high nibble); scales, offsets float32 (N, K/g)
             W[n, k] = code[n, k] * scales[n, k // g] + offsets[n, k // g], code in 0..15,
             g = group_size (32, 64 or 128; K % g == 0). RTN: offset = group min,
             scale = (max - min) / 15. GPTQ fills the same layout.
    nf4      the weight flattened row-major, n = N*K elements, blocks of 64 (last one partial)
             qweight uint8 (ceil(n/2),): element 2i in the HIGH nibble, 2i+1 in the low one
             (bitsandbytes' order; an odd n pads one code 0)
             absmax_q uint8 (B,), B = ceil(n/64); absmax_scales float32 (ceil(B/256),);
             absmax_mean float32 (1,)
             absmax[b] = DYNAMIC_MAP[absmax_q[b]] * absmax_scales[b // 256] + absmax_mean
             W.flat[i] = NF4_TABLE[code[i]] * absmax[i // 64]
    ternary  qweight int8 (N, K) in {-1, 0, 1} (one byte per weight, unpacked); scale float32 (1,)
             W[n, k] = qweight[n, k] * scale; with act_bits=8, x is quantized per token first
    q8_0 ... blocks uint8 (N, K / block * type_size): each row is ggml's blocks of that type,
             byte for byte (`emergence.gguf.quants`); K % 32 == 0 (256 for the K-quants
             q4_k, q5_k, q6_k). The forward pass quantizes the activations as llama.cpp's
             CPU dot products do (Q8_0 blocks of 32, Q8_K blocks of 256 for the K-quants);
             every format has native kernels: a GEMV for decoding (kernels/ggml_rows.h) and
             a product on the blocks for prompts (quant_rows.h's qgemm_ggml); all but q8_0 and
             q4_0 need AVX512-VNNI (q8_0 and q4_0's prompts too).

`kernel_operands()` gives what the native kernels read of a layer (kernels/quant_rows.h has
the layouts), or None where no kernel handles its format or shape; the kernels never read
the buffers by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidArgument
from ..gguf import quants as ggml
from . import methods as m

# ------------------------------------------------------------------------------ the modules
@dataclass(frozen=True)
class KernelOperands:
    """A packed weight as the native kernels read it (kernels/quant_rows.h): the format's name
    (its kernel id comes from the extension's `weight_kinds` table), the packed data, per-row or
    per-group scales and offsets (or NF4's code table), the group size, one scale for the whole
    tensor (ternary) and the activation bits (8: quantize the input per token first)."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    group: int = 0
    tensor_scale: float = 0.0
    act_bits: int = 0


_NONE = torch.empty(0)



class QuantizedLinear(nn.Module):
    """Base class: in_features, out_features, an optional float bias, packed buffers.

    Subclasses define `format`, their buffers (allocated empty by `__init__`, on any device,
    "meta" included, so a checkpoint can be assigned into them), `quantize_(weight, ...)`
    which fills them, `dequantize()`, and `options()`: the keyword arguments that rebuild the
    layout (recorded per module in checkpoints).

    Moving the model to another dtype (model.to(torch.bfloat16)) converts the bias only: the
    packed buffers and their scales keep their stored dtypes, so they stay bit-exact.
    """

    format: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.method = "rtn"  # how the codes were chosen ("gptq" for calibrated int4)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=bias_dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def check(cls, in_features: int, out_features: int, what: str = "the layer", **options) -> None:
        """Raise InvalidArgument when the shape does not suit the format (before any work)."""

    def options(self) -> dict:
        return {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> QuantizedLinear:
        """A quantized copy of `linear` (on its device); `linear` itself is left as it was."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                     bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32, **options)
        module.quantize_(linear.weight)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def quantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """(N, K) float32."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import native_qgemm

        y = native_qgemm(self, x, self.bias)  # (a prompt: widened by tiles, never the whole fp32 matrix)
        if y is not None:
            return y
        return F.linear(x, self.unpacked_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # Input features must be a multiple of this for the format's native kernel (0: no kernel).
    kernel_block: int = 0

    def kernel_operands(self) -> KernelOperands | None:
        """The operands of the native kernels, or None (no kernel for this format or shape, or
        the layer is not on the CPU). Computed once per set of buffers: a repacking (ternary's
        2-bit layout) or restored table (NF4's absmax) is not redone for every decode batch."""
        if not self.kernel_block or self.in_features % self.kernel_block:
            return None
        buffers = [b for b in self.buffers() if b is not None]
        if any(b.device.type != "cpu" for b in buffers):
            return None
        key = tuple((b.data_ptr(), b.dtype) for b in buffers)
        cached = self.__dict__.get("_kernel_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._kernel_operands())
            self.__dict__["_kernel_cache"] = cached
        return cached[1]

    def _kernel_operands(self) -> KernelOperands:
        raise NotImplementedError

    def unpacked_weight(self) -> torch.Tensor:
        """dequantize(), through the native kernels where they handle the format (same values)."""
        from ..kernels import native_dequantize

        w = native_dequantize(self)
        return self.dequantize() if w is None else w

    def nbytes(self) -> int:
        """Bytes of the stored buffers and bias."""
        return sum(t.numel() * t.element_size() for t in list(self.buffers()) + list(self.parameters()))

    def _apply(self, fn, recurse=True):
        stored = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # follow device moves, never dtype casts
        return self

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options().items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}{opts}, method={self.method}")


class Int8Linear(QuantizedLinear):
    """Per-output-channel absmax int8: scale[n] = max|W[n, :]| / 127."""

    format = "int8"

    def __init__(self, in_features, out_features, bias=True, *, device=None, bias_dtype=torch.float32) -> None:
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    kernel_block = 1  # any width: the kernel sums the tail past the last 32 columns on its own

    def quantize_(self, weight):
        self.qweight, self.scales = m.quantize_int8(weight)

    def dequantize(self):
        return m.dequantize_int8(self.qweight, self.scales)

    def _kernel_operands(self):
        return KernelOperands("int8", self.qweight.view(torch.uint8).contiguous(), self.scales.float().contiguous(),
                              _NONE)


class Int4Linear(QuantizedLinear):
    """Group-wise asymmetric 4-bit: W ~= code * scale + offset per group of `group_size` inputs.

    `from_linear(linear)` rounds to nearest; `from_linear(linear, hessian=H)` runs GPTQ with
    the layer's input Hessian H (K, K) into the same grid and layout.
    """

    format = "int4"
    DEFAULT_GROUP_SIZE = 64

    def __init__(self, in_features, out_features, bias=True, *, device=None, bias_dtype=torch.float32,
                 group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.check(in_features, out_features, group_size=group_size)
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("offsets", torch.empty(out_features, groups, dtype=torch.float32, device=device))

    @classmethod
    def check(cls, in_features, out_features, what="the layer", group_size=DEFAULT_GROUP_SIZE, **_):
        m.check_group_size(group_size, in_features, what)

    def options(self):
        return {"group_size": self.group_size}

    @classmethod
    def from_linear(cls, linear, hessian: torch.Tensor | None = None, **options):
        module = super().from_linear(linear, **options)
        if hessian is not None:  # replace the round-to-nearest codes with GPTQ's
            codes, module.scales, module.offsets = m.gptq_int4(linear.weight, hessian.to(linear.weight.device),
                                                               module.group_size)
            module.qweight = m.pack_nibbles(codes)
            module.method = "gptq"
        return module

    def quantize_(self, weight):
        codes, self.scales, self.offsets = m.quantize_int4_rtn(weight, self.group_size)
        self.qweight = m.pack_nibbles(codes)

    def codes(self) -> torch.Tensor:
        """(N, K) uint8 codes 0..15."""
        return m.unpack_nibbles(self.qweight)

    def dequantize(self):
        return m.dequantize_int4(self.codes(), self.scales, self.offsets)

    kernel_block = 32

    def _kernel_operands(self):
        return KernelOperands("int4", self.qweight.contiguous(), self.scales.float().contiguous(),
                              self.offsets.float().contiguous(), self.group_size)


class NF4Linear(QuantizedLinear):
    """QLoRA's NF4 with double quantization, in bitsandbytes' layout (block size 64, second
    level block size 256 over the mean-centred absmax values)."""

    format = "nf4"

    def __init__(self, in_features, out_features, bias=True, *, device=None, bias_dtype=torch.float32) -> None:
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        n = in_features * out_features
        blocks = -(-n // m.NF4_BLOCK)
        self.register_buffer("qweight", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_q", torch.empty(blocks, dtype=torch.uint8, device=device))
        self.register_buffer("absmax_scales", torch.empty(-(-blocks // m.NF4_ABSMAX_BLOCK), dtype=torch.float32,
                                                          device=device))
        self.register_buffer("absmax_mean", torch.empty(1, dtype=torch.float32, device=device))

    def quantize_(self, weight):
        codes, absmax = m.nf4_quantize_blocks(weight)
        self.qweight = m.pack_nf4(codes)
        self.absmax_q, self.absmax_scales, self.absmax_mean = m.double_quantize(absmax)

    def absmax(self) -> torch.Tensor:
        """(B,) float32: the first-level block absmax values, as double quantization restores them."""
        return m.double_dequantize(self.absmax_q, self.absmax_scales, self.absmax_mean)

    def dequantize(self):
        return m.dequantize_nf4(self.qweight, self.absmax(), (self.out_features, self.in_features))

    kernel_block = 64  # one absmax per 64 weights of a row

    def _kernel_operands(self):
        absmax = self.absmax().float().reshape(self.out_features, self.in_features // 64).contiguous()
        return KernelOperands("nf4", self.qweight.contiguous(), absmax, m.NF4_TABLE.contiguous(), 64)


class TernaryLinear(QuantizedLinear):
    """BitNet b1.58: W ~= values * scale, values in {-1, 0, 1}, scale = mean|W|.

    act_bits=8 also quantizes the input per token (absmax to -128..127), as the paper's
    BitLinear does; the matmul runs on the integer values and the result is rescaled by
    scale / s afterwards.
    """

    format = "ternary"

    def __init__(self, in_features, out_features, bias=True, *, device=None, bias_dtype=torch.float32,
                 act_bits: int | None = None) -> None:
        self.check(in_features, out_features, act_bits=act_bits)
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self.act_bits = act_bits
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(1, dtype=torch.float32, device=device))

    @classmethod
    def check(cls, in_features, out_features, what="the layer", act_bits=None, **_):
        if act_bits not in (None, 8):
            raise InvalidArgument(f"ternary act_bits must be 8 or None, got {act_bits}")

    def options(self):
        return {"act_bits": self.act_bits}

    def quantize_(self, weight):
        self.qweight, self.scale = m.quantize_ternary(weight)

    def dequantize(self):
        return self.qweight.float() * self.scale

    kernel_block = 64  # the 2-bit layout packs chunks of 64 columns

    def _kernel_operands(self):
        return KernelOperands("ternary", m.pack_ternary_2bit(self.qweight), _NONE, _NONE, 0, float(self.scale),
                              self.act_bits or 0)

    def forward(self, x):
        if self.act_bits is None:
            return super().forward(x)
        xq, s = m.quantize_activations_int8(x)  # (..., K) integers in float32, (..., 1)
        # Integer-valued products summed in float32: exact while 127 * K < 2^24.
        y = F.linear(xq, self.qweight.float()) * (self.scale / s)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


# The ggml block formats the brief names, in ggml's own spelling.
GGML_FORMATS: dict[str, ggml.GGMLType] = {
    t.name.lower(): t for t in (ggml.GGMLType.Q8_0, ggml.GGMLType.Q4_0, ggml.GGMLType.Q4_1, ggml.GGMLType.Q5_0,
                                ggml.GGMLType.Q5_1, ggml.GGMLType.Q4_K, ggml.GGMLType.Q5_K, ggml.GGMLType.Q6_K)
}


# The ggml formats the native kernels read: decode.cpp's GEMVs and row lookups, and qgemm_ggml's
# prompts on the packed blocks (all but q8_0 and q4_0 only where the CPU has AVX512-VNNI,
# GGML_VNNI_ONLY; q8_0 and q4_0 decode without it, their prompts need it too).
GGML_KERNEL_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
GGML_VNNI_ONLY = ("q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")


def has_ggml_kernel(fmt: str) -> bool:
    """Whether the native kernels read ggml format `fmt` on this CPU."""
    from ..kernels import _cpu_flags

    return fmt in GGML_KERNEL_FORMATS and (fmt not in GGML_VNNI_ONLY or "avx512_vnni" in _cpu_flags())


class GGMLLinear(QuantizedLinear):
    """A weight stored as ggml blocks (q8_0, q4_0, ...), each row as llama.cpp stores it."""

    def __init__(self, in_features, out_features, bias=True, *, device=None, bias_dtype=torch.float32,
                 ggml_format: str = "q8_0") -> None:
        self.check(in_features, out_features, ggml_format=ggml_format)
        super().__init__(in_features, out_features, bias, device=device, bias_dtype=bias_dtype)
        self.format = ggml_format
        self.ggml_type = GGML_FORMATS[ggml_format]
        row_bytes = ggml.nbytes(self.ggml_type, (in_features,))
        self.register_buffer("blocks", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))

    @classmethod
    def check(cls, in_features, out_features, what="the layer", ggml_format="q8_0", **_):
        if ggml_format not in GGML_FORMATS:
            raise InvalidArgument(f"unknown ggml format {ggml_format!r}")
        block = ggml.BLOCK_SIZES[GGML_FORMATS[ggml_format]][0]
        if in_features % block:
            raise InvalidArgument(f"{what} has {in_features} input features, not a multiple of the "
                                  f"{ggml_format} block size {block}")

    def options(self):
        return {"ggml_format": self.format}

    @property
    def kernel_block(self) -> int:
        return ggml.BLOCK_SIZES[self.ggml_type][0] if has_ggml_kernel(self.format) else 0

    def _kernel_operands(self):
        return KernelOperands(self.format, self.blocks.contiguous(), _NONE, _NONE)

    def quantize_(self, weight):
        if self.ggml_type not in ggml.QUANTIZE:
            raise InvalidArgument(f"{self.format}: emergence.gguf has no quantizer for {self.ggml_type.name} "
                                  f"(quantizable: {', '.join(quantizable_formats())})")
        raw = ggml.quantize(weight.detach(), self.ggml_type)  # (N, row bytes) uint8
        self.blocks = torch.from_numpy(raw).to(weight.device)

    def dequantize(self):
        w = ggml.dequantize(self.blocks.detach().cpu().numpy(), self.ggml_type, (self.out_features, self.in_features))
        return w.to(self.blocks.device)

    def forward(self, x):
        """llama.cpp's numerics: the activations are quantized to 8 bits first, as its CPU dot
        products do: per block of 32 for the 32-block formats (as the native decode kernels do
        too), per block of 256 (Q8_K) for the K-quants. Every format multiplies on the packed
        blocks natively (integer dot products per block or sub-block: kernels.native_qgemm,
        with AVX512-VNNI); without the kernels, the quantized x times the dequantized weight."""
        from ..kernels import native_qgemm

        y = native_qgemm(self, x, self.bias)
        if y is not None:
            return y
        if self.format in m.GGML_Q8_ACTIVATIONS:
            xq = m.quantize_activations_q8_0(x)
        elif self.format in m.GGML_Q8_K_ACTIVATIONS:
            xq = m.quantize_activations_q8_k(x)
        else:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xq, self.unpacked_weight(), None).to(x.dtype) + (0 if bias is None else bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format}")


class GGMLEmbedding(nn.Module):
    """A token embedding table stored as ggml blocks, as a quantized GGUF file holds token_embd:
    blocks uint8 (V, D / block * type_size), row t the vector of token t. A lookup dequantizes
    only the rows it reads, in the model's float dtype: the dtype of the `probe` buffer (empty,
    not saved), which model.to(dtype) converts as it converts the norms. A tied output head is a
    GGMLLinear over the same `blocks` tensor (`tied_head`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ggml_format: str, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        GGMLLinear.check(embedding_dim, num_embeddings, "the token embedding", ggml_format=ggml_format)
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.format = num_embeddings, embedding_dim, ggml_format
        self.ggml_type = GGML_FORMATS[ggml_format]
        row_bytes = ggml.nbytes(self.ggml_type, (embedding_dim,))
        self.register_buffer("blocks", torch.empty(num_embeddings, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("probe", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.probe.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., D) in the model's dtype."""
        rows = self.blocks[ids.reshape(-1)].cpu().numpy()  # (n, row bytes)
        w = ggml.dequantize(rows, self.ggml_type, (rows.shape[0], self.embedding_dim))
        return w.to(device=self.blocks.device, dtype=self.dtype).reshape(*ids.shape, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        """The whole (V, D) table as float32."""
        return ggml.dequantize(self.blocks.cpu().numpy(), self.ggml_type,
                               (self.num_embeddings, self.embedding_dim)).to(self.blocks.device)

    def kernel_operands(self) -> KernelOperands | None:
        """What the native step reads to look rows up (every format with a GEMV has a row decoder), else None."""
        if not has_ggml_kernel(self.format):
            return None
        return KernelOperands(self.format, self.blocks.contiguous(), _NONE, _NONE)

    def tied_head(self, bias: torch.Tensor | None = None) -> GGMLLinear:
        """An output head (D -> V) reading this table's blocks: a tied lm_head, nothing copied."""
        head = GGMLLinear(self.embedding_dim, self.num_embeddings, bias is not None, device="meta",
                          ggml_format=self.format)
        head.blocks = self.blocks
        if bias is not None:
            head.bias = nn.Parameter(bias, requires_grad=False)
        return head

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.format}"


class StackedLinear(nn.Module):
    """Linear layers whose outputs are concatenated: one of our fused matrices (q/k/v, gate/up)
    whose parts a GGUF file holds in different types, each part kept in its own (llama.cpp's _M
    mixes put attn_v in Q6_K beside Q4_K q and k). Parts are GGMLLinear or float nn.Linear layers
    without bias; the fused bias is the stack's. The native step multiplies a stack of
    quantized parts part by part (decode.cpp's stacked Linear); a stack with a float part
    decodes eagerly."""

    def __init__(self, parts: Sequence[nn.Module], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def format(self) -> str:
        return "+".join(p.format if isinstance(p, QuantizedLinear) else str(p.weight.dtype).removeprefix("torch.")
                        for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self) -> torch.Tensor:
        """The fused (N, K) weight as float32."""
        return torch.cat([p.dequantize() if isinstance(p, QuantizedLinear) else p.weight.detach().float()
                          for p in self.parts])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"


# Format name -> module class (the ggml names all map to GGMLLinear, told apart by ggml_format).
FORMATS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear, "ternary": TernaryLinear,
    **{name: GGMLLinear for name in GGML_FORMATS},
}


def quantizable_formats() -> list[str]:
    """Format names `quantize_model` can produce here (ggml ones need a quantizer in emergence.gguf),
    plus "int4-gptq"."""
    names = [n for n in FORMATS if n not in GGML_FORMATS or GGML_FORMATS[n] in ggml.QUANTIZE]
    return names[:2] + ["int4-gptq"] + names[2:]


def make_module(fmt: str, in_features: int, out_features: int, bias: bool, *, device=None,
                bias_dtype: torch.dtype = torch.float32, **options) -> QuantizedLinear:
    """An empty (unfilled) module of format `fmt`, e.g. on the meta device to load a checkpoint into."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown quantization format {fmt!r}")
    if fmt in GGML_FORMATS:
        options = {**options, "ggml_format": fmt}
    return FORMATS[fmt](in_features, out_features, bias, device=device, bias_dtype=bias_dtype, **options)


# --------------------------------------------------------------------------- quantize_model
def quantize_model(model: nn.Module, fmt: str, *, group_size: int | None = None,
                   calibration: torch.Tensor | Sequence[torch.Tensor] | None = None, act_bits: int | None = None,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Swap every nn.Linear of `model` for a quantized layer; in place.

    fmt: "int8", "int4" (round to nearest), "int4-gptq" (GPTQ; needs `calibration`), "nf4",
    "ternary", or a ggml block format ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k",
    "q6_k"; the K-quants need in_features in multiples of 256).
    group_size: int4 only (32, 64 or 128; default 64).
    calibration: int4-gptq only: token id tensors, each (T,) or (B, T); every row is one sequence.
    act_bits: ternary only: 8 quantizes activations per token (BitNet b1.58), None keeps them.
    skip: layers kept in full precision, by qualified name or by its last parts ("lm_head",
    "down_proj", "layers.0.attn.qkv_proj"). Embeddings are never quantized, and neither is an
    lm_head tied to them (it stays tied). A mixture of experts' stacked experts are quantized
    expert by expert (unstack_experts; skipped as a stack by "gate_up_proj" or "down_proj"); its
    router and shared-expert gate stay in full precision, as llama.cpp's quantizer keeps them.

    Every layer is checked before any is replaced: a shape the format cannot take (group size
    not dividing in_features, ...) raises InvalidArgument naming the layer, and so does a model
    that is already quantized. The next decode batch builds its native plan over the new layers
    (the formats with a kernel decode natively; the others eagerly).
    """
    existing = next((mod for mod in model.modules() if isinstance(mod, QuantizedLinear)), None)
    if existing is not None:
        raise InvalidArgument(f"the model is already quantized ({existing.format}); quantize a full-precision model")
    base, gptq = (fmt[:-len("-gptq")], True) if fmt.endswith("-gptq") else (fmt, False)
    if base not in FORMATS or (gptq and base != "int4"):
        raise InvalidArgument(f"unknown quantization format {fmt!r} (known: {', '.join(quantizable_formats())})")
    if base in GGML_FORMATS and GGML_FORMATS[base] not in ggml.QUANTIZE:
        raise InvalidArgument(f"{base}: emergence.gguf has no quantizer for {GGML_FORMATS[base].name} yet "
                              f"(quantizable: {', '.join(quantizable_formats())})")
    if group_size is not None and base != "int4":
        raise InvalidArgument(f"group size applies to int4 only, not {fmt}")
    if act_bits is not None and base != "ternary":
        raise InvalidArgument(f"act_bits applies to ternary only, not {fmt}")
    if calibration is not None and not gptq:
        raise InvalidArgument(f"calibration data is used by int4-gptq only, not {fmt}")
    if gptq and calibration is None:
        raise InvalidArgument("int4-gptq needs calibration token ids")
    options: dict = {}
    if base == "int4":
        options["group_size"] = Int4Linear.DEFAULT_GROUP_SIZE if group_size is None else group_size
        if options["group_size"] not in m.INT4_GROUP_SIZES:
            raise InvalidArgument(f"int4 group size must be one of {', '.join(map(str, m.INT4_GROUP_SIZES))}, "
                                  f"got {group_size}")
    elif base == "ternary":
        TernaryLinear.check(0, 0, act_bits=act_bits)
        options["act_bits"] = act_bits
    elif base in GGML_FORMATS:
        options["ggml_format"] = base

    targets = _targets(model, skip)
    stacks = _expert_stacks(model, skip)
    for name, stack in stacks.items():  # each expert's matrix checked as a layer of its own
        targets.update({f"{name}.{e}": nn.Linear(*reversed(stack.shape[1:]), bias=False, device="meta")
                        for e in range(stack.shape[0])})
    if not targets:
        raise InvalidArgument("no linear layer left to quantize (all skipped)")
    cls = FORMATS[base]
    for name, linear in targets.items():
        try:
            cls.check(linear.in_features, linear.out_features, what=name, **options)
        except InvalidArgument as e:
            parts = name.split(".")  # an expert ("...mlp.down_proj.3") is skipped by its stack's name
            leaf = parts[-2] if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
            raise InvalidArgument(f"{e} (or keep such layers in full precision: skip {leaf!r})")

    for name in stacks:
        unstack_experts(model, name)
        targets.update({f"{name}.{e}": linear for e, linear in enumerate(model.get_submodule(name))})
    if gptq:
        samples = _calibration_samples(calibration, model)
        m.gptq_calibrate(model, targets, samples,
                         lambda name, linear, H: cls.from_linear(linear, hessian=H, **options))
    else:
        for name, linear in targets.items():
            _swap(model, name, cls.from_linear(linear, **options))
    return model


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in ((skip,) if isinstance(skip, str) else skip))


def _targets(model: nn.Module, skip: Sequence[str]) -> dict[str, nn.Linear]:
    """The linear layers to quantize, by name. A mixture of experts' router and shared-expert gate
    stay in full precision, as llama.cpp's quantizer keeps ffn_gate_inp (a few rows, and the
    routing decisions hang on them)."""
    from ..model import MoE

    tied = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    kept = {id(mod) for moe in model.modules() if isinstance(moe, MoE)
            for mod in (moe.router, getattr(moe, "shared_gate", None)) if mod is not None}
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and id(mod.weight) not in tied and id(mod) not in kept
            and not _skipped(name, skip)}


def _expert_stacks(model: nn.Module, skip: Sequence[str]) -> dict[str, torch.Tensor]:
    """A mixture of experts' stacked expert weights to quantize ("layers.0.mlp.gate_up_proj": (E, N, K)),
    skipped as a whole by their name ("gate_up_proj", "down_proj", "layers.3.mlp.down_proj")."""
    from ..model import MoE

    return {f"{name}.{leaf}": getattr(moe, leaf) for name, moe in model.named_modules() if isinstance(moe, MoE)
            for leaf in EXPERT_STACKS
            if isinstance(getattr(moe, leaf), torch.Tensor) and not _skipped(f"{name}.{leaf}", skip)}


# model.MoE's stacked weights: gate_up_proj (E, 2f, D) and down_proj (E, D, f).
EXPERT_STACKS = ("gate_up_proj", "down_proj")


def unstack_experts(model: nn.Module, name: str) -> None:
    """Replace the stacked expert weight `name` ("layers.0.mlp.gate_up_proj", (E, N, K)) by a
    ModuleList of E bias-free nn.Linear(K, N), each a view of its expert's matrix (no copy), so
    each expert quantizes, saves and loads as a layer of its own ("layers.0.mlp.gate_up_proj.3").
    On the meta device (an empty model to load a checkpoint into) the layers are meta too."""
    parent, _, leaf = name.rpartition(".")
    moe = model.get_submodule(parent)
    stack = getattr(moe, leaf)
    layers = nn.ModuleList()
    for e in range(stack.shape[0]):
        linear = nn.Linear(stack.shape[2], stack.shape[1], bias=False, device="meta")
        linear.weight = nn.Parameter(stack.data[e], requires_grad=stack.requires_grad)
        layers.append(linear)
    delattr(moe, leaf)
    setattr(moe, leaf, layers)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _calibration_samples(calibration, model: nn.Module) -> list[torch.Tensor]:
    """Token id tensors -> a list of (B, T) batches (a (T,) tensor is one sequence), checked
    against the model's vocabulary and context window."""
    items = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    config = getattr(model, "config", None)
    batches = []
    for t in items:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() not in (1, 2):
            raise InvalidArgument("calibration must be integer token id tensors of shape (T,) or (B, T)")
        if t.numel() == 0:
            continue
        if config is not None:
            if int(t.min()) < 0 or int(t.max()) >= config.vocab_size:
                raise InvalidArgument(f"calibration token ids must lie in [0, {config.vocab_size})")
            if t.shape[-1] > config.block_size:
                raise InvalidArgument(f"a calibration sequence of {t.shape[-1]} tokens exceeds the context "
                                      f"window of {config.block_size}")
        batches.append(t.long().reshape(-1, t.shape[-1]))
    if not batches:
        raise InvalidArgument("calibration holds no tokens")
    return batches


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored tensors (parameters and persistent buffers; tied ones once)."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def linear_weight_bytes(model: nn.Module) -> tuple[int, int, int, int]:
    """(bytes of all linear weights, their number, bytes of the quantized ones, their number).
    Quantized layers count their stored buffers (codes, scales, ...), float layers their weight;
    an output head tied to the embedding is not a linear weight of its own."""
    total_b = total_n = q_b = q_n = 0
    tied = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            b = sum(t.numel() * t.element_size() for t in mod.buffers())
            n = mod.in_features * mod.out_features
            q_b, q_n = q_b + b, q_n + n
        elif isinstance(mod, nn.Linear) and id(mod.weight) not in tied:
            b, n = mod.weight.numel() * mod.weight.element_size(), mod.weight.numel()
        else:
            continue
        total_b, total_n = total_b + b, total_n + n
    return total_b, total_n, q_b, q_n


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantizedLinear)}

