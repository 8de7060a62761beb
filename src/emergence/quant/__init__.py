"""Post-training weight quantization, applied by swapping modules.

    import emergence
    from emergence.quant import quantize_model, save_quantized

    lm = emergence.load()
    quantize_model(lm.model, "int4", group_size=32, skip=("lm_head", "down_proj"))
    save_quantized(lm.model, lm.tokenizer, "out/")       # emergence.load("out/") rebuilds it

Formats (storage layouts in `linear.py`, quantizers in `methods.py`): int8, int4 (RTN or
GPTQ: "int4-gptq" with calibration token ids), nf4 (QLoRA), ternary (BitNet b1.58, optional
8-bit activations), and ggml's block formats (q8_0, q4_0, q4_1, q5_0, q5_1 and the K-quants
q4_k, q5_k, q6_k, byte for byte as llama.cpp quantizes them). Checkpoints record the format of
each module in their own metadata (`checkpoint.py`).
"""

from .checkpoint import load_quantized, quantization_record, save_quantized
from .linear import (
    FORMATS,
    GGML_FORMATS,
    GGMLLinear,
    Int4Linear,
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    TernaryLinear,
    linear_weight_bytes,
    make_module,
    model_bytes,
    quantizable_formats,
    quantize_model,
    quantized_modules,
)

__all__ = [
    "quantize_model", "save_quantized", "load_quantized", "quantization_record", "quantizable_formats",
    "quantized_modules", "model_bytes", "linear_weight_bytes", "make_module", "FORMATS", "GGML_FORMATS", "QuantizedLinear",
    "Int8Linear", "Int4Linear", "NF4Linear", "TernaryLinear", "GGMLLinear",
]
