"""4-bit dequantization that ``torch.compile`` does not merge across forward and backward.

The fused LoRA linear (:mod:`lightning_qlora.kernels.fused_lora`) dequantizes its weight in forward and again in
backward, so that only the 4-bit weight is kept in between. Under ``torch.compile``, AOT autograd traces forward and
backward into one joint graph and eliminates common subexpressions: the two identical dequantize calls became one,
whose bf16 output inductor's partitioner then saved for backward. Seen on a 7B model without checkpointing on the
H200: peak allocated 17.49 GiB eager, 24.92 GiB compiled. Here the backward's call starts from a copy of the
(small) scale constants, so the two calls have different inputs, nothing merges them, and the compiled backward
dequantizes again, as the eager one does. The ops are bitsandbytes' own, called as torch ops (the graph holds them
directly): the values are bit-identical to :func:`lightning_qlora.quantize.dequantize_weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_qlora.quantize import quant_state_of, restore_training_layout


def dequantize_unmerged(module: nn.Module) -> Tensor:
    """The dequantized weight of a bitsandbytes 4-bit linear, computed from a copy of its scale constants (a
    different input than any other dequantize call of the same weight in a compiled graph)."""
    restore_training_layout(module)
    state = quant_state_of(module)
    if state.nested:  # double quant: the 8-bit constants (1 byte per block) are what gets copied
        nested = state.state2
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax.clone(), nested.absmax, nested.code, nested.blocksize, torch.float32
        )
        absmax = absmax + state.offset
    else:
        absmax = state.absmax.float().clone()
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        module.weight, absmax, state.blocksize, state.quant_type, list(state.shape), state.dtype
    )
