"""4-bit dequantization as an op that ``torch.compile`` does not merge across forward and backward.

The fused LoRA linear (:mod:`lightning_qlora.kernels.fused_lora`) dequantizes its weight in forward and again in
backward, so that only the 4-bit weight is kept in between. Under ``torch.compile``, AOT autograd traces forward and
backward into one joint graph and eliminates common subexpressions: the two identical dequantize calls became one,
whose bf16 output inductor's partitioner then saved for backward. Seen on a 7B model without checkpointing on the
H200: peak allocated 17.49 GiB eager, 24.92 GiB compiled. The op here takes a ``call_site`` number it does not use
(0 in forward, 1 in backward): the calls differ, nothing merges them, and the compiled backward dequantizes again, as
the eager one does. It calls bitsandbytes' own functions: the values are bit-identical to
:func:`lightning_qlora.quantize.dequantize_weight`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_qlora._bnb import import_bitsandbytes
from lightning_qlora.quantize import quant_state_of, restore_training_layout


@torch.library.custom_op("lightning_qlora::dequantize_4bit", mutates_args=())
def dequantize_4bit_unmerged(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: Tensor | None,
    nested_blocksize: int,
    blocksize: int,
    quant_type: str,
    shape: list[int],
    dtype: torch.dtype,
    call_site: int,
) -> Tensor:
    """bitsandbytes' ``dequantize_4bit`` of one weight, from its quant state's tensors (nested: double quant);
    ``call_site`` only keeps calls from different places apart."""
    if nested_absmax is not None:
        bnb = import_bitsandbytes()
        absmax = bnb.functional.dequantize_blockwise(
            absmax, absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize
        )
        absmax += offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax.float(), blocksize, quant_type, shape, dtype)


@dequantize_4bit_unmerged.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, nested_blocksize, blocksize, quant_type, shape, dtype,
      call_site):
    return packed.new_empty(shape, dtype=dtype)


def dequantize_unmerged(module: nn.Module, call_site: int) -> Tensor:
    """The dequantized weight of a bitsandbytes 4-bit linear, through :func:`dequantize_4bit_unmerged`."""
    restore_training_layout(module)
    state = quant_state_of(module)
    nested = state.state2 if state.nested else None
    return dequantize_4bit_unmerged(
        module.weight,
        state.absmax,
        nested.absmax if nested is not None else None,
        nested.code if nested is not None else None,
        state.offset if nested is not None else None,
        nested.blocksize if nested is not None else 0,
        state.blocksize,
        state.quant_type,
        list(state.shape),
        state.dtype,
        call_site,
    )
