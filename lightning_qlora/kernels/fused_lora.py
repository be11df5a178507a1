"""One autograd node per LoRA linear: ``y = x W^T + bias + scaling * dropout(x) A^T B^T`` over a 4-bit or plain ``W``.

The plain path (``LoRALinear`` calling the base layer, dropout, two adapter linears, a scale and an add) records
about ten autograd nodes per layer, saves the dropped-out input as a second activation, and casts the fp32
adapters in separate nodes. This function does the same arithmetic in one node:

- forward: dequantize ``W`` (bitsandbytes) and use it at once; ``y = x W^T``, then ``y += scaling * (xd A^T) B^T``
  in one fused ``addmm``. Saved for backward: ``x``, the dropout mask (1 byte per element, instead of the dropped
  input in 2), the small ``xd A^T`` (tokens x r) and a reference to the packed 4-bit weight, never its dequantized
  copy.
- backward: dequantize again, ``dx = g W + mask * ((scaling * g B) A)``, ``dA = (scaling * g B)^T xd``,
  ``dB = scaling * g^T (xd A^T)``; adapter gradients come back in fp32 for the fp32 master weights.

Dropout draws its mask with the same kernel and random stream as ``nn.Dropout``, so with the same seed the fused
and plain paths compute the same function (``tests/test_fused_lora.py`` checks outputs and gradients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_qlora.quant.weight import dequantize_weight, is_quantized_linear


def base_weight(base_layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight in ``dtype``, dequantized for a 4-bit layer (a fresh tensor, used and dropped at once)."""
    return dequantize_weight(base_layer).to(dtype)


def supports_fused(base_layer: nn.Module, x: torch.Tensor) -> bool:
    """True for a bitsandbytes 4-bit linear fed its compute dtype, or a plain ``nn.Linear`` fed its weight's dtype
    (the plain path would cast the input otherwise, and the fused path computes in the input's dtype).
    """
    if is_quantized_linear(base_layer):
        return getattr(base_layer, "compute_dtype", None) == x.dtype
    return type(base_layer) is nn.Linear and base_layer.weight.dtype == x.dtype


class FusedLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        base_layer: nn.Linear,
        scaling: float,
        dropout_p: float,
    ) -> torch.Tensor:
        dtype = x.dtype
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        if dropout_p > 0:
            xd, mask = torch.ops.aten.native_dropout(x2, dropout_p, True)
        else:
            xd, mask = x2, None
        xa = xd @ a.t()  # tokens x r
        y = x2 @ base_weight(base_layer, dtype).t()
        y.addmm_(xa, b.t(), alpha=scaling)
        bias = base_layer.bias
        if bias is not None:
            y += bias.to(dtype)
        ctx.base_layer = base_layer
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.shape = shape
        ctx.save_for_backward(x2, mask, xa, lora_a, lora_b)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, mask, xa, lora_a, lora_b = ctx.saved_tensors
        dtype = x2.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        a = lora_a.to(dtype)
        b = lora_b.to(dtype)
        gb = (g @ b).mul_(ctx.scaling)  # tokens x r
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = gb @ a
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - ctx.dropout_p))
            grad_x.addmm_(g, base_weight(ctx.base_layer, dtype))
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[1]:
            xd = x2 if mask is None else torch.ops.aten.native_dropout_backward(x2, mask, 1.0 / (1.0 - ctx.dropout_p))
            grad_a = (gb.t() @ xd).to(lora_a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ xa).mul_(ctx.scaling).to(lora_b.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def fused_lora_linear(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base_layer: nn.Linear, scaling: float, dropout_p: float
) -> torch.Tensor:
    """``base_layer(x) + scaling * lora_b(lora_a(dropout(x)))`` as one autograd node (see the module docstring).

    ``x`` is used in its own dtype (the compute dtype); ``dropout_p`` is the probability to apply (0 in eval).
    """
    return FusedLoRALinear.apply(x, lora_a, lora_b, base_layer, scaling, dropout_p)
