"""The process's memory: freed heap pages handed back to the OS during checkpointed training,
and a loaded model's weights on transparent huge pages.

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

`huge_page_weights` moves a model's large CPU weights into one anonymous mapping advised for
transparent huge pages (2 MiB, where the kernel's THP mode is "madvise" or "always"). Decoding
reads every weight once per token, and with 4 KiB pages half a gigabyte of fp32 weights spans
131,072 pages, far past what the TLB holds, so the stream of weights also walks page tables;
2 MiB pages cut that 512-fold (`emergence.load` and bench/bench_quant.py's models decode from
them). Tensors mapped from a file (a GGUF file's packed blocks) stay where they are: copying
them would turn shared page cache into private memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

# Checkpointed blocks between two releases: fewer releases fault fewer pages in again, more keep
# the peak closer to what is live
RELEASE_EVERY_BLOCKS = 5


@functools.cache
def _libc():
    """The C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none."""
    return getattr(_libc(), "malloc_trim", None)


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


HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and most ARM64 kernels
MADV_HUGEPAGE = 14  # <sys/mman.h>
PAGE = 4096


def huge_pages_enabled() -> bool:
    """Whether the kernel can back an advised mapping with transparent huge pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:  # not Linux, or no THP
        return False


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process mapped from files (/proc/self/maps: an inode)."""
    ranges = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[4] != "0":
                start, end = fields[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def huge_page_weights(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move the model's contiguous CPU parameters and buffers of at least `min_bytes` into one
    mapping advised for transparent huge pages (their tensors keep their identity: `.data` is
    swapped); returns the bytes moved (0 where THP is off, on another OS, or nothing is left to
    move: a tensor already in one of the model's earlier mappings stays, one made since, by a
    dtype change, moves). Each tensor is copied, then its old memory freed, so the peak is the
    model plus its largest tensor."""
    import torch

    if sys.platform != "linux" or not huge_pages_enabled() or _libc() is None:
        return 0
    done = model.__dict__.setdefault("_huge_page_ranges", [])  # (start, end) of its earlier mappings
    stay = _file_mappings() + done

    def movable(t: torch.Tensor) -> bool:
        if t.device.type != "cpu" or not t.is_contiguous() or t.nbytes < min_bytes or t.is_quantized:
            return False
        address = t.untyped_storage().data_ptr()
        return not any(start <= address < end for start, end in stay)

    tensors, seen = [], set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and movable(t):
            seen.add(id(t))
            tensors.append(t)
    if not tensors:
        return 0
    rounded = [-(-t.nbytes // PAGE) * PAGE for t in tensors]  # page-aligned slots: any dtype's alignment
    arena = mmap.mmap(-1, sum(rounded) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = torch.frombuffer(arena, dtype=torch.uint8)
    start = memory.data_ptr()
    offset = -start % HUGE_PAGE  # the first slot on a huge page boundary
    _libc().madvise(ctypes.c_void_p(start + offset), ctypes.c_size_t(sum(rounded)), MADV_HUGEPAGE)
    with torch.no_grad():
        for t, size in zip(tensors, rounded):
            slot = memory[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
            slot.copy_(t)
            t.data = slot
            offset += size
    # the tensors' storages hold the mapping (torch.frombuffer keeps a reference until the last view
    # goes: after .to("cuda") or a dtype change it is unmapped); the model keeps only its range
    done.append((start, start + len(arena)))
    return sum(t.nbytes for t in tensors)
