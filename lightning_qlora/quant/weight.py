"""The packed 4-bit weight, in one home: pack, dequantize, its quant state, the bytes it stores, its layer class.

A 4-bit linear is bitsandbytes' ``Linear4bit`` holding a ``Params4bit``: two 4-bit codes per byte plus a
``QuantState`` (per-block absmax, optionally itself 8-bit quantized with nested statistics, and the code book).
Everything that reads or writes those bytes goes through this module. Plain torch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lightning_qlora._imports import import_bitsandbytes
from lightning_qlora.config import QuantConfig
from lightning_qlora.errors import QLoRAError
from lightning_qlora.modules import iter_linears


class QuantFormatMismatchError(QLoRAError, ValueError):
    """Packed 4-bit bytes are in another format than the QuantConfig asks for."""


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (ours or one built by transformers/PEFT)."""
    return any(cls.__name__ == "Linear4bit" for cls in type(module).__mro__)


def has_quantized_linears(model: nn.Module) -> bool:
    """True once the model holds 4-bit weights (put there by us, transformers or PEFT)."""
    return any(is_quantized_linear(m) for _, m in iter_linears(model))


def quant_state_of(module: nn.Module) -> Any:
    """The bitsandbytes ``QuantState`` of a 4-bit linear (``None`` for other layers).

    It normally rides on the weight (``Params4bit``); FSDP replaces the weight by a plain (sharded or gathered)
    tensor, so the copy kept on the module is the fallback.
    """
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def is_packed(tensor: torch.Tensor) -> bool:
    """True for packed 4-bit bytes (a ``Params4bit``), whatever dtype they are stored as: never cast them."""
    return getattr(tensor, "quant_state", None) is not None


def state_nbytes(quant_state: Any) -> int:
    """Bytes of a ``QuantState``'s tensors: absmax, nested absmax and code books."""
    return sum(
        value.numel() * value.element_size()
        for value in quant_state.as_dict(packed=True).values()
        if isinstance(value, torch.Tensor)
    )


def quantized_nbytes(module: nn.Linear) -> int:
    """Bytes a 4-bit linear actually stores: packed weight, absmax, nested statistics, code books and bias."""
    weight = module.weight
    total = weight.numel() * weight.element_size()
    state = quant_state_of(module)
    if state is not None:
        total += state_nbytes(state)
    if module.bias is not None:
        total += module.bias.numel() * module.bias.element_size()
    return total


def pack_4bit(
    weight: torch.Tensor,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    quant_storage: torch.dtype = torch.uint8,
    dequantize_to: torch.dtype | None = None,
) -> tuple[torch.Tensor, Any]:
    """``(packed bytes, QuantState)`` of ``weight`` by bitsandbytes' own ``quantize_4bit``.

    ``dequantize_to`` is the dtype the state dequantizes into (default: ``weight``'s). The compute dtype, so that a
    weight quantized from fp32 is not unpacked to fp32 and cast down before every matmul: the values are identical,
    since the kernel rounds its fp32 product to the output dtype either way.
    """
    bnb = import_bitsandbytes()
    packed, quant_state = bnb.functional.quantize_4bit(
        weight.contiguous(),
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
    )
    if dequantize_to is not None:
        quant_state.dtype = dequantize_to
    return packed, quant_state


def set_quantized_weight(
    layer: nn.Module,
    weight: torch.Tensor,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    quant_storage: torch.dtype = torch.uint8,
    dequantize_to: torch.dtype | None = None,
) -> None:
    """Quantize ``weight`` (``out_features x in_features``, any float dtype) into ``layer``'s 4-bit storage.

    ``quant_storage`` is only the tensor dtype the packed bytes are viewed as (FSDP needs it to match the dtype it
    shards and casts the block's parameters in); the bytes are the same.
    """
    bnb = import_bitsandbytes()
    packed, quant_state = pack_4bit(weight, quant_type, blocksize, double_quant, quant_storage, dequantize_to)
    layer.weight = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=quant_state,
        blocksize=blocksize,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=layer,
        bnb_quantized=True,
    )
    layer.quant_state = quant_state


def quantized_linear(linear: nn.Linear, weight: torch.Tensor, config: QuantConfig, device: torch.device) -> nn.Linear:
    """A new 4-bit layer on ``device`` computing ``linear`` with ``weight`` packed by ``config`` (``linear``'s own
    weight is not read: ``weight`` may be calibrated codes, or the values a checkpoint holds).
    """
    layer = _empty_4bit_layer(linear, config, config.double_quant, config.quant_type, config.torch_quant_storage)
    set_quantized_weight(
        layer, weight, config.quant_type, config.blocksize, config.double_quant, config.torch_quant_storage,
        dequantize_to=config.torch_compute_dtype,
    )
    _copy_bias(linear, layer, config, device)
    return layer


def prequantized_linear(
    linear: nn.Linear, packed: torch.Tensor, state: dict[str, torch.Tensor], config: QuantConfig, device: torch.device
) -> nn.Linear:
    """A 4-bit layer on ``device`` holding bytes quantized elsewhere: ``packed`` and the quant-state tensors
    bitsandbytes saves beside them (``absmax``, ``quant_map``, ``nested_*``, ``quant_state.bitsandbytes__nf4``), as
    in transformers' 4-bit checkpoints. Nothing is re-quantized: the bytes stay the same.

    Raises:
        QuantFormatMismatchError: when the stored format differs from ``config`` (type, blocksize, double quant).
    """
    bnb = import_bitsandbytes()
    quant_state = bnb.functional.QuantState.from_dict(dict(state), device=device)
    found = (quant_state.quant_type, quant_state.blocksize, bool(quant_state.nested))
    wanted = (config.quant_type, config.blocksize, config.double_quant)
    if found != wanted:
        raise QuantFormatMismatchError(
            f"the checkpoint stores this layer as {found[0]}, blocksize {found[1]}, double quant {found[2]}, but "
            f"QuantConfig asks for {wanted[0]}, blocksize {wanted[1]}, double quant {wanted[2]}. Use "
            f"QuantConfig(quant_type={found[0]!r}, blocksize={found[1]}, double_quant={found[2]}) for this "
            "checkpoint, or the full-precision checkpoint to quantize it your way."
        )
    quant_state.dtype = config.torch_compute_dtype
    storage = packed.dtype
    layer = _empty_4bit_layer(linear, config, bool(quant_state.nested), quant_state.quant_type, storage)
    layer.weight = bnb.nn.Params4bit(
        packed.to(device), requires_grad=False, quant_state=quant_state, blocksize=quant_state.blocksize,
        compress_statistics=bool(quant_state.nested), quant_type=quant_state.quant_type, quant_storage=storage,
        module=layer, bnb_quantized=True,
    )
    layer.quant_state = quant_state
    _copy_bias(linear, layer, config, device)
    return layer


def _empty_4bit_layer(
    linear: nn.Linear, config: QuantConfig, double_quant: bool, quant_type: str, storage: torch.dtype
) -> Any:
    return linear4bit_class()(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=config.torch_compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=storage,
        device="meta",
    )


def _copy_bias(linear: nn.Linear, layer: nn.Linear, config: QuantConfig, device: torch.device) -> None:
    if linear.bias is not None:
        meta = linear.bias.is_meta
        bias = torch.zeros(linear.out_features, device=device) if meta else linear.bias.detach().to(device)
        layer.bias = nn.Parameter(bias.to(config.torch_compute_dtype), requires_grad=False)


def dequantize_weight(module: nn.Linear) -> torch.Tensor:
    """The full-precision weight of a linear (dequantized for a 4-bit one), shape ``(out_features, in_features)``."""
    if not is_quantized_linear(module):
        return module.weight.detach()
    # A 4-bit layer means bitsandbytes is imported already; a plain import (not the cached import_bitsandbytes) also
    # keeps torch.compile from warning about tracing through a functools cache on every compiled block.
    import bitsandbytes.functional

    restore_training_layout(module)
    return bitsandbytes.functional.dequantize_4bit(module.weight.data, quant_state_of(module))


def stored_weight(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """``weight`` as the layer built from it with ``config`` computes with, in fp32: packed and unpacked by the very
    same bitsandbytes calls (bit-identical to :func:`dequantize_weight` of that layer).
    """
    if not config.quantized:
        return weight.detach().to(config.torch_compute_dtype).float()
    bnb = import_bitsandbytes()
    packed, quant_state = pack_4bit(
        weight.detach(), config.quant_type, config.blocksize, config.double_quant, config.torch_quant_storage,
        config.torch_compute_dtype,
    )
    return bnb.functional.dequantize_4bit(packed, quant_state).float()


def packed_bytes(module: nn.Linear) -> torch.Tensor:
    """The packed 4-bit storage of a quantized linear, in its canonical (training) layout."""
    restore_training_layout(module)
    return module.weight.data


def restore_training_layout(module: nn.Linear) -> None:
    """Undo bitsandbytes' in-place CPU inference repacking of a 4-bit layer, if it happened."""
    # bitsandbytes repacks CPU weights in place for fast eval-mode inference; that layout has no autograd path
    # and different bytes, so undo it before training, dequantizing or comparing bytes.
    weight: Any = module.weight  # a bitsandbytes Params4bit
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        module.quant_state = weight.quant_state


@functools.cache
def linear4bit_class() -> type[Any]:
    """Our subclass of bitsandbytes' ``Linear4bit`` (built on first use: bitsandbytes is imported lazily)."""
    bnb = import_bitsandbytes()

    class QLoRALinear4bit(bnb.nn.Linear4bit):  # type: ignore[name-defined]
        """bitsandbytes' ``Linear4bit`` that always keeps the trainable (autograd-capable) weight layout.

        bitsandbytes switches a CPU layer in eval mode to a packed layout served by ``gemv_4bit``, which has no
        backward: a ``generate()`` before training then silently zeroes every gradient that flows through the base.
        This subclass never takes that path, so eval, generation and training all use ``matmul_4bit``.
        """

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            restore_training_layout(self)
            input_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            out = bnb.matmul_4bit(x, self.weight.t(), bias=bias, quant_state=quant_state_of(self))
            return out.to(input_dtype)

    return QLoRALinear4bit
