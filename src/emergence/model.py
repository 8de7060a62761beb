"""tokens -> logits: one decoder Transformer for the GPT-2, LLaMA, Qwen, Gemma, Phi, OLMo,
GPT-NeoX, Falcon and BitNet families.

Every variant is a `Config` switch: learned positions or RoPE (with Llama-3 scaling, on all
or the first `rotary_dim` dimensions of a head, or on no dimension in NoPE layers),
LayerNorm or RMSNorm (before each sublayer, after it, or both, and inside it before its output
projection: BitNet's sub-norms), GELU, SwiGLU, GeGLU or ReLU^2-gated MLP,
grouped-query attention with optional q/k norms and soft-capped scores, biases (all, or q/k/v
only), tied embeddings, a sliding attention window (in every layer, or alternating with
global layers), attention and MLP in sequence or in parallel, and soft-capped logits.
Module and parameter names are the canonical checkpoint names that `weights/names.py` maps
to and from other layouts.

Shapes: B batch, T new tokens, S keys attended (T, or the slots of a cached row's blocks), D n_embd,
H query heads, K key/value heads, hd head_dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.overrides import TorchFunctionMode

from .allocator import RELEASE_EVERY_BLOCKS, release_freed_memory, release_in_backward
from .config import Config
from .errors import InvalidArgument
from . import products

if TYPE_CHECKING:  # the model only calls a cache view's methods
    from .kv_cache import CacheView


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        # Normalise in float32 and cast back before the gain, as the reference LLaMA code does.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


def make_norm(config: Config, dim: int | None = None) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(dim or config.n_embd, eps=config.norm_eps)
    return RMSNorm(dim or config.n_embd, config.norm_eps)


# --------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: Config, local: bool = False) -> torch.Tensor:
    """(rd/2,) rotation frequencies of the rd = rotary_dim (default head_dim) rotated dimensions,
    with Llama-3 long-context scaling when configured; `local`: the windowed layers' table
    (base rope_local_theta, never scaled)."""
    dim = config.rotary_dim or config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    # Always computed on the CPU (callers move it): under torch.device("meta") the arithmetic would
    # run through torch._refs, whose first use imports torch._dynamo (seconds, ~70 MB).
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if local:
        return inv_freq
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if "factors" in s:  # explicit per-frequency divisors (llama.cpp's rope_freqs tensor)
        return inv_freq / torch.tensor(s["factors"], dtype=torch.float32, device="cpu")
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """positions (B or 1, T) -> cos, sin of shape (B or 1, 1, T, rd), computed in float32."""
    freqs = positions[..., None].float() * inv_freq  # (B, T, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, rd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + rd/2) of x (B, heads, T, hd): the Hugging Face "rotate half" layout,
    on the first rd dimensions of each head (all of them unless the rotary dimension is partial)."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:  # partial rotary (GPT-NeoX, Phi-2): the other dimensions pass through
        rot, rest = x.split([rd, x.shape[-1] - rd], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin), rest), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma 2 bounds attention scores and logits smoothly."""
    return x if cap is None else torch.tanh(x / cap) * cap


# ------------------------------------------------------------------ the loss, without logits
IGNORE_INDEX = -100  # a target that scores nothing (train.objectives' and PyTorch's convention)
LOSS_SLICE_ELEMENTS = 2 ** 23  # logits per slice of the sliced loss: 32 MiB in fp32


def head_cross_entropy(h: torch.Tensor, targets: torch.Tensor, head, vocab: int, params: list[torch.Tensor],
                       linear: nn.Linear | None = None) -> torch.Tensor:
    """Mean cross-entropy of head(h) against targets, without the (N, V) logits ever whole.

    h (..., D) final hidden states, targets (...) ids or IGNORE_INDEX, head a callable (..., D) ->
    (..., V) with V = vocab whose trainable tensors are params. Only the scored rows reach the head (in
    instruction tuning the prompt's rows score nothing), a slice of LOSS_SLICE_ELEMENTS / V rows
    at a time, so a step holds one slice's logits, softmax and gradient instead of three (N, V)
    tensors (on smollm2's 49,152-row vocabulary, 192 MiB each for 1,024 tokens). The values are
    next_token_loss's on the whole logits, up to the order of the sums. `linear`: the head when it
    is that nn.Linear alone (no soft cap), for the fp32 path written out (_LinearCrossEntropy).
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if scored.numel() < targets.numel():
        h, targets = h.index_select(0, scored), targets.index_select(0, scored)
    rows = max(1, LOSS_SLICE_ELEMENTS // vocab)
    plain = (linear is not None and h.dtype == linear.weight.dtype == torch.float32
             and not torch.is_autocast_enabled(h.device.type))
    if torch.is_grad_enabled() and (h.requires_grad or params) and plain:
        total = _LinearCrossEntropy.apply(h, targets, linear.weight, linear.bias, rows)
    elif torch.is_grad_enabled() and (h.requires_grad or params):
        total = _SlicedCrossEntropy.apply(h, targets, head, rows, *params)
    else:
        total = sum((_slice_loss(head, h[s:s + rows], targets[s:s + rows]) for s in range(0, len(h), rows)),
                    h.new_zeros((), dtype=torch.float32))
    return total / len(targets)  # 0 / 0 = nan with nothing scored, as F.cross_entropy's mean


def _slice_loss(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one slice, in fp32 (under autocast cross_entropy runs in fp32 itself)."""
    logits = head(h)
    if not torch.is_autocast_enabled(logits.device.type):
        logits = logits.float()
    return F.cross_entropy(logits, targets, reduction="sum").float()


class _SlicedCrossEntropy(torch.autograd.Function):
    """The summed loss, slice by slice, with its gradients taken in the forward: the loss ends
    the graph, so they are known there and the backward only scales them by the incoming
    gradient (Liger-Kernel's fused linear cross-entropy does the same; nothing is recomputed)."""

    @staticmethod
    def forward(ctx, h, targets, head, rows, *params):
        wants_h = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if wants_h else None  # (every slice writes its rows)
        grads = [torch.zeros_like(p) for p in params]
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, len(h), rows):
            piece = h[s:s + rows].detach().requires_grad_(wants_h)
            with torch.enable_grad():
                loss = _slice_loss(head, piece, targets[s:s + rows])
            found = torch.autograd.grad(loss, [piece, *params] if wants_h else list(params), allow_unused=True)
            if wants_h:
                grad_h[s:s + rows] = found[0]
                found = found[1:]
            for g, f in zip(grads, found):
                if f is not None:
                    g += f
            total += loss.detach()
        ctx.save_for_backward(grad_h, *grads)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, *grads = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype), None, None, None,
                *(g * grad_out.to(g.dtype) for g in grads))


class _LinearCrossEntropy(torch.autograd.Function):
    """_SlicedCrossEntropy for a plain fp32 linear head (weight (V, D), bias (V,) or None), its
    gradients written out instead of asked of autograd: per slice of n rows, logits = h W^T + b
    and their log-softmax into two (n, V) buffers kept from slice to slice (fresh ones may be
    new pages to fault in at every slice), the loss -logp[target], then in place the gradient
    of the summed loss in the logits, softmax - one-hot = exp(logp) - one-hot (what
    log_softmax's and nll_loss's backward give, without their zero-filled (n, V) tensor), and
    from it the gradients of h (one product with W) and, when trained, of W and b."""

    @staticmethod
    def forward(ctx, h, targets, weight, bias, rows):
        n = min(rows, len(h))
        logits, logp = h.new_empty(n, len(weight)), h.new_empty(n, len(weight))  # (n, V) each
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[2] else None
        grad_b = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, len(h), rows):
            hs, t = h[s:s + rows], targets[s:s + rows]
            z, lp = logits[:len(hs)], logp[:len(hs)]
            products.matmul_nt(hs, weight, out=z)  # (on oneDNN where MKL is slow: products.py)
            if bias is not None:
                z += bias
            torch._log_softmax(z, 1, False, out=lp)
            picked = lp.gather(1, t[:, None])  # (n, 1)
            total -= picked.sum()
            lp.exp_()
            lp.scatter_add_(1, t[:, None], torch.full_like(picked, -1.0))  # d(sum of -logp[t]) / d logits
            if grad_h is not None:
                products.matmul_nt(lp, weight.t(), out=grad_h[s:s + len(hs)])
            if grad_w is not None:
                grad_w += products.matmul_nt(lp.t(), hs.t())
            if grad_b is not None:
                grad_b += lp.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = (None if g is None else g * grad_out for g in ctx.saved_tensors)
        return grad_h, None, grad_w, grad_b, None


# ---------------------------------------------------------------------------- the blocks
class Attention(nn.Module):
    def __init__(self, config: Config, layer: int, linear: type[nn.Linear] = products.Linear) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
        # q, k and v in one matrix: one matmul per token instead of three.
        self.qkv_proj = linear(config.n_embd, q_dim + 2 * kv_dim, bias=config.bias or config.qkv_bias)
        self.o_proj = linear(q_dim, config.n_embd, bias=config.bias)
        # q/k norms after the projection: RMSNorm over each head (Qwen3, Gemma 3) or over all
        # heads' width (OLMo 2); None without.
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:
            per_head = self.qk_norm == "head"
            self.q_norm = RMSNorm(config.head_dim if per_head else q_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim if per_head else kv_dim, config.norm_eps)
        # None: SDPA's 1/sqrt(head_dim). T5 sets 1.0 (its initialisation folds the scaling into
        # the weights), Gemma query_pre_attn_scalar ** -0.5.
        self.scale = config.attention_scale
        self.softcap = config.attn_softcap
        # BitNet: RMSNorm over the heads' output before o_proj
        self.sub_norm = RMSNorm(q_dim, config.norm_eps) if getattr(config, "sub_norms", False) else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, cache: CacheView | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K = self.n_head, self.n_kv_head
        hd = self.head_dim
        qkv = self.qkv_proj(x)  # (B, T, (H+2K) hd)
        # Split the last dimension before the head transpose, and split rather than slice: in
        # training the backward is then one contiguous cat straight into qkv's gradient, where
        # slices would each build a zero-filled full-size buffer and heads a strided copy.
        if self.qk_norm is not None:
            q, k, v = qkv.split([H * hd, K * hd, K * hd], dim=-1)  # (B, T, H hd), (B, T, K hd) twice
            if self.qk_norm == "all":
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))
            if self.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        elif rope is None:
            q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in qkv.split([H * hd, K * hd, K * hd], dim=-1))
        else:
            qk, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in qkv.split([(H + K) * hd, K * hd], dim=-1))
            q, k = apply_rope(qk, *rope).split([H, K], dim=1)  # queries and keys rotated together
        # q (B, H, T, hd), k and v (B, K, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # every slot of each row's blocks, (B, K, S, hd)
        # mask None means "every key is visible": a causal mask is only needed when T > 1. A float
        # mask is added to the scores (T5's relative position bias, -inf where a key is hidden).
        causal = mask is None and T > 1
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=K != H,
                                               scale=self.scale)
        else:  # SDPA has no hook between the scores and the softmax
            y = self._softcapped(q, k, v, mask, causal)
        y = y.transpose(1, 2).reshape(B, T, H * self.head_dim)  # y was (B, H, T, hd)
        return self.o_proj(y if self.sub_norm is None else self.sub_norm(y))

    def _softcapped(self, q, k, v, mask, causal) -> torch.Tensor:
        """Attention with scores cap * tanh(s / cap) (Gemma 2), written out: (B, H, T, hd)."""
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, hd)
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        scores = softcap(q @ k.transpose(-1, -2) * scale, self.softcap)  # (B, H, T, S)
        if causal:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


# MLP kinds: (gated, activation). Gated ones multiply act(gate) by a second projection.
# gelu is the tanh approximation (GPT-2's, Phi-2's, and T5 v1.1's and Gemma's gated one);
# gelu_exact the erf one (GPT-NeoX, Falcon); relu is T5 v1.0's; relu2_glu gates by relu(x)^2 (BitNet).
MLP_KINDS = {"swiglu": (True, F.silu), "geglu": (True, lambda x: F.gelu(x, approximate="tanh")),
             "gelu": (False, lambda x: F.gelu(x, approximate="tanh")), "gelu_exact": (False, F.gelu),
             "relu": (False, F.relu), "relu2_glu": (True, lambda x: F.relu(x).square())}


class MLP(nn.Module):
    def __init__(self, config: Config, linear: type[nn.Linear] = products.Linear) -> None:
        super().__init__()
        self.gated, self.act = MLP_KINDS[config.mlp]
        d, f = config.n_embd, config.intermediate_size
        if self.gated:  # gate and up projections in one matrix (B, T, 2f): one matmul instead of two
            self.gate_up_proj = linear(d, 2 * f, bias=config.bias)
        else:
            self.up_proj = linear(d, f, bias=config.bias)
        self.down_proj = linear(f, d, bias=config.bias)
        # BitNet: RMSNorm over the hidden activations before down_proj
        self.sub_norm = RMSNorm(f, config.norm_eps) if getattr(config, "sub_norms", False) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(self.up_proj(x))
        return self.down_proj(h if self.sub_norm is None else self.sub_norm(h))


class MoE(nn.Module):
    """Mixture of experts in place of the MLP (Mixtral, Qwen2-MoE, OLMoE; Switch-style training).

    A router scores the n_experts for each token; softmax, then the experts_per_token best (k)
    are each run on it and their outputs summed with the softmax weights (renormalised over the
    chosen k with norm_topk_prob). Tokens are grouped by expert (sorted and gathered), so each
    expert is one matrix product over its tokens: a loop over experts, never over tokens. The
    experts' weights are stacked: gate_up_proj (E, 2f, D) holds each expert's gate then up rows,
    down_proj (E, D, f); quantize_model turns a stack into a ModuleList of E quantized layers.
    Qwen2-MoE adds a shared expert that every token runs through, scaled by sigmoid(shared_gate(x)).

    In training, router_jitter multiplies the input by uniform noise, and a capacity factor keeps
    at most ceil(capacity_factor * N * k / E) of the N tokens' k choices per expert (the first
    ones in token order); the rest are dropped, their share of the output zero. The last forward's
    router logits (N, E), choices and dropped fraction stay on the module for the training's
    auxiliary losses and metrics (train/moe.py).
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_experts, self.k, self.norm_topk = config.n_experts, config.experts_per_token, config.norm_topk_prob
        self.jitter, self.capacity_factor = config.router_jitter, config.capacity_factor
        d, f = config.n_embd, config.moe_intermediate_size or config.intermediate_size
        self.act = MLP_KINDS[config.mlp][1]
        self.router = nn.Linear(d, self.n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.empty(self.n_experts, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(self.n_experts, d, f))
        for w in (self.gate_up_proj, self.down_proj):  # as nn.Linear initialises each expert's matrix
            for e in range(self.n_experts):
                nn.init.kaiming_uniform_(w[e], a=math.sqrt(5))
        self.shared = None
        if config.shared_expert_size:
            self.shared = MLP(dataclasses.replace(config, intermediate_size=config.shared_expert_size,
                                                  n_experts=0, shared_expert_size=None))
            self.shared_gate = nn.Linear(d, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # (N, E), the last forward's
        self.choices: torch.Tensor | None = None  # (N, k) expert ids
        self.dropped = 0.0  # fraction of the N k choices the capacity dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (N, D)
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = self.router(h)  # (N, E)
        weights, choices = logits.softmax(dim=-1, dtype=torch.float32).topk(self.k, dim=-1)  # (N, k)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.router_logits, self.choices = logits, choices
        weights = weights.to(h.dtype).flatten()  # (N k,)
        flat = choices.flatten()  # (N k,): token n's j-th choice at n * k + j
        order = flat.argsort(stable=True)  # the choices grouped by expert, in token order within one
        counts = torch.bincount(flat, minlength=self.n_experts)
        if self.training and self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * flat.numel() / self.n_experts)
            starts = counts.cumsum(0) - counts  # where each expert's group begins in `order`
            rank = torch.arange(flat.numel(), device=h.device) - starts[flat[order]]  # place within its expert
            keep = rank < capacity
            self.dropped = float((~keep).float().mean())
            order, counts = order[keep], counts.clamp(max=capacity)
        token = order // self.k  # (M,) the token of each grouped choice
        xs = h.index_select(0, token)  # (M, D), expert by expert (its backward an index_add, not an index_put)
        out = []
        # The stacks as E views at once: the backward then stacks the E gradients in one op, where
        # indexing stack[e] per expert would give each expert a zero-filled gradient of the whole
        # stack to add up (E whole-stack writes instead of one).
        gate_up, down = (w.unbind(0) if isinstance(w, torch.Tensor) else w
                         for w in (self.gate_up_proj, self.down_proj))
        # every expert, even one without tokens: its weights then get a zero gradient rather than
        # none, which data parallelism needs (DDP reduces every parameter's gradient)
        for e, rows in zip(range(self.n_experts), xs.split(counts.tolist())):
            gate, up = expert_linear(gate_up, e, rows).chunk(2, dim=-1)
            out.append(expert_linear(down, e, self.act(gate) * up))
        y = torch.cat(out) * weights[order, None]
        y = torch.zeros_like(h).index_add_(0, token, y)  # each token: the sum of its experts' outputs
        if self.shared is not None:
            y = y + torch.sigmoid(self.shared_gate(h)) * self.shared(h)
        return y.view(shape)


class BitLinear(nn.Linear):
    """BitNet b1.58's linear layer for training (Config.ternary). The forward pass multiplies
    ternary weights by 8-bit activations:
        W_q = RoundClip(W / s_w, -1, 1) * s_w,        s_w = max(mean|W|, 1e-5) over the tensor
        x_q = RoundClip(x * s_x, -128, 127) / s_x,    s_x = 127 / max(max|x|, 1e-5) per token
    (quant/methods.py's quantize_ternary and quantize_activations_int8, the same formulas); the
    backward pass treats RoundClip as the identity (the straight-through estimator), so the
    latent full-precision W learns. quantize_model(model, "ternary", act_bits=8) then stores
    exactly W_q's values and scale (2-bit packed for the native kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        s_w = w.abs().mean().clamp(min=1e-5)
        w_q = w + ((w / s_w).round().clamp(-1, 1) * s_w - w).detach()
        s_x = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
        x_q = x + ((x * s_x).round().clamp(-128, 127) / s_x - x).detach()
        return products.linear(x_q, w_q, self.bias)


def expert_linear(stack, e: int, x: torch.Tensor) -> torch.Tensor:
    """x (M, K) through expert e's matrix: a stacked (E, N, K) weight (or its E views), or once
    quantized (quant/linear.py), a list of E quantized layers."""
    return products.linear(x, stack[e]) if isinstance(stack[e], torch.Tensor) else stack[e](x)


class Block(nn.Module):
    """Residual block. Pre-norm (LLaMA): x + attn(norm(x)), then x + mlp(norm(x)); post-norm
    (OLMo 2) normalises each sublayer's output instead, sandwich (Gemma) does both; a parallel
    block (GPT-NeoX, Falcon, Phi-2) adds attention and MLP of the same input, x + attn(n(x)) +
    mlp(n'(x)), with n' = n for a shared norm (mlp_norm None). An absent pre-norm (post-norm
    blocks) is nn.Identity. `linear`: the class
    of its projections (products.Linear, nn.Linear with its fp32 products on oneDNN where
    MKL is slow; T5's decoder takes kernels.SmallBatchLinear)."""

    def __init__(self, config: Config, layer: int, linear: type[nn.Linear] = products.Linear) -> None:
        super().__init__()
        pre, post = config.norm_position in ("pre", "sandwich"), config.norm_position in ("post", "sandwich")
        self.parallel = config.parallel is not None
        self.attn_norm = make_norm(config) if pre else nn.Identity()
        self.attn = Attention(config, layer, linear)
        # a shared-norm parallel block feeds attn_norm's output to the MLP too
        self.mlp_norm = None if config.parallel == "shared-norm" else make_norm(config) if pre else nn.Identity()
        self.mlp = MoE(config) if config.is_moe_layer(layer) else MLP(config, linear)
        if post:
            self.attn_post_norm, self.mlp_post_norm = make_norm(config), make_norm(config)
        self.post = post
        # which of the model's masks (by window) and RoPE tables (global, local, or none) it uses
        self.window, self.rope = config.layer_window(layer), config.layer_rope(layer)

    def forward(self, x, rope, mask, cache):
        h = self.attn_norm(x)
        if self.parallel:
            return x + self.attn(h, rope, mask, cache) + self.mlp(h if self.mlp_norm is None else self.mlp_norm(x))
        a = self.attn(h, rope, mask, cache)
        x = x + (self.attn_post_norm(a) if self.post else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.mlp_post_norm(m) if self.post else m)


# ----------------------------------------------------------------------------- the model
class Placed:
    """A model's `dtype` and `device`, as transformers' models have them: the float dtype its
    activations run in and where its weights are, read from the token embedding (an nn.Embedding,
    or a quantized GGMLEmbedding table, which has both too)."""

    tok_embeddings: nn.Module

    @property
    def dtype(self) -> torch.dtype:
        emb = self.tok_embeddings
        return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype

    @property
    def device(self) -> torch.device:
        emb = self.tok_embeddings
        return emb.weight.device if isinstance(emb, nn.Embedding) else emb.device


class Transformer(Placed, nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        if config.position == "learned":
            self.pos_embeddings = nn.Embedding(config.block_size, config.n_embd)
        linear = BitLinear if config.ternary else products.Linear
        self.layers = nn.ModuleList(Block(config, i, linear) for i in range(config.n_layer))
        # Training memory: keep only each block's input for the backward pass and recompute the
        # block's inside there (activation checkpointing, as torchtune's and HF's option), when set.
        self.checkpoint_activations = False
        self.norm = make_norm(config)
        self.lm_head = products.Linear(config.n_embd, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        if config.position == "rope":
            self.register_buffer("rope_inv_freq", rope_inv_freq(config), persistent=False)
        if config.rope_local_theta is not None:  # the windowed layers' table (Gemma 3)
            self.register_buffer("rope_local_inv_freq", rope_inv_freq(config, local=True), persistent=False)

    def forward(self, input_ids: torch.Tensor, cache: CacheView | None = None, *,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                last_logits_only: bool = False, targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_logits_only; with targets
        (B, T) (IGNORE_INDEX where nothing is scored) the mean cross-entropy instead, computed
        without the whole logits (head_cross_entropy: what training uses).

        Without a cache, attention_mask (B, T) marks left padding (1 = token, 0 = pad), and
        segment_ids (B, T) packed rows: which example each token belongs to; positions restart
        at each example and attention never crosses one (a block-diagonal causal mask, as TRL
        and torchtune pack). With a cache view (kv_cache.CacheView: rows of a decode batch, each
        extended by its new tokens, right-padded) the view says where every row stands, so
        neither is accepted.
        """
        h = self.hidden_states(input_ids, cache, attention_mask=attention_mask, segment_ids=segment_ids)
        if targets is not None:
            trainable = [p for p in self.lm_head.parameters() if p.requires_grad]
            plain = type(self.lm_head) in (nn.Linear, products.Linear) and self.config.final_softcap is None
            return head_cross_entropy(h, targets, self.head, self.config.vocab_size, trainable,
                                      self.lm_head if plain else None)
        if last_logits_only:
            h = h[:, -1:]
        return self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., D) -> logits (..., V), soft-capped where the config says so."""
        return softcap(self.lm_head(h), self.config.final_softcap)

    def hidden_states(self, input_ids: torch.Tensor, cache: CacheView | None = None, *,
                      attention_mask: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final normalised hidden states (B, T, D)."""
        B, T = input_ids.shape
        windows = {block.window for block in self.layers}  # one mask per window the layers use
        if segment_ids is not None:
            if cache is not None or attention_mask is not None:
                raise InvalidArgument("segment_ids (packed rows) take neither a KV cache nor an attention_mask")
            slot = torch.arange(T, device=input_ids.device)[None]  # (1, T)
            starts = torch.ones_like(segment_ids, dtype=torch.bool)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            positions = slot - torch.where(starts, slot, 0).cummax(dim=1).values  # (B, T): slot - its example's start
            longest = int(positions.max()) + 1
            same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (slot <= slot.T)  # (B, T, T)
            masks = {w: (same & self._window(T, input_ids.device, w))[:, None] for w in windows}  # (B, 1, T, T)
        elif cache is not None:
            if attention_mask is not None:
                raise InvalidArgument("attention_mask applies to a batch without a KV cache: a cache view already "
                                      "gives each row's length")
            longest = cache.longest
            positions = cache.positions(T)  # (B, T)
            masks = {w: cache.attention_mask(T, w) for w in windows}  # (B, 1, T, S)
        else:
            pad = (attention_mask == 0).sum(dim=1) if attention_mask is not None else None
            padded = pad is not None and bool(pad.any())
            # Left padding shifts slots, not positions: the longest row is the one with least padding.
            longest = T - (int(pad.min()) if padded else 0)
            # Position of each token: its slot minus the row's left padding, (B, T); without
            # padding every row has the same positions, (1, T), broadcast (a (B, T) index would
            # make the position embedding's backward a scatter over B times as many rows).
            positions = torch.arange(T, device=input_ids.device)[None]
            if padded:
                positions = (positions - pad[:, None]).clamp(min=0)
            masks = {w: self._attention_mask(T, pad if padded else None, input_ids.device, w) for w in windows}
        if longest > self.config.block_size:
            raise InvalidArgument(f"{longest} tokens exceed the context window of {self.config.block_size}")

        x = self.tok_embeddings(input_ids)  # (B, T, D)
        if self.config.scale_embeddings:  # Gemma: by sqrt(D), rounded to the activations' dtype
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        ropes = {None: None}  # RoPE tables by kind: "global", "local" (Gemma 3's windowed layers)
        if self.config.position == "learned":
            x = x + self.pos_embeddings(positions)
        else:
            ropes["global"] = rope_cos_sin(self.rope_inv_freq, positions, x.dtype)
            if self.config.rope_local_theta is not None:
                ropes["local"] = rope_cos_sin(self.rope_local_inv_freq, positions, x.dtype)
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:  # the same values; the block's activations are recomputed in the backward
                x = torch.utils.checkpoint.checkpoint(block, x, ropes[block.rope], masks[block.window], cache,
                                                      use_reentrant=False)
                if (i + 1) % RELEASE_EVERY_BLOCKS == 0:  # what the last blocks freed back to the OS, in
                    release_freed_memory()  # the forward and (the hook) before their backward (allocator.py)
                    if x.requires_grad:
                        x.register_hook(release_in_backward)
            else:
                x = block(x, ropes[block.rope], masks[block.window], cache)
        return self.norm(x)

    def _attention_mask(self, T: int, pad: torch.Tensor | None, device: torch.device,
                        window: int | None) -> torch.Tensor | None:
        """(B or 1, 1, T, T) boolean mask (True = may attend) for a batch without a cache, or
        None for plain causal attention.

        Query i sees key j when j <= i, the key is not padding, and (with a sliding window)
        i - j < window. Padding queries see themselves only, so no row is empty.
        """
        if pad is None and (window is None or T <= window):
            return None  # is_causal in SDPA
        q_slot = torch.arange(T, device=device)[:, None]  # (T, 1)
        k_slot = torch.arange(T, device=device)[None, :]  # (1, T)
        mask = ((k_slot <= q_slot) & self._window(T, device, window))[None]  # (1, T, T)
        if pad is not None:
            real_key = k_slot[None] >= pad[:, None, None]  # (B, 1, T)
            mask = (mask & real_key) | (k_slot == q_slot)[None]
        return mask[:, None]  # (B or 1, 1, T, T)

    @staticmethod
    def _window(T: int, device: torch.device, window: int | None) -> torch.Tensor | bool:
        """(T, T) True where query i may see key j under the sliding window (i - j < window)."""
        if window is None or T <= window:
            return True
        return torch.arange(T, device=device)[:, None] - torch.arange(T, device=device)[None, :] < window

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def finish_loading(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    """Give a model built on the meta device its weights (canonical names) and real buffers."""
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings and isinstance(model.tok_embeddings, nn.Embedding):
        model.lm_head.weight = model.tok_embeddings.weight  # (a quantized table's head is tied by its loader)
    device = model.device
    if model.config.position == "rope":  # non-persistent buffers: recompute them on the weights' device
        model.rope_inv_freq = rope_inv_freq(model.config).to(device)
    if model.config.rope_local_theta is not None:
        model.rope_local_inv_freq = rope_inv_freq(model.config, local=True).to(device)
    return model.eval()


class _SkipInit(TorchFunctionMode):
    """Turns torch.nn.init calls into no-ops (thread-local, unlike patching torch.nn.init)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


def empty_model(config: Config) -> Transformer:
    """The model's skeleton on the meta device, no initialiser run (weights come from a checkpoint).
    Meta-device random init runs through torch._refs, whose first use imports torch._dynamo."""
    with torch.device("meta"), _SkipInit():
        return Transformer(config)
