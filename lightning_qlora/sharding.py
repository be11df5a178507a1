"""Shard a converted QLoRA model with FSDP2 (``torch.distributed.fsdp.fully_shard``), and read/write its adapters.

Plain torch. FSDP all-gathers each unit's parameters as one dtype (the mixed
precision ``param_dtype``) and casts every parameter stored in another dtype. A packed 4-bit weight is bytes, not
numbers: cast from uint8 to bf16 it silently becomes garbage. So the packed weights must be *stored* in the
parameter dtype (``QuantConfig(quant_storage=...)``, bitsandbytes' ``quant_storage``); :func:`shard_model` checks
that and refuses otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import nn

from lightning_qlora.errors import QLoRAError
from lightning_qlora.modules import find_blocks, iter_linears
from lightning_qlora.quant.weight import is_quantized_linear

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class QuantStorageMismatchError(QLoRAError, ValueError):
    """Packed 4-bit weights are stored in a dtype FSDP would cast (which destroys them)."""


def check_quant_storage(model: nn.Module, param_dtype: torch.dtype) -> None:
    """Refuse packed 4-bit weights whose storage dtype differs from ``param_dtype`` (FSDP would cast the bytes).

    Raises:
        QuantStorageMismatchError: naming the layers, their storage dtype and the fix.
    """
    wrong = [
        (name, module.weight.dtype)
        for name, module in iter_linears(model)
        if is_quantized_linear(module) and module.weight.dtype != param_dtype
    ]
    if wrong:
        examples = ", ".join(f"{name} ({dtype})" for name, dtype in wrong[:3])
        raise QuantStorageMismatchError(
            f"{len(wrong)} 4-bit layer(s) store their packed weights as a dtype other than FSDP's parameter dtype "
            f"{param_dtype}: {examples}. FSDP would cast those bytes as if they were numbers and silently destroy "
            f"the weights, so this is refused. Quantize with QuantConfig(quant_storage='auto') (the compute dtype "
            "under FSDP) or set quant_storage to the compute dtype (bitsandbytes: bnb_4bit_quant_storage)."
        )


def shard_unit(
    module: nn.Module,
    mesh: Any,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> None:
    """``fully_shard`` one module over ``mesh``: parameters gathered in ``param_dtype`` (the compute dtype: fp32
    adapter masters are cast down for the forward), adapter gradients reduced in ``reduce_dtype``.

    Raises:
        QuantStorageMismatchError: see :func:`check_quant_storage`.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_quant_storage(module, param_dtype)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def shard_model(
    root: nn.Module,
    mesh: Any,
    param_dtype: torch.dtype,
    units: list[tuple[str, nn.Module]] | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
) -> list[str]:
    """:func:`shard_unit` each unit (default: the transformer blocks, :func:`~lightning_qlora.modules.find_blocks`)
    not sharded yet, then ``root``; returns the names
    of the units it sharded. Calling it on an already sharded model does nothing.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(root, FSDPModule):
        return []
    check_quant_storage(root, param_dtype)
    units = find_blocks(root) if units is None else units
    done = []
    for name, unit in units:
        if not isinstance(unit, FSDPModule):
            shard_unit(unit, mesh, param_dtype, reduce_dtype, reshard_after_forward)
            done.append(name)
    shard_unit(root, mesh, param_dtype, reduce_dtype, reshard_after_forward)
    return done


def is_sharded(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    """True for a DTensor (an FSDP2-sharded parameter)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered for a sharded one (a collective: every rank must call it), else ``tensor``."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a plain tensor sharing its storage), or ``tensor`` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def distribute_like(target: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out like ``target``: for a sharded ``target`` a DTensor with its mesh and placements, each rank
    keeping its own shard (every rank passes the same ``whole``: no communication); else ``whole`` itself.
    """
    if not is_sharded(target):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, target.device_mesh, target.placements, src_data_rank=None)


def from_local_like(target: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This rank's values ``local`` laid out like ``target``: a DTensor with its placements for a sharded one."""
    if not is_sharded(target):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, target.device_mesh, target.placements, run_check=False, shape=target.shape, stride=target.stride()
    )


def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into ``target``, which may be sharded (then every rank passes the same whole ``value``)."""
    with torch.no_grad():
        target.copy_(distribute_like(target, value.to(device=target.device, dtype=target.dtype)))
