"""What the hardware computes natively: the compute dtype worth choosing where the user left it to us. Plain torch.

A CPU without AVX512-BF16 or AMX has no bf16 matrix instructions: torch then multiplies bf16 matrices in a generic
loop, 10-50x slower than fp32 (a [256, 49152] x [49152, 576] product: 34 s in bf16, 0.65 s in fp32 on a 2-core AVX2
EPYC; benchmarks/NOTES.md). The 4-bit weights are the same either way; only activations and the dequantized
weights change width.
"""

from __future__ import annotations

import torch

from lightning_qlora.config import ComputeDtype


def has_native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``"cpu"`` or ``"cuda"``) multiplies bf16 matrices in hardware."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def preferred_compute_dtype(device_type: str) -> tuple[ComputeDtype, str]:
    """The compute dtype for ``device_type`` and the reason, for a one-line log: bf16 where it is native (Ampere+
    GPUs, CPUs with AVX512-BF16 or AMX), else fp16 on an older GPU and fp32 on the CPU.
    """
    if has_native_bf16(device_type):
        return "bf16", f"bf16: native on this {device_type.upper()}"
    if device_type == "cuda":
        return "fp16", "fp16: this GPU has no native bf16"
    capability = torch.backends.cpu.get_cpu_capability()
    return "fp32", (f"fp32: this CPU ({capability}) has no bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 "
                    "matmuls run 10-50x slower than fp32")
