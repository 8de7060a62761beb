"""PEFT's adapter format, both ways: `adapter_config.json` + `adapter_model.safetensors`.

Tensor names are PEFT's for the Hugging Face model class of the family, e.g.

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight      (r, in)
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight      (q_out, r)
    base_model.model.model.layers.3.self_attn.q_proj.lora_magnitude_vector   (q_out,)  DoRA
    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight          GPT-2's fused c_attn

`lora.TARGETS` ties each to our module and its part, so a file written by PEFT loads here and
one written here loads in PEFT. Pickled `adapter_model.bin` files are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidArgument
from ..weights.safetensors_io import SafetensorsFile, save_safetensors
from .lora import PEFT_PREFIX, LoraSpec, Target, add_adapter, all_targets, lora_modules, part_range

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# LoraConfig options emergence does not implement: a file that sets them is refused, not misread.
_UNSUPPORTED = {"modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "lora_bias": False, "use_qalora": False, "target_parameters": None, "trainable_token_indices": None,
                "layer_replication": None}
_SUFFIXES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
             "lora_magnitude_vector.weight": "magnitude"}  # (the last: PEFT before 0.12)


def _short_names(targets: list[Target]) -> list[str]:
    return sorted({t.hf_name.rpartition(".")[2] for t in targets})


def peft_config(spec: LoraSpec, targets: list[Target], family: str, base: str | None) -> dict:
    """PEFT's LoraConfig fields for this adapter. target_modules: a regular expression as given
    (PEFT full-matches it too), else the short names it covers (in every layer)."""
    regex = isinstance(spec.targets, str) and spec.targets != "all-linear"
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": spec.r,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": spec.targets if regex else _short_names(targets),
            "use_rslora": spec.rslora, "use_dora": spec.dora, "bias": "none", "fan_in_fan_out": family == "gpt2",
            "init_lora_weights": True, "inference_mode": True, **_UNSUPPORTED}


def adapter_tensors(model: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], list[Target]]:
    """Adapter `name`'s tensors under PEFT's names, and the targets they cover."""
    by_module = {t.module: [] for t in all_targets(model.config)}
    for t in all_targets(model.config):
        by_module[t.module].append(t)
    tensors, covered = {}, []
    for module_name, layer in lora_modules(model).items():
        if name not in layer.adapters:
            continue
        update = layer.adapters[name]
        for t in by_module[module_name]:
            part = t.part or "all"
            if part not in update.ranges:
                continue
            covered.append(t)
            key = PEFT_PREFIX + t.hf_name
            tensors[f"{key}.lora_A.weight"] = update.lora_A[part].detach().float().contiguous()
            tensors[f"{key}.lora_B.weight"] = update.lora_B[part].detach().float().contiguous()
            if update.dora:
                tensors[f"{key}.lora_magnitude_vector"] = update.magnitude[part].detach().float().contiguous()
    if not tensors:
        raise InvalidArgument(f"the model has no adapter named {name!r}")
    return tensors, covered


def save_adapter(model: nn.Module, folder: str | Path, name: str = "default", *, base: str | None = None) -> Path:
    """Write adapter `name` as a PEFT folder (each file written whole, then renamed into place)."""
    folder = Path(folder)
    spec = model.__dict__["lora_specs"][name]
    tensors, targets = adapter_tensors(model, name)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    tmp = folder / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(peft_config(spec, targets, model.config.family, base), indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_FILE)
    return folder


def read_adapter(folder: str | Path) -> tuple[LoraSpec, dict, dict[str, torch.Tensor]]:
    """(spec, adapter_config.json as read, tensors by PEFT name) of a PEFT LoRA folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidArgument(f"adapter {folder}: no such folder")
    if not (folder / CONFIG_FILE).is_file():
        raise InvalidArgument(f"adapter {folder} has no {CONFIG_FILE}: not a PEFT adapter folder")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{folder / CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise InvalidArgument(f"{folder / CONFIG_FILE}: peft_type {raw.get('peft_type') if isinstance(raw, dict) else raw!r}"
                              " is not LORA; emergence loads LoRA and DoRA adapters")
    for key, default in _UNSUPPORTED.items():
        if raw.get(key, default) not in (default, None, {}, False):
            raise InvalidArgument(f"{folder / CONFIG_FILE} sets {key}={raw[key]!r}, which emergence does not support")
    if raw.get("bias", "none") != "none":
        raise InvalidArgument(f"{folder / CONFIG_FILE} sets bias={raw['bias']!r}; only adapters without bias "
                              "training (bias none) are supported")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = " (adapter_model.bin is a pickle, which emergence never loads)" if (
            folder / "adapter_model.bin").exists() else ""
        raise InvalidArgument(f"adapter {folder} has no {WEIGHTS_FILE}{pickled}")
    try:
        spec = LoraSpec(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                        dropout=float(raw.get("lora_dropout", 0.0)), targets=raw.get("target_modules") or [],
                        rslora=bool(raw.get("use_rslora", False)), dora=bool(raw.get("use_dora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument(f"{folder / CONFIG_FILE}: a bad or missing LoRA setting ({e})") from None
    spec.validate()
    file = SafetensorsFile(weights)
    tensors = {name: file.tensor(name, copy=True).float() for name in file.keys()}
    return spec, raw, tensors


def load_adapter(model: nn.Module, folder: str | Path, name: str = "default") -> LoraSpec:
    """Add the PEFT adapter in `folder` to `model` as `name` (active), after checking that every
    tensor names a projection of this model with the shape it has here."""
    spec, raw, tensors = read_adapter(folder)
    made_for = f" (it names base {raw['base_model_name_or_path']})" if raw.get("base_model_name_or_path") else ""
    by_hf = {t.hf_name: t for t in all_targets(model.config)}
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, kind = None, None
        for suffix, what in _SUFFIXES.items():
            if key.startswith(PEFT_PREFIX) and key.endswith("." + suffix):
                module, kind = key[len(PEFT_PREFIX):-len(suffix) - 1], what
        if module is None or module not in by_hf:
            raise InvalidArgument(f"adapter {folder}: tensor {key} names no projection of this {model.config.family} "
                                  f"model ({model.config.n_layer} layers): an adapter made for another base?{made_for}")
        found.setdefault(module, {})[kind] = value
    problems = []
    for module, parts in found.items():
        t = by_hf[module]
        layer = model.get_submodule(t.module)
        s, e = part_range(model.config, t.part, layer.out_features)
        expect = {"lora_A": (spec.r, layer.in_features), "lora_B": (e - s, spec.r)}
        if spec.dora:
            expect["magnitude"] = (e - s,)
        for kind, shape in expect.items():
            got = parts.get(kind)
            if got is None:
                problems.append(f"{module}: {kind} missing")
            elif tuple(got.shape) != shape:
                problems.append(f"{module}.{kind}: adapter {tuple(got.shape)}, this model needs {shape}")
    if problems:
        raise InvalidArgument(f"adapter {folder} does not fit this model (made for another base?{made_for}): "
                              + "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""))
    spec.targets = sorted(found)  # exactly the modules the file covers
    add_adapter(model, spec, name, init=False)
    with torch.no_grad():
        for module, parts in found.items():
            t = by_hf[module]
            update = model.get_submodule(t.module).adapters[name]
            part = t.part or "all"
            update.lora_A[part].copy_(parts["lora_A"])
            update.lora_B[part].copy_(parts["lora_B"])
            if spec.dora:
                update.magnitude[part].copy_(parts["magnitude"])
    return spec
