"""How much 4-bit formats lose on real weights: reconstruction error and measured bits per parameter.

Formats: bitsandbytes NF4 (with and without double quantization) and FP4, and, as references without a
bitsandbytes kernel, uniform blockwise-absmax INT4 and INT8 (symmetric, same blocksize, one fp32 absmax per block),
implemented here. Plain torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_qlora._imports import import_bitsandbytes
from lightning_qlora.modules import iter_linears, matches_any
from lightning_qlora.quant.weight import pack_4bit, state_nbytes

FORMATS: tuple[str, ...] = ("nf4", "nf4-dq", "fp4", "int4", "int8")


@dataclass
class Quantized:
    """A weight after a round trip through a format, and what storing it costs."""

    dequantized: torch.Tensor
    stored_bytes: int


def round_trip(weight: torch.Tensor, fmt: str, blocksize: int = 64) -> Quantized:
    """Quantize ``weight`` in ``fmt`` and dequantize it back; ``stored_bytes`` counts what the format keeps.

    Raises:
        ValueError: for an unknown format (the message lists :data:`FORMATS`).
    """
    if fmt in ("nf4", "nf4-dq", "fp4"):
        return _bitsandbytes_4bit(weight, "fp4" if fmt == "fp4" else "nf4", fmt == "nf4-dq", blocksize)
    if fmt == "int4":
        return _uniform_blockwise(weight, bits=4, blocksize=blocksize)
    if fmt == "int8":
        return _uniform_blockwise(weight, bits=8, blocksize=blocksize)
    raise ValueError(f"format={fmt!r} is not one of {list(FORMATS)}.")


def reconstruction_errors(weight: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """``mean_abs``: mean |W - Ŵ|; ``relative``: ||W - Ŵ||_F / ||W||_F."""
    w, a = weight.float(), approx.float()
    diff = w - a
    return {"mean_abs": float(diff.abs().mean()), "relative": float(diff.norm() / w.norm().clamp_min(1e-12))}


def fake_quantize_linears(model: nn.Module, fmt: str, blocksize: int = 64, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every linear weight (but ``skip``) by its round trip through ``fmt``; returns the layers changed.

    Used for formats without a 4-bit kernel (INT4/INT8): the model computes with the dequantized values, which is
    what a kernel for that format would compute.
    """
    changed = 0
    for name, module in iter_linears(model):
        if not matches_any(name, skip):
            with torch.no_grad():
                module.weight.copy_(round_trip(module.weight.data, fmt, blocksize).dequantized.to(module.weight.dtype))
            changed += 1
    return changed


def _bitsandbytes_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool, blocksize: int) -> Quantized:
    bnb = import_bitsandbytes()
    packed, state = pack_4bit(weight, quant_type, blocksize, double_quant)
    stored = packed.numel() * packed.element_size() + state_nbytes(state)
    return Quantized(bnb.functional.dequantize_4bit(packed, state).to(weight.dtype), stored)


def _uniform_blockwise(weight: torch.Tensor, bits: int, blocksize: int) -> Quantized:
    levels = 2 ** (bits - 1) - 1  # symmetric: -7..7 for INT4, -127..127 for INT8
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    codes = torch.round(blocks / absmax * levels).clamp(-levels, levels).to(torch.int8)
    stored_codes = _pack(codes, bits)
    dequantized = (codes.float() / levels * absmax).reshape(-1)[: flat.numel()].view_as(weight)
    stored = stored_codes.numel() * stored_codes.element_size() + absmax.numel() * 4  # fp32 absmax per block
    return Quantized(dequantized.to(weight.dtype), stored)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes as they would be stored: one byte each for 8 bits, two per byte for 4 bits."""
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.to(torch.int8)
    unsigned = (flat + 8).to(torch.uint8)  # -7..7 -> 1..15
    if unsigned.numel() % 2:
        unsigned = torch.cat([unsigned, unsigned.new_zeros(1)])
    return unsigned[0::2] << 4 | unsigned[1::2]


def bits_per_parameter(stored_bytes: int, num_params: int) -> float:
    """Bits per weight of ``stored_bytes`` holding ``num_params`` weights (NaN for none)."""
    return 8 * stored_bytes / num_params if num_params else math.nan


__all__ = ["FORMATS", "Quantized", "bits_per_parameter", "fake_quantize_linears", "reconstruction_errors", "round_trip"]
