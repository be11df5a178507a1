"""Fast paths behind ``LoRALinear``'s interface; the plain path stays the reference and the CPU default."""

from lightning_qlora.kernels.fused_lora import fused_lora_linear, supports_fused

__all__ = ["fused_lora_linear", "supports_fused"]
