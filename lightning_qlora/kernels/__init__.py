"""Fast paths behind ``LoRALinear``'s interface; the plain path stays the reference and the CPU default."""

from lightning_qlora.kernels.compile import compile_blocks
from lightning_qlora.kernels.fused_lora import fused_lora_linear, supports_fused

__all__ = ["compile_blocks", "fused_lora_linear", "supports_fused"]
