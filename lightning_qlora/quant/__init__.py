"""What is frozen: the packed 4-bit weight, quantizing a model's linears, the base fingerprint, fidelity.

Plain torch; importing it never imports Lightning.
"""

from lightning_qlora.quant.quantize import LinearQuantizer, QuantizationReport, freeze, quantize_model
from lightning_qlora.quant.weight import (
    dequantize_weight,
    has_quantized_linears,
    is_quantized_linear,
    packed_bytes,
    quant_state_of,
    quantized_nbytes,
    stored_weight,
)

__all__ = [
    "LinearQuantizer",
    "QuantizationReport",
    "dequantize_weight",
    "freeze",
    "has_quantized_linears",
    "is_quantized_linear",
    "packed_bytes",
    "quant_state_of",
    "quantize_model",
    "quantized_nbytes",
    "stored_weight",
]
