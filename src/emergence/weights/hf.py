"""Hugging Face checkpoint folders: config.json + model.safetensors (or shards + index).

`load_hf` builds the model on the meta device (no memory), reads each tensor through the
family's name table, checks its shape against the model and assigns it: peak memory is
the weights themselves. `save_hf` writes the same layout, sharded on request, atomically.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..config import Config, read_json
from ..errors import CheckpointError, ConfigError, InvalidArgument
from ..model import Transformer, empty_model, finish_loading
from .names import IGNORED_SUFFIXES, canonical_names, expand, hf_rules
from .safetensors_io import DTYPES, SafetensorsFile, save_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANTIZATION_KEY = "emergence.quantization"  # safetensors metadata of a quantized checkpoint (emergence.quant)


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def open_shards(folder: Path) -> dict[str, SafetensorsFile]:
    """Checkpoint tensor name -> the file holding it."""
    if (folder / SINGLE_FILE).is_file():
        f = SafetensorsFile(folder / SINGLE_FILE)
        return {name: f for name in f.keys()}
    if not (folder / INDEX_FILE).is_file():
        if (folder / "pytorch_model.bin").exists():
            raise CheckpointError(f"{folder} holds only pytorch_model.bin (pickle), which emergence never loads; "
                                  "convert it to safetensors first")
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    try:
        weight_map = read_json(folder / INDEX_FILE)["weight_map"]
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"bad {INDEX_FILE} in {folder}: {e}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"bad {INDEX_FILE} in {folder}: weight_map is not an object")
    files: dict[str, SafetensorsFile] = {}
    out = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise CheckpointError(f"bad shard name {shard!r} in {INDEX_FILE}")
        if shard not in files:
            files[shard] = SafetensorsFile(folder / shard)
        if name not in files[shard].entries:
            raise CheckpointError(f"{INDEX_FILE} says {name!r} is in {shard}, but it is not (partial checkpoint?)")
        out[name] = files[shard]
    return out


def load_hf(folder: str | Path, *, dtype: torch.dtype | None = None) -> tuple[Transformer, Config]:
    """Load a Hugging Face layout folder onto the CPU; dtype None keeps the stored dtype."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no config.json in {folder} (not a model folder, or a partial copy)")
    hf = read_json(folder / "config.json")
    if hf.get("model_type") == "t5":
        return _load_t5(folder, hf, dtype)
    config = Config.from_hf(hf)
    config.name = folder.resolve().name
    sources = open_shards(folder)
    if any(QUANTIZATION_KEY in f.metadata for f in set(sources.values())):
        from ..quant.checkpoint import load_quantized  # imported here: quant depends on weights, not the reverse

        return load_quantized(folder, config, sources, dtype=dtype), config
    if config.family == "gpt2" and "transformer.wte.weight" not in sources:
        sources = {("transformer." + k if not k.startswith("lm_head") else k): v for k, v in sources.items()}

    check_layer_count(sources, config, folder)
    model = empty_model(config)
    wanted = canonical_names(model)
    state, used = read_state(expand(hf_rules(config), config, wanted), sources, model, config, folder, dtype)
    unexpected = sorted(k for k in set(sources) - used
                        if not k.endswith(IGNORED_SUFFIXES) and not (config.tie_embeddings and k == "lm_head.weight"))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors this {config.family} config does not use: "
                              f"{', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"no checkpoint tensor maps to {', '.join(missing[:3])}")
    return finish_loading(model, state), config


def read_state(rules, sources: dict, model: torch.nn.Module, config, folder: Path,
                dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Canonical tensors from the checkpoint through the name table's rules, shapes checked
    against the model's; also returns the checkpoint names used."""
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    used = set()
    for rule in rules:
        missing = [name for name in rule.theirs if name not in sources]
        if missing:
            raise CheckpointError(f"checkpoint in {folder} lacks tensor {missing[0]!r} (partial or wrong architecture?)")
        stored_dtypes = {DTYPES[sources[n].entries[n]["dtype"]] for n in rule.theirs}
        if not all(d.is_floating_point for d in stored_dtypes):
            raise CheckpointError(f"tensor {rule.theirs[0]!r} in {folder} is not stored as floating point")
        transformed = not rule.is_identity or (dtype is not None and stored_dtypes != {dtype})
        # Views of the map in every case: a transformed tensor is built from them straight into
        # its one new buffer (no intermediate copy the allocator would keep), then their pages go.
        theirs = [sources[n].tensor(n) for n in rule.theirs]
        converted = _convert(rule, theirs, config, folder)
        if dtype is not None:
            converted = [t.to(dtype) for t in converted]
        if transformed:
            del theirs
            for n in rule.theirs:
                sources[n].release(n)
        for name, t in zip(rule.ours, converted):
            if t.shape != params[name].shape:
                raise CheckpointError(f"tensor {', '.join(rule.theirs)} gives shape {tuple(t.shape)}, but config.json "
                                      f"implies {tuple(params[name].shape)} for {name}")
            state[name] = t
        used.update(rule.theirs)
    return state, used


def _load_t5(folder: Path, hf: dict, dtype: torch.dtype | None):
    """A T5ForConditionalGeneration folder -> (T5, T5Config)."""
    from ..t5 import empty_t5
    from .hf_config import t5_config_from_hf
    from .names import T5_DUPLICATES, t5_rules

    sources = open_shards(folder)
    config = t5_config_from_hf(hf, tied="lm_head.weight" not in sources)
    config.name = folder.resolve().name
    for stack, layers in (("encoder", config.n_encoder_layer), ("decoder", config.n_layer)):
        found = {int(m.group(1)) for name in sources if (m := re.match(rf"{stack}\.block\.(\d+)\.", name))}
        if not found:
            raise CheckpointError(f"the T5 checkpoint in {folder} has no {stack} layers (a partial checkpoint, or "
                                  f"an encoder-only one): an encoder-decoder needs both stacks")
        if max(found) + 1 != layers:
            raise CheckpointError(f"config.json says {layers} {stack} layers but the checkpoint in {folder} holds "
                                  f"{max(found) + 1}")
    model = empty_t5(config)
    state, used = read_state(t5_rules(config), sources, model, config, folder, dtype)
    unexpected = sorted(set(sources) - used - set(T5_DUPLICATES))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors this T5 config does not use: {', '.join(unexpected[:3])}")
    missing = sorted(canonical_names(model) - set(state))
    if missing:
        raise CheckpointError(f"no checkpoint tensor maps to {', '.join(missing[:3])}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    return model.eval(), config


_LAYER_INDEX = re.compile(r"\.(?:h|layers)\.(\d+)\.")


def check_layer_count(sources: dict, config: Config, folder: Path) -> None:
    """Compare config.json's layer count with the checkpoint's before building anything, so an
    absurd count is refused instead of allocating (even meta) modules for it."""
    indices = [int(m.group(1)) for name in sources if (m := _LAYER_INDEX.search(name))]
    found = max(indices) + 1 if indices else 0
    if found != config.n_layer:
        raise CheckpointError(f"config.json says {config.n_layer} layers but the checkpoint in {folder} holds {found}")


def _convert(rule, tensors: list[torch.Tensor], config: Config, folder: Path) -> list[torch.Tensor]:
    try:
        return rule.to_ours(tensors, config)
    except RuntimeError as e:  # shapes that cannot be fused or split as the config implies
        raise CheckpointError(f"tensors {', '.join(rule.theirs)} in {folder} do not match config.json: "
                              f"{str(e).splitlines()[0]}") from None


def _save_ternary(model: Transformer, folder: Path) -> None:
    import copy
    import dataclasses

    from ..quant import quantize_model, save_quantized

    inference = copy.deepcopy(model)
    inference.config = dataclasses.replace(model.config, ternary=False)  # the packed layers say it now
    # BitLinear's forward is TernaryLinear's with 8-bit activations; the output head stays as trained
    save_quantized(quantize_model(inference, "ternary", act_bits=8, skip=("lm_head",)), None, folder)


def save_hf(model: Transformer, folder: str | Path, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json and the weights (one file, or shards of at most max_shard_bytes + index).
    A model trained ternary (Config.ternary, BitNet b1.58) is written as what it computes: its
    ternary checkpoint (quant.save_quantized; the packed values and scale of every BitLinear)."""
    folder = Path(folder)
    if getattr(model.config, "ternary", False):
        _save_ternary(model, folder)
        return
    from ..quant.linear import GGMLEmbedding, QuantizedLinear, StackedLinear

    packed = next((name for name, m in model.named_modules()
                   if isinstance(m, (QuantizedLinear, GGMLEmbedding, StackedLinear))), None)
    if packed is not None:  # its weights are no parameters: the folder would lack them
        raise InvalidArgument(f"{packed} is quantized and a Hugging Face folder holds float weights: save it with "
                              "quant.save_quantized (GGUF blocks: save_gguf), or load it dequantized "
                              "(emergence.load(..., dequantize=True))")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {folder}: {e.strerror}") from None
    config = model.config
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    if config.is_encoder_decoder:
        from .hf_config import t5_config_to_hf
        from .names import t5_rules

        hf_config, rules = t5_config_to_hf(config), t5_rules(config)
    else:
        hf_config, rules = config.to_hf(), expand(hf_rules(config), config, canonical_names(model))
    for rule in rules:
        converted = rule.to_theirs([params[n].detach() for n in rule.ours], config)
        tensors.update(zip(rule.theirs, converted))

    shards = _plan_shards(tensors, max_shard_bytes)
    for stale in list(folder.glob("model*.safetensors")) + [folder / INDEX_FILE]:
        if stale.exists() and stale.name not in shards:
            stale.unlink()
    for file_name, names in shards.items():
        save_safetensors({n: tensors[n] for n in names}, folder / file_name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {n: f for f, names in shards.items() for n in names}}
        write_json_atomic(folder / INDEX_FILE, index)
    hf_config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    write_json_atomic(folder / "config.json", hf_config)


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> dict[str, list[str]]:
    if max_bytes is None:
        return {SINGLE_FILE: list(tensors)}
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    if n == 1:
        return {SINGLE_FILE: groups[0]}
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": g for i, g in enumerate(groups)}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)

