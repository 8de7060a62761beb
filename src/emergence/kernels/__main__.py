"""`python -m emergence.kernels`: build the native decode kernels now (the Makefile's install step)."""

from . import gemv_extension

print("emergence native decode kernels:", "ready" if gemv_extension() is not None else "unavailable (torch ops are used)")
