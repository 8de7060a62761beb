"""LoRA and DoRA by module swap, on the model's fused projections.

A targeted projection is replaced by a `LoraLinear` that keeps the frozen base layer (an
nn.Linear, or a quantized layer for QLoRA) and adds, per adapter and per *part* of its
output, a low-rank update (Hu et al. 2021):

    y[..., part] += scaling * B (A dropout(x))       A (r, in), B (part_out, r)

scaling is alpha / r, or alpha / sqrt(r) with rsLoRA. emergence keeps q, k and v in one
matrix (qkv_proj) and gate and up in another (gate_up_proj), where PEFT's LLaMA targets are
separate q_proj, k_proj, ... layers; a part is such a slice of the fused output, so an
adapter has exactly PEFT's tensors and nothing is split or copied at run time.

DoRA (Liu et al. 2024) adds a magnitude vector m (part_out,) and rescales each output row:

    y_part = m / ||W + scaling B A||_row * (W x + scaling B A x) + bias

with the row norm detached from the gradient, as in the paper (section 4.3) and PEFT.

Several adapters can sit on one base (their weights shared): `Routing.active` picks the one
every row uses, or `Routing.rows` one per row of a batch (PEFT's mixed-batch inference).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..errors import InvalidArgument
from .. import products
from ..quant.linear import QuantizedLinear, StackedLinear

# --------------------------------------------------------------------------- the name table
# Per family: (Hugging Face module under a layer, our module under a layer, part of its output).
# A part of None is the whole matrix; "q", "k", "v", "gate", "up" are slices (`part_range`).
_LLAMA = (("self_attn.q_proj", "attn.qkv_proj", "q"), ("self_attn.k_proj", "attn.qkv_proj", "k"),
          ("self_attn.v_proj", "attn.qkv_proj", "v"), ("self_attn.o_proj", "attn.o_proj", None),
          ("mlp.gate_proj", "mlp.gate_up_proj", "gate"), ("mlp.up_proj", "mlp.gate_up_proj", "up"),
          ("mlp.down_proj", "mlp.down_proj", None))
_GPT2 = (("attn.c_attn", "attn.qkv_proj", None), ("attn.c_proj", "attn.o_proj", None),
         ("mlp.c_fc", "mlp.up_proj", None), ("mlp.c_proj", "mlp.down_proj", None))
_PHI3 = (("self_attn.qkv_proj", "attn.qkv_proj", None), ("self_attn.o_proj", "attn.o_proj", None),
         ("mlp.gate_up_proj", "mlp.gate_up_proj", None), ("mlp.down_proj", "mlp.down_proj", None))
_PHI = (("self_attn.q_proj", "attn.qkv_proj", "q"), ("self_attn.k_proj", "attn.qkv_proj", "k"),
        ("self_attn.v_proj", "attn.qkv_proj", "v"), ("self_attn.dense", "attn.o_proj", None),
        ("mlp.fc1", "mlp.up_proj", None), ("mlp.fc2", "mlp.down_proj", None))
TARGETS = {"gpt2": _GPT2, "phi3": _PHI3, "phi": _PHI,
           **{f: _LLAMA for f in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "gemma2", "gemma3_text")}}
LAYER_PREFIX = {family: "transformer.h.{}" if family == "gpt2" else "model.layers.{}" for family in TARGETS}
# Families whose checkpoints fuse q/k/v in another row order than ours: an adapter's B rows would
# need the reordering too.
NO_ADAPTERS = {"gpt_neox": "GPT-NeoX stores q/k/v interleaved per head",
               "falcon": "Falcon stores q/k/v grouped per key/value head"}
# Short names a user may give for the LLaMA-family projections.
ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
           "down": "down_proj"}
PEFT_PREFIX = "base_model.model."


def part_range(config: Config, part: str | None, out_features: int) -> tuple[int, int]:
    """The output rows [start, stop) of a part of a fused projection."""
    q, kv, f = config.n_head * config.head_dim, config.n_kv_head * config.head_dim, config.intermediate_size
    ranges = {None: (0, out_features), "q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv),
              "gate": (0, f), "up": (f, 2 * f)}
    return ranges[part]


@dataclass(frozen=True)
class Target:
    hf_name: str  # e.g. model.layers.3.self_attn.q_proj: PEFT's module name (after its prefix)
    module: str  # e.g. layers.3.attn.qkv_proj: ours
    part: str | None


def all_targets(config: Config) -> list[Target]:
    if config.family not in TARGETS:
        why = f" ({NO_ADAPTERS[config.family]})" if config.family in NO_ADAPTERS else ""
        raise InvalidArgument(f"adapters are not defined for the {config.family} family{why}")
    out = []
    for i in range(config.n_layer):
        prefix = LAYER_PREFIX[config.family].format(i)
        out += [Target(f"{prefix}.{hf}", f"layers.{i}.{ours}", part) for hf, ours, part in TARGETS[config.family]]
    return out


def match_targets(config: Config, targets: str | Sequence[str]) -> list[Target]:
    """The projections `targets` names, with PEFT's rules: a list of names matches a module whose
    name is one of them or ends with "." + one of them; a string is a regular expression the
    whole module name must match; "all-linear" is every projection (never the output head).
    Short LLaMA names (q, k, v, o, gate, up, down) stand for q_proj, ... ."""
    every = all_targets(config)
    if isinstance(targets, str) and targets == "all-linear":
        return every
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise InvalidArgument(f"target modules {targets!r} is not a valid regular expression: {e}") from None
        found = [t for t in every if pattern.fullmatch(t.hf_name)]
    else:
        names = [ALIASES.get(n, n) if config.family != "gpt2" else n for n in targets]
        found = [t for t in every if any(t.hf_name == n or t.hf_name.endswith("." + n) for n in names)]
    if not found:
        available = sorted({hf.rpartition(".")[2] for hf, _, _ in TARGETS[config.family]})
        raise InvalidArgument(f"target modules {targets if isinstance(targets, str) else ','.join(targets)} match "
                              f"nothing in this {config.family} model; available: {', '.join(available)}, "
                              "all-linear, or a regular expression over names like "
                              f"{every[0].hf_name}")
    return found


@dataclass
class LoraSpec:
    """An adapter's hyper-parameters, as PEFT's LoraConfig names them."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False
    dora: bool = False

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise InvalidArgument(f"the LoRA rank r must be a positive integer, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise InvalidArgument(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


# ------------------------------------------------------------------------- frozen base matmul
class _DequantizedMatmul(torch.autograd.Function):
    """x @ W^T for a frozen quantized W that is dequantized in the forward and again in the
    backward (for x's gradient), so autograd keeps no float copy of any layer: QLoRA's memory
    saving. Only the packed buffers stay alive between the two passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return products.linear(x, layer.unpacked_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad W: a linear with W^T as the weight
        return products.linear(grad, ctx.layer.unpacked_weight().to(grad.dtype).t()), None


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen base's (out, in) float weight (dequantized for a quantized layer or a GGUF
    file's mixed-format stack)."""
    if isinstance(base, StackedLinear):
        return base.dequantize()
    return base.unpacked_weight() if isinstance(base, QuantizedLinear) else base.weight


def frozen_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(base, QuantizedLinear):
        y = _DequantizedMatmul.apply(x, base)
        return y if base.bias is None else y + base.bias.to(y.dtype)
    return base(x)


def _versions(tensors: list[torch.Tensor]) -> tuple:
    """What identifies the tensors' current values: where each lives and its in-place version."""
    return tuple((t.data_ptr(), t._version) for t in tensors)


# ----------------------------------------------------------------------------- the modules
class Routing:
    """Which adapter each forward uses, shared by all LoraLinear modules of one model:
    `active` for every row (None: the base alone), or `rows`, one name (or None) per row."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.rows: list[str | None] | None = None
        self._groups: dict[str, torch.Tensor] | None = None  # rows' indices by adapter, built once per `rows`

    def set_rows(self, rows: list[str | None] | None) -> None:
        self.rows, self._groups = rows, None

    def groups(self, device: torch.device) -> dict[str, torch.Tensor]:
        """{adapter: (n,) indices of its rows}, computed once for every projection of a forward."""
        if self._groups is None or any(t.device != device for t in self._groups.values()):
            names = sorted({n for n in self.rows if n is not None})
            self._groups = {name: torch.tensor([i for i, n in enumerate(self.rows) if n == name], device=device)
                            for name in names}
        return self._groups


class LoraUpdate(nn.Module):
    """One adapter's tensors in one projection: A, B (and DoRA's magnitude) per part."""

    def __init__(self, spec: LoraSpec, ranges: dict[str, tuple[int, int]], in_features: int,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.scaling, self.dora = spec.scaling, spec.dora
        self.ranges = dict(sorted(ranges.items(), key=lambda kv: kv[1]))  # part -> (start, stop), in output order
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout else nn.Identity()
        self.lora_A = nn.ParameterDict({p: nn.Parameter(torch.zeros(spec.r, in_features, device=device))
                                        for p in self.ranges})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(torch.zeros(e - s, spec.r, device=device))
                                        for p, (s, e) in self.ranges.items()})
        self.magnitude = nn.ParameterDict({p: nn.Parameter(torch.ones(e - s, device=device))
                                           for p, (s, e) in self.ranges.items()} if spec.dora else {})

    def delta_weight(self, part: str) -> torch.Tensor:
        """scaling * B A, (part_out, in)."""
        return self.scaling * (self.lora_B[part] @ self.lora_A[part])

    def row_scale(self, part: str, base: nn.Module | torch.Tensor) -> torch.Tensor:
        """DoRA's m / ||W + scaling B A|| per output row of the part, the norm detached."""
        if isinstance(base, torch.Tensor):  # a weight given as is (merging)
            return self.magnitude[part] / self._row_norm(part, base)
        if not torch.is_grad_enabled():  # decoding: the norm changes with the weights, not per step
            stored = list(base.parameters(recurse=False)) + list(base.buffers(recurse=False))
            key = _versions(stored + [self.lora_A[part], self.lora_B[part]])
            cached = self.__dict__.setdefault("_norms", {}).get(part)
            if cached is None or cached[0] != key:
                cached = (key, self._row_norm(part, base_weight(base)))
                self._norms[part] = cached
            return self.magnitude[part] / cached[1]
        return self.magnitude[part] / self._row_norm(part, base_weight(base))

    def _row_norm(self, part: str, weight: torch.Tensor) -> torch.Tensor:
        """||W + scaling B A|| per output row of the part, detached (DoRA, section 4.3)."""
        s, e = self.ranges[part]
        with torch.no_grad():
            return (weight[s:e].to(self.lora_A[part].dtype) + self.delta_weight(part)).norm(dim=1)

    def apply(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """y (..., out): the base's output for x (..., in) -> with this adapter's updates."""
        dropped = self.dropout(x)
        if not self.dora:
            return self._add_low_rank(dropped, y)
        return self._apply_dora(x, dropped, y, base)

    def _add_low_rank(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + scaling * B A x for every part in two products: the parts' A stacked, (P r, in),
        and their B laid block-diagonally over the output rows, (out, P r), zero between blocks,
        the second product adding into y (in place when y is (N, out) and no view) with the
        scaling as its alpha. No (..., out) update, scaled copy or sum is written, and the
        backward's work on the parts is two small products each way instead of 2 P (the zero
        blocks add exact zeros: each row's value is its own part's)."""
        a, b = self._stacked(y.shape[-1], x.dtype)
        h = F.linear(x, a).flatten(0, -2)  # (N, P r)
        if y.dim() == 2 and y._base is None:  # the base's fresh output, which no backward needs: added into
            return y.addmm_(h, b.t(), alpha=self.scaling)
        return torch.addmm(y.flatten(0, -2), h, b.t(), alpha=self.scaling).view(y.shape)

    def _stacked(self, out: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A stacked (P r, in), B block-diagonal (out, P r)) in `dtype`. Without gradients
        (decoding) they are kept between calls, rebuilt when one of the adapter's tensors changes
        in place or is replaced, as DoRA's norms are (row_scale)."""
        if torch.is_grad_enabled():
            return self._stack(out, dtype)
        key = (out, dtype) + _versions([*self.lora_A.values(), *self.lora_B.values()])
        cached = self.__dict__.get("_stacked_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_stacked_cache"] = (key, self._stack(out, dtype))
        return cached[1]

    def _stack(self, out: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        parts = list(self.ranges)
        a = self.lora_A[parts[0]] if len(parts) == 1 else torch.cat([self.lora_A[p] for p in parts])
        blocks = [F.pad(self.lora_B[p], (0, 0, s, out - e)) if (s, e) != (0, out) else self.lora_B[p]
                  for p, (s, e) in self.ranges.items()]  # part p's B in its output rows and its r columns
        b = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return a.to(dtype), b.to(dtype)

    def _apply_dora(self, x: torch.Tensor, dropped: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """DoRA: each part through its own A and B (PEFT's arithmetic, rounding included), the
        parts' outputs laid side by side over the output rows and added to y whole. No slice of y
        is taken, so the backward builds no zero-filled full-size gradient per part."""
        parts = list(self.ranges)
        h = [F.linear(dropped, self.lora_A[p].to(x.dtype)) for p in parts]
        delta = self._rows(y.shape[-1], None, [F.linear(hp, self.lora_B[p].to(x.dtype)) for hp, p in zip(h, parts)])
        delta = delta * self.scaling  # (..., out)
        scale = self._rows(y.shape[-1], 1.0, [self.row_scale(p, base) for p in parts]).to(x.dtype)  # 1 elsewhere
        if dropped is x:  # the base's output without its bias
            plain = y if base.bias is None else y - base.bias.to(y.dtype)
        else:  # PEFT recomputes it on the dropped-out input
            plain = products.linear(dropped, base_weight(base).to(x.dtype))
        return y + (scale - 1) * plain + scale * delta

    def _rows(self, out: int, fill: float | None, values: list[torch.Tensor]) -> torch.Tensor:
        """values[p] (..., part rows) laid over `out` output rows along the last dimension, each
        in its part's rows; rows between parts are `fill` (ones for DoRA's scales), or zeros."""
        pieces, at = [], 0
        for value, (s, e) in zip(values, self.ranges.values()):
            if s > at:
                pieces.append(value.new_full((*value.shape[:-1], s - at), fill or 0.0))
            pieces.append(value)
            at = e
        if out > at:
            pieces.append(values[-1].new_full((*values[-1].shape[:-1], out - at), fill or 0.0))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


class LoraLinear(nn.Module):
    """A frozen base projection with adapters beside it (see the module docstring)."""

    def __init__(self, base: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.routing = routing
        self.merged: str | None = None  # the adapter folded into the base weight, if any
        self._unmerged: torch.Tensor | None = None  # the base weight before merging, restored exactly

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.routing.rows
        if rows is None:
            name = self.routing.active
            if name is None or name == self.merged or name not in self.adapters:
                return frozen_linear(self.base, x)
            # (N, in) rows: the base's output is then a tensor of its own, not a view of one, which
            # the update can be added into in place without autograd copying it back in the backward
            flat = x.reshape(-1, x.shape[-1])
            y = self.adapters[name].apply(flat, frozen_linear(self.base, flat), self.base)
            return y.view(*x.shape[:-1], y.shape[-1])
        y = frozen_linear(self.base, x)
        if len(rows) != x.shape[0]:
            raise InvalidArgument(f"{len(rows)} adapter names for a batch of {x.shape[0]} rows")
        for name, idx in self.routing.groups(x.device).items():
            if name in self.adapters and name != self.merged:
                y = y.index_copy(0, idx, self.adapters[name].apply(x[idx], y[idx], self.base))
        return y

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight (W + scaling B A; DoRA: m/||.|| (W + scaling B A))."""
        if self.merged is not None:
            raise InvalidArgument(f"adapter {self.merged!r} is already merged; unmerge it first")
        if not isinstance(self.base, nn.Linear):
            raise InvalidArgument("merging into a quantized base needs requantizing (emergence merge --requantize)")
        update, w = self.adapters[name], self.base.weight
        self._unmerged = w.detach().clone()
        merged = w.detach().clone()
        for part, (s, e) in update.ranges.items():
            new = merged[s:e].float() + update.delta_weight(part).float()
            if update.dora:
                new = update.row_scale(part, merged).float()[:, None] * new
            merged[s:e] = new.to(w.dtype)
        w.copy_(merged)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: the base weight as it was, bit for bit."""
        if self.merged is None:
            return
        self.base.weight.copy_(self._unmerged)
        self.merged, self._unmerged = None, None


# ------------------------------------------------------------------------ model-level calls
def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def routing(model: nn.Module) -> Routing:
    """The model's adapter routing (one is attached by the first `add_adapter`)."""
    found = model.__dict__.get("lora_routing")
    if found is None:
        found = Routing()
        model.__dict__["lora_routing"] = found
    return found


def add_adapter(model: nn.Module, spec: LoraSpec, name: str = "default", *,
                generator: torch.Generator | None = None, init: bool = True) -> list[Target]:
    """Give `model` adapter `name` on the projections `spec.targets` names, and make it active.

    init: PEFT's initialisation (A kaiming-uniform with a = sqrt(5), B zero, DoRA's magnitude the
    base weight's row norms), so the adapted model starts equal to the base. Returns the targets.
    """
    spec.validate()
    config = model.config
    found = match_targets(config, spec.targets)
    route = routing(model)
    by_module: dict[str, dict[str, tuple[int, int]]] = {}
    for t in found:
        by_module.setdefault(t.module, {})[t.part or "all"] = part_range(config, t.part,
                                                                        model.get_submodule(t.module).out_features)
    for module_name, ranges in by_module.items():
        layer = model.get_submodule(module_name)
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer, route)
            parent, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer)
        if name in layer.adapters:
            raise InvalidArgument(f"the model already has an adapter named {name!r}")
        device = base_weight(layer.base).device
        update = LoraUpdate(spec, ranges, layer.in_features, device=device)
        if init:
            with torch.no_grad():
                for part in update.ranges:
                    nn.init.kaiming_uniform_(update.lora_A[part], a=math.sqrt(5), generator=generator)
                    if spec.dora:
                        s, e = update.ranges[part]
                        update.magnitude[part].copy_(base_weight(layer.base)[s:e].float().norm(dim=1))
        layer.adapters[name] = update
    model.__dict__.setdefault("lora_specs", {})[name] = spec
    route.active = name
    return found


def adapter_names(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("lora_specs", {}))


def set_active(model: nn.Module, name: str | None) -> None:
    if name is not None and name not in adapter_names(model):
        raise InvalidArgument(f"no adapter named {name!r}; the model has: {', '.join(adapter_names(model)) or 'none'}")
    routing(model).active = name


@contextmanager
def per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Run forwards with one adapter (or None, the base) per batch row."""
    route = routing(model)
    saved = route.rows
    route.set_rows(list(names))
    try:
        yield
    finally:
        route.set_rows(saved)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run forwards of the base alone, every adapter off (PEFT's `disable_adapter()`): the frozen
    base's own outputs, bit for bit, with no second copy of its weights (DPO's reference model).
    An adapter merged into the base weights cannot be turned off so: refused."""
    merged = sorted({layer.merged for layer in lora_modules(model).values() if layer.merged is not None})
    if merged:
        raise InvalidArgument(f"adapter {merged[0]!r} is merged into the base weights: unmerge it to run the base alone")
    route = routing(model)
    active, rows = route.active, route.rows
    route.active = None
    route.set_rows(None)
    try:
        yield
    finally:
        route.active = active
        route.set_rows(rows)


def mark_only_adapters_trainable(model: nn.Module) -> tuple[int, int]:
    """Freeze everything but adapter tensors; returns (trainable, total) parameter counts."""
    trainable = 0
    for pname, p in model.named_parameters():
        p.requires_grad_(".adapters." in pname)
        trainable += p.numel() if p.requires_grad else 0
    # The base's count from its shapes: a quantized base keeps its weights in packed buffers.
    return trainable, model.config.num_parameters() + trainable


def merge(model: nn.Module, name: str) -> None:
    for layer in lora_modules(model).values():
        if name in layer.adapters:
            layer.merge(name)


def unmerge(model: nn.Module) -> None:
    for layer in lora_modules(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, name: str) -> nn.Module:
    """Fold adapter `name` into the base weights and put the plain projections back: an ordinary
    model, as PEFT's merge_and_unload gives."""
    merge(model, name)
    for module_name, layer in lora_modules(model).items():
        parent, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer.base)
    model.__dict__.pop("lora_routing", None)
    model.__dict__.pop("lora_specs", None)
    return model
