"""Handing freed memory back to the operating system during checkpointed training.

glibc's malloc serves an allocation of under its mmap threshold from its heap, and raises that
threshold, up to 32 MiB, each time a larger block is freed: after the first step of training,
every activation is heap memory, and what is freed stays in the process. A step with activation
checkpointing frees each block's activations as soon as it has the block's output, but the
freed blocks fragment the heap and the next ones do not fit them, so the heap grows to several
times what is in use (checkpointed QLoRA on the smollm2-135m shapes: a peak of 0.58x plain
LoRA's without releasing, 0.35x with it; bench/bench_finetune.py, README "Fine-tuning").
`release_freed_memory` (glibc's malloc_trim) returns the heap's free pages, so the process keeps
what is live; the pages are faulted in again when reused, which costs time. Elsewhere (another
C library, another OS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Checkpointed blocks between two releases: fewer releases fault fewer pages in again, more keep
# the peak closer to what is live
RELEASE_EVERY_BLOCKS = 5


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS; whether the C library could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def release_in_backward(grad: torch.Tensor) -> None:
    """A tensor hook (Tensor.register_hook): releases freed memory when the gradient reaches the
    tensor, leaving the gradient as it is."""
    release_freed_memory()
