"""Quantized checkpoints: a model folder whose safetensors file says how it is quantized.

Layout: config.json (the model's Hugging Face config, as `save_hf` writes it), tokenizer
files, and one model.safetensors holding the model's state dict under emergence's canonical
names (`layers.0.attn.qkv_proj.qweight`, `tok_embeddings.weight`, ...): the packed buffers of
each quantized layer exactly as they are in memory, and every other tensor (embeddings,
norms, skipped layers) as it is. A tied lm_head is not stored twice.

The file's metadata key "emergence.quantization" holds a JSON string:

    {"version": 1, "format": "int4", "method": "gptq", "group_size": 64, "act_bits": null,
     "modules": {"layers.0.attn.qkv_proj": {"format": "int4", "method": "gptq", "in_features": 64,
                                            "out_features": 128, "bias": false, "options": {"group_size": 64}},
                 ...}}

`emergence.load` / `load_hf` recognise the key and rebuild the quantized modules from it
(never from file names); loading gives back the same buffers, bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..errors import CheckpointError, EmergenceError, InvalidArgument
from ..model import Transformer, empty_model, finish_loading
from ..weights.hf import INDEX_FILE, QUANTIZATION_KEY, SINGLE_FILE
from ..weights.safetensors_io import DTYPES, SafetensorsFile, save_safetensors
from .linear import (EXPERT_STACKS, FORMATS, GGMLEmbedding, StackedLinear, make_module, quantized_modules,
                     unstack_experts)

VERSION = 1


def quantization_record(model: nn.Module) -> dict:
    """The metadata record of a quantized model (see the module docstring)."""
    kept = next((name for name, m in model.named_modules() if isinstance(m, (GGMLEmbedding, StackedLinear))), None)
    if kept is not None:  # a GGUF file's quantized token table or mixed-format fused layer
        raise InvalidArgument(f"{kept} holds a GGUF file's blocks as no quantized checkpoint can: save the model as "
                              "GGUF (save_gguf, emergence convert ... OUT.gguf)")
    modules = quantized_modules(model)
    if not modules:
        raise InvalidArgument("the model is not quantized (quantize_model first; save_hf writes full-precision models)")
    records = {name: {"format": mod.format, "method": mod.method, "in_features": mod.in_features,
                      "out_features": mod.out_features, "bias": mod.bias is not None, "options": mod.options()}
               for name, mod in modules.items()}

    def common(values):
        values = set(values)
        return values.pop() if len(values) == 1 else None

    return {"version": VERSION,
            "format": common(r["format"] for r in records.values()),
            "method": common(r["method"] for r in records.values()),
            "group_size": common(r["options"].get("group_size") for r in records.values()),
            "act_bits": common(r["options"].get("act_bits") for r in records.values()),
            "modules": records}


def save_quantized(model: Transformer, tokenizer, folder: str | Path) -> None:
    """Write config.json, model.safetensors (with the quantization record) and the tokenizer
    (None: none) into `folder`. Each file is written to a temporary name and renamed into
    place; stale shards of an earlier checkpoint in the folder are removed."""
    folder = Path(folder)
    record = quantization_record(model)
    state = dict(model.state_dict())
    if model.config.tie_embeddings:  # the same tensor as tok_embeddings.weight
        state.pop("lm_head.weight", None)
    floats = [t.dtype for t in state.values() if t.dtype.is_floating_point]
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(floats[0] if floats else torch.float32).removeprefix("torch.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in list(folder.glob("model-*.safetensors")) + [folder / INDEX_FILE]:
            if stale.exists():
                stale.unlink()
        save_safetensors(state, folder / SINGLE_FILE, metadata={QUANTIZATION_KEY: json.dumps(record)})
        if tokenizer is not None:
            tokenizer.save(folder)
        tmp = folder / "config.json.tmp"
        tmp.write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, folder / "config.json")
    except OSError as e:
        raise CheckpointError(f"cannot write {folder}: {e.strerror or e}") from None


def load_quantized(folder: str | Path, config: Config, sources: dict[str, SafetensorsFile], *,
                   dtype: torch.dtype | None = None) -> Transformer:
    """Rebuild a quantized model from `sources` (tensor name -> file, as load_hf opens them).

    The quantized modules are built on the meta device from the record, then every tensor is
    checked (name, shape, and for packed data the exact dtype) and assigned: the buffers are
    views of the memory-mapped file. dtype casts the full-precision tensors (embeddings, norms,
    biases, skipped layers) only; packed data and scales keep their stored dtypes.
    """
    folder = Path(folder)
    record = _read_record(sources, folder)
    model = empty_model(config)
    for name in {name.rpartition(".")[0] for name in record["modules"]}:  # quantized experts, one layer each
        if name.rpartition(".")[2] in EXPERT_STACKS and isinstance(_attribute(model, name), torch.Tensor):
            unstack_experts(model, name)
    for name, rec in record["modules"].items():
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            raise CheckpointError(f"quantized module {name!r} in {folder} is not a linear layer of this "
                                  f"{config.family} config")
        if (target.in_features, target.out_features, target.bias is not None) != (
                rec["in_features"], rec["out_features"], rec["bias"]):
            raise CheckpointError(f"quantized module {name!r} in {folder} has a shape config.json does not imply")
        try:
            module = make_module(rec["format"], rec["in_features"], rec["out_features"], rec["bias"], device="meta",
                                 **rec["options"])
        except (EmergenceError, TypeError) as e:
            raise CheckpointError(f"bad quantization record for {name!r} in {folder}: {e}") from None
        module.method = rec["method"]
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, module)

    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sources))
    if missing:
        raise CheckpointError(f"quantized checkpoint in {folder} lacks tensor {missing[0]!r}")
    unexpected = sorted(set(sources) - set(expected))
    if unexpected:
        raise CheckpointError(f"quantized checkpoint in {folder} has tensors this model does not use: "
                              f"{', '.join(unexpected[:3])}")
    packed = {f"{name}.{b}" for name, mod in quantized_modules(model).items() for b, _ in mod.named_buffers()}
    state = {}
    for name, want in expected.items():
        entry = sources[name].entries[name]
        stored = DTYPES[entry["dtype"]]
        if tuple(entry["shape"]) != tuple(want.shape):
            raise CheckpointError(f"tensor {name!r} in {folder} has shape {tuple(entry['shape'])}, "
                                  f"expected {tuple(want.shape)}")
        if name in packed:
            if stored != want.dtype:
                raise CheckpointError(f"tensor {name!r} in {folder} is stored as {stored}, expected {want.dtype}")
            state[name] = sources[name].tensor(name)
            continue
        if not stored.is_floating_point:
            raise CheckpointError(f"tensor {name!r} in {folder} is not stored as floating point")
        t = sources[name].tensor(name)
        state[name] = t.to(dtype) if dtype is not None else t
    return finish_loading(model, state)


def _attribute(model: nn.Module, name: str) -> object:
    parent, _, leaf = name.rpartition(".")
    try:
        return getattr(model.get_submodule(parent), leaf, None)
    except AttributeError:
        return None


def _read_record(sources: dict[str, SafetensorsFile], folder: Path) -> dict:
    bad = f"bad {QUANTIZATION_KEY} metadata in {folder}"
    texts = {f.metadata[QUANTIZATION_KEY] for f in set(sources.values()) if QUANTIZATION_KEY in f.metadata}
    if len(texts) != 1:
        raise CheckpointError(f"{bad}: the shards disagree")
    try:
        record = json.loads(texts.pop())
    except (ValueError, RecursionError):
        raise CheckpointError(f"{bad}: not JSON") from None
    if not isinstance(record, dict) or record.get("version") != VERSION:
        version = record.get("version") if isinstance(record, dict) else None
        raise CheckpointError(f"{bad}: unsupported version {version!r} (this emergence reads {VERSION})")
    modules = record.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{bad}: no modules")
    for name, rec in modules.items():
        ok = (isinstance(rec, dict) and rec.get("format") in FORMATS and isinstance(rec.get("options"), dict)
              and all(type(rec.get(k)) is int and rec[k] > 0 for k in ("in_features", "out_features"))
              and type(rec.get("bias")) is bool and isinstance(rec.get("method"), str))
        if not ok:
            raise CheckpointError(f"{bad}: entry for {name!r}")
    return record


__all__ = ["save_quantized", "load_quantized", "quantization_record"]
