"""Adapters on a frozen base: LoRA and DoRA (lora.py) in PEFT's file format (peft_format.py)."""

from .lora import (LoraLinear, LoraSpec, add_adapter, adapter_names, mark_only_adapters_trainable, merge,
                   merge_and_unload, per_row, set_active, unmerge)
from .peft_format import load_adapter, read_adapter, save_adapter

__all__ = ["LoraLinear", "LoraSpec", "add_adapter", "adapter_names", "load_adapter", "mark_only_adapters_trainable",
           "merge", "merge_and_unload", "per_row", "read_adapter", "save_adapter", "set_active", "unmerge"]
