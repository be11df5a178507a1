"""``LoRALinear``: a LoRA (or DoRA) adapter around one frozen (4-bit or plain) linear layer.

It keeps PEFT's names (``base_layer``, ``lora_A``, ``lora_B``, ``scaling``, ``r``, ``lora_alpha``) so that state-dict
keys map one-to-one onto PEFT's adapter files. Plain torch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_qlora.kernels.fused_lora import fused_lora_linear, supports_fused
from lightning_qlora.quant.weight import (
    dequantize_weight,
    is_quantized_linear,
    quant_state_of,
    restore_training_layout,
    set_quantized_weight,
)

# Adapters are stored and updated in fp32: their optimizer updates are tiny relative to their values and would round
# away in bf16. They are cast to the activations' dtype only for the matmul.
ADAPTER_DTYPE = torch.float32


class LoRALinear(nn.Module):
    """``y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``.

    ``lora_A`` is Kaiming-uniform initialised and ``lora_B`` zero, so a fresh adapter leaves the output unchanged.

    Args:
        base_layer: the frozen linear (``nn.Linear`` or a bitsandbytes 4-bit linear).
        r: rank.
        lora_alpha: scaling numerator.
        dropout: dropout probability on the adapter input.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: DoRA: ``lora_magnitude_vector`` (initialized to the row norms of the base weight) rescales the
            direction ``W + scaling * B @ A``; the norm is treated as a constant in backward, as in the paper and PEFT.

    Example:
        >>> layer = LoRALinear(nn.Linear(16, 8), r=4, lora_alpha=8)
        >>> layer(torch.randn(2, 16)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        lora_alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer: nn.Linear = base_layer
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        device = _adapter_device(base_layer)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=ADAPTER_DTYPE)
        self.merged = False
        self.use_dora = use_dora
        self.reset_lora_parameters()
        if use_dora:
            norms = torch.linalg.norm(dequantize_weight(base_layer).float(), dim=1).to(device)
            self.lora_magnitude_vector = nn.Parameter(norms.to(ADAPTER_DTYPE))

    def reset_lora_parameters(self) -> None:
        # Same init as PEFT's default: Kaiming-uniform A, zero B, so training starts from the base model exactly.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `.weight.dtype`/`.weight.device` of some projections; forward it to the base.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # The fused path (one autograd node, lightning_qlora.kernels.fused_lora): None = on CUDA only (the plain path
    # stays the CPU default and the reference). Set True/False on the class or an instance to force either.
    fused: bool | None = None

    def _use_fused(self, x: torch.Tensor) -> bool:
        if self.use_dora or self.merged or not torch.is_grad_enabled():
            return False  # inference keeps bitsandbytes' own path (its 1-token gemv kernel for generation)
        enabled = self.fused if self.fused is not None else x.is_cuda
        return bool(enabled) and supports_fused(self.base_layer, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_fused(x):
            p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return fused_lora_linear(x, self.lora_A.weight, self.lora_B.weight, self.base_layer, self.scaling, p)
        result = self.base_layer(x)
        if self.merged:
            return result
        # Adapters keep fp32 master weights but multiply in the activations' half precision: casting the small
        # A and B is cheap, casting every activation to fp32 (and saving it for backward) is not.
        compute = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else self.lora_A.weight.dtype
        adapter_in = self.lora_dropout(x).to(compute)
        lora_out = nn.functional.linear(
            nn.functional.linear(adapter_in, self.lora_A.weight.to(compute)), self.lora_B.weight.to(compute)
        )
        if not self.use_dora:
            return result + (lora_out * self.scaling).to(result.dtype)
        weight = dequantize_weight(self.base_layer).to(adapter_in.dtype)
        # The norm of the adapted weight is a constant in backward (DoRA paper, section 4.3).
        with torch.no_grad():
            norm = torch.linalg.norm(weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight), dim=1)
        scale = (self.lora_magnitude_vector / norm).view(*([1] * (result.dim() - 1)), -1)
        if isinstance(self.lora_dropout, nn.Identity):
            base_out = result.to(adapter_in.dtype)
            if self.base_layer.bias is not None:
                base_out = base_out - self.base_layer.bias.to(adapter_in.dtype)
        else:
            base_out = nn.functional.linear(adapter_in, weight)
        update = (scale - 1) * base_out + scale * lora_out * self.scaling
        return result + update.to(result.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the dequantized base, fp32) with this adapter folded in: ``W + dW``, or DoRA's rescaling."""
        adapted = weight + self.delta_weight().to(weight.device)
        if not self.use_dora:
            return adapted
        norm = torch.linalg.norm(adapted, dim=1, keepdim=True)
        return adapted * (self.lora_magnitude_vector.detach().float().to(weight.device)[:, None] / norm)

    def merge(self) -> None:
        """Fold ``scaling * B @ A`` into the base weight; :meth:`unmerge` restores the base bit for bit.

        A 4-bit base is dequantized, updated and re-quantized with its own settings, which rounds: the merged layer
        then differs slightly from base + adapter (measure it with :func:`merge_drift`).
        """
        if self.merged:
            return
        base = self.base_layer
        if is_quantized_linear(base):
            restore_training_layout(base)
            packed: Any = base.weight  # a bitsandbytes Params4bit
            self._unmerged_weight: Any = (packed, base.quant_state)
            merged = self.merged_weight(dequantize_weight(base).float())
            set_quantized_weight(
                base, merged, packed.quant_type, packed.blocksize, packed.compress_statistics, packed.dtype,
                dequantize_to=quant_state_of(base).dtype,
            )
        else:
            self._unmerged_weight = base.weight.data.clone()
            base.weight.data.copy_(self.merged_weight(base.weight.data.float()))
        self.merged = True

    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge`."""
        if not self.merged:
            return
        base = self.base_layer
        if is_quantized_linear(base):
            base.weight, base.quant_state = self._unmerged_weight
        else:
            base.weight.data.copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False

    def initialize_adapter(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
        """Start from ``lora_A = lora_a`` and ``lora_B = lora_b`` instead of the default init (e.g. the
        error-correcting factors of :mod:`lightning_qlora.calibration.cloq`). DoRA's magnitude is reset to the row
        norms of the adapted weight, so the layer computes ``W + scaling * B @ A`` either way.
        """
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_a)
            self.lora_B.weight.copy_(lora_b)
            if self.use_dora:
                adapted = dequantize_weight(self.base_layer).float() + self.delta_weight()
                self.lora_magnitude_vector.copy_(torch.linalg.norm(adapted, dim=1))

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` with shape ``(out_features, in_features)``, in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function from the dequantized weight with the adapter folded in, in fp32 (eval, no dropout):
        the reference for tests and parity checks of faster paths.
        """
        weight = self.merged_weight(dequantize_weight(self.base_layer).float())
        bias = None if self.base_layer.bias is None else self.base_layer.bias.float()
        return nn.functional.linear(x.float(), weight, bias)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}{', dora' if self.use_dora else ''}"


def _adapter_device(base_layer: nn.Linear) -> torch.device:
    device = base_layer.weight.device
    return torch.device("cpu") if device.type == "meta" else device
