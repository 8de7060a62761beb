"""`emergence.load(...)`: one call from a path or name to a ready model and tokenizer.

Sources, recognised by their content, never by their file name:
- nothing: the default model shipped inside the package (llama2.c's stories260K);
- a name of a model shipped inside the package;
- a Hugging Face layout folder (config.json + safetensors + tokenizer files);
- a GGUF file (llama.cpp's format, tokenizer included);
- a llama2.c v0 checkpoint file, with its tokenizer `.bin` passed as `tokenizer=`;
- a name in the local model store (`emergence.store`: `emergence import / create`).

A name is looked up as an existing path first, then in the store, then among the packaged
models (`store.resolve_model`, the one resolver every command uses).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .allocator import huge_page_weights
from .config import Config
from .errors import CheckpointError, InvalidArgument
from .generate import Completion, generate, stream
from .model import Transformer
from .sampling import SamplingParams
from .speculative import DEFAULT_DRAFT_TOKENS, Speculator, check_draft
from .tokenizer import Tokenizer
from .weights.hf import is_hf_folder, load_hf
from .weights.gguf_model import is_gguf_file, load_gguf
from .weights.llama2c import load_llama2c, looks_like_llama2c

if TYPE_CHECKING:
    from .store import Source

PACKAGED_MODELS = Path(__file__).parent / "models"
DEFAULT_MODEL = "stories260K"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def packaged_models() -> list[str]:
    return sorted(p.name for p in PACKAGED_MODELS.iterdir() if is_hf_folder(p)) if PACKAGED_MODELS.is_dir() else []


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgument(f"unknown device {device!r} (use auto, cpu or cuda)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("device cuda was asked for, but no CUDA GPU is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r} (use fp32, bf16 or fp16)")
    return DTYPES[dtype]


@dataclass
class LanguageModel:
    """A model with its tokenizer: the object `emergence.load` returns."""

    model: Transformer
    tokenizer: Tokenizer
    config: Config
    backend: str = "auto"  # how decoding runs: "native" (decode.cpp, CPU), "eager", or "auto" (native where it can)

    def complete(self, prompt: str | Sequence[int], *, truncate: bool = False, json_schema=None, regex=None,
                 grammar=None, draft: LanguageModel | Speculator | None = None, **sampling) -> Completion:
        """One completion with its token ids, finish reason and (if asked) logprobs; json_schema,
        regex or grammar (Lark text) constrain it (structured output); a draft model (or its
        `speculator`) decodes it speculatively."""
        return generate(self.model, self.tokenizer, [prompt], SamplingParams(**sampling), truncate=truncate,
                        backend=self.backend, json_schema=json_schema, regex=regex, grammar=grammar,
                        draft=self._speculator(draft))[0]

    def speculator(self, draft: LanguageModel, *, k: int = DEFAULT_DRAFT_TOKENS) -> Speculator:
        """Speculative decoding of this model with `draft` proposing k tokens a round
        (speculative.py); refused in one line when the draft cannot propose this model's tokens.
        Its `acceptance`, `rounds` and `drafted` count over every completion it serves."""
        check_draft(self.model, draft.model, self.tokenizer, draft.tokenizer)
        return Speculator(draft.model, draft.tokenizer, k=k, backend=draft.backend)

    def _speculator(self, draft: LanguageModel | Speculator | None) -> Speculator | None:
        return self.speculator(draft) if isinstance(draft, LanguageModel) else draft

    def generate(self, prompt: str | Sequence[int], *, truncate: bool = False, **sampling) -> str:
        """The completion text for a prompt; keyword arguments are `SamplingParams` fields, and
        json_schema / regex / grammar for structured output."""
        return self.complete(prompt, truncate=truncate, **sampling).text

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], *, json_schema=None, regex=None, grammar=None,
                       **sampling) -> list[Completion]:
        return generate(self.model, self.tokenizer, prompts, SamplingParams(**sampling), backend=self.backend,
                        json_schema=json_schema, regex=regex, grammar=grammar)

    def stream(self, prompt: str | Sequence[int], *, truncate: bool = False, json_schema=None, regex=None,
               grammar=None, draft: LanguageModel | Speculator | None = None, **sampling) -> Iterator[str]:
        """The completion text, piece by piece, as soon as each piece is final."""
        for chunk in stream(self.model, self.tokenizer, prompt, SamplingParams(**sampling), truncate=truncate,
                            backend=self.backend, json_schema=json_schema, regex=regex, grammar=grammar,
                            draft=self._speculator(draft)):
            if chunk.text:
                yield chunk.text


def require_decoder_only(config, what: str) -> None:
    """One line for the tools that handle decoder-only models only (quantization, adapters, fine-tuning)."""
    if config.is_encoder_decoder:
        raise InvalidArgument(f"{what} takes decoder-only models; {config.name} is an encoder-decoder (T5), "
                              "which it does not support yet")


def load(path_or_name: str | Path | Source | None = None, *, tokenizer: str | Path | None = None,
         device: str = "auto", dtype: str | torch.dtype | None = None, backend: str = "auto",
         adapter: str | Path | None = None, dequantize: bool = False) -> LanguageModel:
    """Load a model and its tokenizer (see the module docstring for what `path_or_name` may be).

    adapter: a PEFT LoRA/DoRA folder to apply (not merged: the logits are peft's; decoding
    then runs eagerly, and `emergence merge` makes a plain checkpoint that decodes natively).

    dequantize: a quantized GGUF file's matrices as float `dtype` weights (float32 by default)
    instead of the file's blocks (weights/gguf_model.load_gguf keeps them packed).

    backend: how decoding runs (decode.make_backend): "auto" takes the native CPU step
    (emergence.kernels) where it can run this model, else the eager forward; "eager" always
    the latter; "native" insists on the former.
    """
    from .decode import BACKENDS

    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown decode backend {backend!r} (use {', '.join(BACKENDS)})")
    from .store import Source, resolve_model

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    source = path_or_name if isinstance(path_or_name, Source) else resolve_model(path_or_name)
    if source.entry is not None:  # a store model: its files as its manifest records them (store.Entry.verify)
        source.entry.verify(full=False)
    path = source.path
    if path.is_dir():
        model, config = load_hf(path, dtype=torch_dtype)
        tok = Tokenizer.load(tokenizer if tokenizer is not None else path)
    elif is_gguf_file(path):
        model, config, tok = load_gguf(path, dtype=torch_dtype, dequantize=dequantize)
        if tokenizer is not None:
            tok = Tokenizer.load(tokenizer)
    else:
        if not looks_like_llama2c(path):
            raise CheckpointError(f"{path} is not a model emergence recognises (a Hugging Face layout folder, a "
                                  "GGUF file, or a llama2.c .bin checkpoint with its tokenizer)")
        if tokenizer is None:
            raise InvalidArgument(f"{path} is a llama2.c checkpoint: pass its tokenizer .bin too (--tokenizer)")
        model, config = load_llama2c(path)
        tok = Tokenizer.from_llama2c(tokenizer)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    adapter = adapter if adapter is not None else source.adapter  # a store model made with an ADAPTER
    if adapter is not None:
        from .adapters.peft_format import load_adapter

        require_decoder_only(config, "an adapter")
        load_adapter(model, adapter)
    model = model.to(target)
    if target.type == "cpu":  # decoding streams every weight per token: from 2 MiB pages (allocator.py)
        huge_page_weights(model)
    return LanguageModel(model, tok, config, backend)
