"""Quantizers: float weights -> packed codes and scales, and back. Pure tensor functions.

Every function here takes and returns tensors; the modules that hold the results are in
`linear.py`. W is a weight of shape (N, K) (out_features, in_features), quantized in float32.
Rounding is torch.round (half to even) unless a format's reference says otherwise.

    int8     per-output-channel absmax (LLM.int8()'s vector-wise quantization, without outliers)
    int4     group-wise asymmetric min-max, round to nearest (RTN) or GPTQ (Frantar et al. 2022)
    nf4      QLoRA's 4-bit NormalFloat, block-wise absmax, double-quantized absmax (bitsandbytes layout)
    ternary  BitNet b1.58: absmean scale, weights in {-1, 0, 1}; per-token absmax int8 activations

GPTQ's calibration driver (`gptq_calibrate`) runs calibration token ids through the model one
block at a time, collects each linear layer's Hessian 2 X^T X with forward hooks, and hands it
to a callback that quantizes and swaps the layer before the next layer's inputs are measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import InvalidArgument

# ------------------------------------------------------------------------------------ int8
INT8_MAX = 127


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (q int8 (N, K), scales float32 (N,)), W ~= q * scales[:, None].

    scale[n] = max|W[n, :]| / 127, q = clamp(round(W / scale), -127, 127); an all-zero row has
    scale 0 and codes 0.
    """
    w = w.detach().float()
    scales = w.abs().amax(dim=1) / INT8_MAX  # (N,)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.round(w / safe[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


# ------------------------------------------------------------------------------------ int4
INT4_MAX = 15
INT4_GROUP_SIZES = (32, 64, 128)


def check_group_size(group_size: int, in_features: int, what: str = "the layer") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise InvalidArgument(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                              f"got {group_size}")
    if in_features % group_size:
        raise InvalidArgument(f"{what} has {in_features} input features, not a multiple of the int4 group size "
                              f"{group_size}")


def int4_group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., g) one group per row -> (scale, offset) of shape (...,): the min-max grid
    offset + code * scale, code in 0..15, with scale = (max - min) / 15 and offset = min."""
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    return (hi - lo) / INT4_MAX, lo


def int4_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Nearest grid point: code = clamp(round((w - offset) / scale), 0, 15) (uint8); scale and
    offset broadcast against w. A group with scale 0 (all values equal) has codes 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round((w - offset) / safe).clamp(0, INT4_MAX).to(torch.uint8)


def quantize_int4_rtn(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W (N, K) -> (codes uint8 (N, K), scales (N, K/g), offsets (N, K/g)), round to nearest."""
    N, K = w.shape
    check_group_size(group_size, K)
    groups = w.detach().float().reshape(N, K // group_size, group_size)
    scales, offsets = int4_group_params(groups)
    codes = int4_codes(groups, scales[..., None], offsets[..., None])
    return codes.reshape(N, K), scales, offsets


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """codes (N, K) uint8, scales/offsets (N, K/g) -> W (N, K) float32 = code * scale + offset."""
    N, K = codes.shape
    g = K // scales.shape[1]
    groups = codes.reshape(N, K // g, g).float()
    return (groups * scales.float()[..., None] + offsets.float()[..., None]).reshape(N, K)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8: column 2j in the low nibble, 2j+1 in the high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: (N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------------------ GPTQ
GPTQ_DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
GPTQ_BLOCK = 128  # columns per lazy-update block (every int4 group size divides it)


class Hessian:
    """Running H = 2 X^T X / n over the rows x (K,) of a linear layer's inputs.

    The 1/n average (as the GPTQ reference keeps it) changes nothing in the result: the
    dampening is relative to the mean diagonal, and the column updates use ratios of H^-1.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x (..., K): any batch shape; accumulated in float64."""
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.sum.addmm_(x.T, x)
        self.rows += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        """(K, K) float64."""
        if self.rows == 0:
            raise InvalidArgument("GPTQ: the calibration data never reached this layer")
        return 2 * self.sum / self.rows


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = GPTQ_DAMP,
              block_size: int = GPTQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022, Algorithm 1) into the int4 grid of `quantize_int4_rtn`.

    W (N, K), H (K, K) -> (codes uint8 (N, K), scales (N, K/g), offsets (N, K/g)).

    Columns are quantized left to right; each column's rounding error, divided by the
    diagonal of the upper Cholesky factor U of H^-1, is spread over the not yet quantized
    columns through U's row (the optimal update of the OBS framework). Updates are applied
    lazily in blocks of `block_size` columns. A group's scale and offset are set from its
    weights as updated at the moment its first column is reached (with group sizes dividing
    the block size, the group lies inside the current block). Inputs that are never active
    (H[i, i] == 0) get weight 0, as in the reference. act_order is not used: with it off the
    groups stay contiguous, which the storage layout requires.
    """
    N, K = w.shape
    check_group_size(group_size, K)
    if block_size % group_size:
        raise InvalidArgument(f"GPTQ block size {block_size} must be a multiple of the group size {group_size}")
    W = w.detach().float().clone()
    H = hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # U with H^-1 = U^T U
    except torch.linalg.LinAlgError:
        raise InvalidArgument("GPTQ: the calibration Hessian is not positive definite "
                              "(too little or degenerate calibration data)") from None

    codes = torch.empty(N, K, dtype=torch.uint8, device=W.device)
    scales = torch.empty(N, K // group_size, dtype=torch.float32, device=W.device)
    offsets = torch.empty_like(scales)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()  # (N, B) the block, updated column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                g = col // group_size
                scales[:, g], offsets[:, g] = int4_group_params(W1[:, i:i + group_size])
            scale, offset = scales[:, col // group_size], offsets[:, col // group_size]
            w_col = W1[:, i]
            c = int4_codes(w_col, scale, offset)
            codes[:, col] = c
            q = c.float() * scale + offset
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, offsets


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def _run_until(module: nn.Module, run: Callable[[], object], hook: Callable) -> None:
    """Run `run()` with `hook(module, args)` as a forward pre-hook on `module`; the pass ends there."""

    def stop(mod, args):
        hook(mod, args)
        raise _Stop

    handle = module.register_forward_pre_hook(stop)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()


def gptq_calibrate(model: nn.Module, targets: dict[str, nn.Linear], calibration: Sequence[torch.Tensor],
                   quantize: Callable[[str, nn.Linear, torch.Tensor], nn.Module]) -> None:
    """Quantize `targets` (qualified name -> linear layer of `model`) sequentially with GPTQ.

    calibration: token id batches (B, T). They go through the model once, up to the first
    block; from then on the model runs block by block. In each block, each target linear layer
    in module order (execution order: qkv, o, gate_up, down) gets its Hessian from inputs that
    already pass through the quantized layers before it (GPTQ's "true sequential"),
    `quantize(name, linear, H)` returns its replacement, which is swapped in, and the block's
    outputs become the next block's inputs. Targets outside the blocks (an untied lm_head) are
    calibrated last, from a pass through the whole model. The quantized layers multiply in fp32
    meanwhile (kernels.fp32_products: no bf16 rounding in the Hessians' inputs).
    """
    from ..kernels import fp32_products

    with fp32_products():
        _calibrate(model, targets, calibration, quantize)


def _calibrate(model: nn.Module, targets: dict[str, nn.Linear], calibration: Sequence[torch.Tensor],
               quantize: Callable[[str, nn.Linear, torch.Tensor], nn.Module]) -> None:
    device = next(model.parameters()).device
    batches = [ids.to(device) for ids in calibration]

    def swap(name: str, new: nn.Module) -> None:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)

    with torch.no_grad():
        inputs: list[tuple] = []  # per batch, the positional arguments of a block: (x, rope, mask, cache)
        for ids in batches:
            _run_until(model.layers[0], lambda: model(ids), lambda mod, args: inputs.append(args))
        for index, block in enumerate(model.layers):
            prefix = f"layers.{index}."
            for sub, _ in block.named_modules():
                name = prefix + sub
                if name not in targets:
                    continue
                hessian = Hessian(targets[name].in_features, device)
                for args in inputs:  # the block runs up to this layer's input only
                    _run_until(targets[name], lambda: block(*args), lambda mod, a: hessian.add(a[0]))
                swap(name, quantize(name, targets[name], hessian.matrix))
            inputs = [(block(*args),) + tuple(args[1:]) for args in inputs]
        rest = [n for n in targets if not n.startswith("layers.")]
        for name in rest:
            hessian = Hessian(targets[name].in_features, device)
            for ids in batches:
                _run_until(targets[name], lambda: model(ids), lambda mod, a: hessian.add(a[0]))
            swap(name, quantize(name, targets[name], hessian.matrix))


# ------------------------------------------------------------------------------------- NF4
# The 16 values of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes
# `get_4bit_type("nf4")`): quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NF4_BLOCK = 64  # weights per absmax
NF4_ABSMAX_BLOCK = 256  # absmax values per second-level scale (double quantization)
_ARGMIN_CHUNK = 1 << 18  # elements per nearest-value search (bounds the (n, table) temporary)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic-exponent map (`create_dynamic_map(signed=True)`), the
    256 values double quantization maps the absmax values to: for exponents 10^-6 .. 10^0, the
    midpoints of linspace(0.1, 1, 2^i + 1) with both signs, plus 0 and 1, sorted."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for each value (the first one on a tie), uint8."""
    flat = values.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
    table = table.to(flat.device)
    for start in range(0, flat.numel(), _ARGMIN_CHUNK):
        chunk = flat[start:start + _ARGMIN_CHUNK]
        out[start:start + _ARGMIN_CHUNK] = torch.argmin((chunk[:, None] - table).abs(), dim=1).to(torch.uint8)
    return out.reshape(values.shape)


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flat (n,) -> (flat scaled to [-1, 1] block by block, absmax per block (ceil(n/block),)).
    The last block may be partial; a block of zeros has absmax 0 and scaled values 0."""
    n = flat.numel()
    n_blocks = -(-n // block)
    padded = torch.zeros(n_blocks * block, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.reshape(n_blocks, block)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1 / absmax, torch.zeros_like(absmax))  # x * (1/absmax), as bitsandbytes
    scaled = torch.clamp(blocks * inverse[:, None], -1, 1).reshape(-1)[:n]
    return scaled, absmax


def nf4_quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First level: W (any shape) flattened row-major -> (codes uint8 (n,), absmax float32
    (ceil(n/64),)), code = index of the NF4 value nearest to w / absmax of its block."""
    scaled, absmax = _blockwise_absmax(w.detach().float().reshape(-1), NF4_BLOCK)
    return _nearest(scaled, NF4_TABLE), absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second level (QLoRA's double quantization, bitsandbytes' `compress_statistics`):
    absmax (B,) -> (codes uint8 (B,), scales float32 (ceil(B/256),), mean float32 (1,)).

    The mean is subtracted, then blocks of 256 are scaled by their absmax and mapped to the
    nearest value of the 8-bit dynamic map: absmax ~= DYNAMIC_MAP[code] * scale[b // 256] + mean.
    """
    absmax = absmax.float()
    mean = absmax.mean().reshape(1)
    scaled, scales = _blockwise_absmax(absmax - mean, NF4_ABSMAX_BLOCK)
    return _nearest(scaled, DYNAMIC_MAP), scales, mean


def double_dequantize(codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(B,) float32 first-level absmax values back from their double quantization."""
    values = DYNAMIC_MAP.to(codes.device)[codes.long()]
    return values * scales.float().repeat_interleave(NF4_ABSMAX_BLOCK)[:codes.numel()] + mean.float()


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes 0..15 -> (ceil(n/2),) uint8, bitsandbytes' order: element 2i in the HIGH nibble,
    2i+1 in the low nibble (an odd n is padded with code 0)."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat((c, c.new_zeros(1)))
    return (c[0::2] << 4) | c[1::2]


def unpack_nf4(packed: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)[:n]


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """packed codes + first-level absmax (float32) -> float32 tensor of `shape`."""
    n = 1
    for d in shape:
        n *= d
    values = NF4_TABLE.to(packed.device)[unpack_nf4(packed, n).long()]
    scale = absmax.float().repeat_interleave(NF4_BLOCK)[:n]
    return (values * scale).reshape(shape)


# --------------------------------------------------------------------------------- ternary
TERNARY_EPS = 1e-5


def quantize_ternary(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 weights: scale = max(mean|W|, 1e-5) over the whole tensor, values =
    RoundClip(W / scale, -1, 1) -> (values int8 in {-1, 0, 1} (N, K), scale float32 (1,))."""
    w = w.detach().float()
    scale = w.abs().mean().clamp(min=TERNARY_EPS).reshape(1)
    values = torch.round(w / scale).clamp(-1, 1).to(torch.int8)
    return values, scale


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's per-token absmax 8-bit activations: s = 127 / max(max|x|, 1e-5) over the
    last dimension, x_q = RoundClip(x * s, -128, 127) -> (x_q float32 holding integers, s (..., 1))."""
    x = x.float()
    s = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=TERNARY_EPS)
    return torch.round(x * s).clamp(-128, 127), s


# ggml formats whose llama.cpp dot products quantize the activations to 8 bits in blocks of 32
# (vec_dot_type Q8_0 or Q8_1; both hold the same values).
GGML_Q8_ACTIVATIONS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# The K-quants' dot products take the activations as Q8_K: 8 bits per block of 256.
GGML_Q8_K_ACTIVATIONS = ("q4_k", "q5_k", "q6_k")


def quantize_activations_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's CPU kernels see it against Q8_0/Q4_x/Q5_x weights: each block of 32 along
    the last dimension becomes round(x / d) * d, d = max|x| / 127 stored as fp16, the rounding
    half away from zero (quantize_row_q8_0). Returns float32 values of x's shape."""
    shape = x.shape
    blocks = x.float().reshape(-1, shape[-1] // 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = blocks * inv
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # roundf: half away from zero
    return (q * d.half().float()).reshape(shape)


def quantize_activations_q8_k(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's CPU kernels see it against Q4_K/Q5_K/Q6_K weights (quantize_row_q8_K_ref):
    each block of 256 along the last dimension becomes min(127, round(x * s)) / s with
    s = -127 / m, m the block's value of largest magnitude (the first one, with its sign), the
    rounding to nearest even and the scale 1 / s kept in float32. Returns float32 values of x's shape."""
    shape = x.shape
    blocks = x.float().reshape(-1, shape[-1] // 256, 256)
    m = torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True))
    # tensor / tensor: a correctly rounded division (number / tensor multiplies by a reciprocal)
    iscale = torch.where(m != 0, m.new_tensor(-127.0) / m, torch.zeros_like(m))
    q = torch.round(blocks * iscale).clamp(max=127)
    d = torch.where(m != 0, m.new_tensor(1.0) / iscale, torch.zeros_like(m))
    return (q * d).reshape(shape)


def pack_ternary_2bit(values: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 in {-1, 0, 1} -> (N, K / 4) uint8, the native kernel's 2-bit layout
    (kernels/quant_rows.h): within each 64-column chunk, byte j holds columns j, j+16, j+32,
    j+48 (bits 0-1, 2-3, 4-5, 6-7) as value + 1."""
    N, K = values.shape
    codes = (values.to(torch.int32) + 1).view(N, K // 64, 4, 16)
    packed = codes[:, :, 0] | (codes[:, :, 1] << 2) | (codes[:, :, 2] << 4) | (codes[:, :, 3] << 6)
    return packed.to(torch.uint8).reshape(N, K // 4).contiguous()
