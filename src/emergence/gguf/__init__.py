"""GGUF, llama.cpp's model file format: the container (`format`), ggml's block quantization
formats (`quants`), both our own code, bit-exact with llama.cpp's `gguf` package, and
llama.cpp's vocabularies in GGUF metadata <-> emergence tokenizers (`vocab`).

    f = read_gguf("model.gguf")
    f.metadata["general.architecture"], f.tensors["token_embd.weight"].torch_shape
    w = f.tensor("token_embd.weight")           # float32, dequantized
    write_gguf("out.gguf", f.fields, [(t.name, t.type, t.torch_shape, f.raw(t.name)) for t in f.tensors.values()])
"""

from .format import GGUFFile, GGUFValue, GGUFValueType, TensorInfo, read_gguf, write_gguf
from .quants import BLOCK_SIZES, DEQUANTIZE, QUANTIZE, GGMLType, dequantize, quantize

__all__ = [
    "GGUFFile", "GGUFValue", "GGUFValueType", "TensorInfo", "read_gguf", "write_gguf",
    "GGMLType", "BLOCK_SIZES", "DEQUANTIZE", "QUANTIZE", "dequantize", "quantize",
]
