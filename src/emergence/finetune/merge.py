"""`emergence merge`: an adapter folded into its base, written as an ordinary checkpoint.

A float base gives a plain Hugging Face folder (which `emergence convert` turns into a GGUF
that llama.cpp runs). A quantized base (QLoRA's) cannot take a float update in place, so
merging into it is explicit: `requantize` dequantizes every layer, merges, and quantizes the
result again, and the perplexity change this causes is measured on a held-out text file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters.lora import merge_and_unload
from ..adapters.peft_format import load_adapter
from ..errors import InvalidArgument
from ..quant.linear import QuantizedLinear, quantized_modules


def dequantized(layer: QuantizedLinear) -> nn.Linear:
    """An nn.Linear holding the layer's dequantized weight (and its bias)."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight.data = layer.dequantize().float()
    if layer.bias is not None:
        plain.bias.data = layer.bias.detach().float().clone()
    return plain


def held_out_perplexity(model: nn.Module, tokenizer, path: str | Path, context: int) -> float:
    from ..evaluate import perplexity

    tokens = torch.tensor(tokenizer.encode(Path(path).read_text(encoding="utf-8"), add_bos=False))
    with torch.no_grad():
        return perplexity(model.eval(), tokens, context=context, bos_id=tokenizer.bos_id)[0]


def merge_adapter(base: str, adapter: str | Path, out: str | Path, *, requantize: str | None = None,
                  eval_file: str | Path | None = None, force: bool = False) -> dict:
    """Merge `adapter` into `base` and write the result to `out`; returns what it measured:
    ppl_adapter (the adapter unmerged, over the base as it was trained on: quantized to
    `requantize` if the base is float) and ppl_merged, on `eval_file`."""
    from ..api import load
    from ..files import check_output
    from ..quant.checkpoint import save_quantized
    from ..quant.linear import quantize_model
    from ..weights.hf import save_hf

    out = check_output(out, folder=True, force=force)
    lm = load(base, device="cpu")
    quantized = {m.format for m in lm.model.modules() if isinstance(m, QuantizedLinear)}
    if quantized and requantize is None:
        raise InvalidArgument(f"the base is quantized ({', '.join(sorted(quantized))}): merging into it needs "
                              f"--requantize {sorted(quantized)[0]} (dequantize, merge, quantize again)")
    if requantize is not None and eval_file is None:
        raise InvalidArgument("--requantize changes the weights: give --eval FILE (held-out text) to measure by how much")
    if eval_file is not None and not Path(eval_file).is_file():
        raise InvalidArgument(f"--eval {eval_file}: no such file")
    if requantize is not None and not quantized:  # a float base: quantize it as QLoRA trained on it
        quantize_model(lm.model, requantize)
        quantized = {requantize}
    context = min(lm.config.block_size, 256)
    load_adapter(lm.model, adapter)
    result = {}
    if eval_file is not None:
        result["ppl_adapter"] = held_out_perplexity(lm.model, lm.tokenizer, eval_file, context)
    if quantized:  # the adapter sits on the quantized layers: put float layers under it first
        for name, layer in quantized_modules(lm.model).items():
            parent, _, leaf = name.rpartition(".")
            setattr(lm.model.get_submodule(parent), leaf, dequantized(layer))
    model = merge_and_unload(lm.model, "default")
    if requantize is not None:
        quantize_model(model, requantize)
    if eval_file is not None:
        result["ppl_merged"] = held_out_perplexity(model, lm.tokenizer, eval_file, context)
    if requantize is not None:
        save_quantized(model, lm.tokenizer, out)
    else:
        save_hf(model, out)
        lm.tokenizer.save(out)
    template = Path(adapter) / "chat_template.jinja"
    if template.is_file():
        (out / "chat_template.jinja").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    return result
