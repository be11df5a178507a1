"""Mixture-of-experts weights in 4-bit: the fused 3-D expert tensors transformers 5 stores (``experts.gate_up_proj``
``[experts, 2 x intermediate, hidden]``, ``experts.down_proj``; gpt-oss stores them transposed).

Each 3-D weight is packed whole by bitsandbytes' own ``quantize_4bit`` (blocks of ``blocksize`` values run along each
expert's rows, never across two experts when an expert's matrix is a multiple of the blocksize, as in every released
MoE) into a ``Params4bit`` that replaces the parameter on the module; :func:`expert_weight` unpacks it again, to the
compute dtype, for the grouped matmul that runs the experts (``lightning_qlora.lora.experts``). Plain torch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_qlora._imports import import_bitsandbytes
from lightning_qlora.config import QuantConfig
from lightning_qlora.quant.weight import pack_4bit, state_nbytes

log = logging.getLogger(__name__)

# The 3-D weights of transformers' fused experts modules (``up_proj`` where an expert has no gate).
EXPERT_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")
# The weight a quantized experts module keeps its logical 3-D shape under (the packed bytes are flat).
_SHAPE_ATTR = "_qlora_expert_shapes"
# The most bytes one experts weight is unpacked into at once. Past it the experts are unpacked and multiplied in
# chunks (DeepSeek-V3's 256 experts: 14 GiB a projection unpacked whole), which needs the group offsets on the host:
# one synchronization per projection, so smaller weights (Qwen3-30B-A3B's largest: 0.75 GiB) stay sync-free, as CUDA
# graphs need.
EXPERT_SCRATCH_BYTES = 2**30


def expert_weight_names(module: nn.Module) -> list[str]:
    """The 3-D expert weights ``module`` holds (packed or not), in forward order; ``[]`` for any other module."""
    if not isinstance(getattr(module, "num_experts", None), int):
        return []
    names = []
    for name in EXPERT_WEIGHT_NAMES:
        param = module._parameters.get(name)
        if param is not None and (param.dim() == 3 or name in getattr(module, _SHAPE_ATTR, {})):
            names.append(name)
    return names


def iter_experts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every fused experts module (transformers 5's ``*Experts`` classes)."""
    for name, module in model.named_modules():
        if expert_weight_names(module):
            yield name, module


def is_quantized_experts(module: nn.Module) -> bool:
    return bool(getattr(module, _SHAPE_ATTR, None))


def expert_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """The logical ``[experts, rows, columns]`` shape of expert weight ``name``, packed or not."""
    shapes = getattr(module, _SHAPE_ATTR, {})
    if name in shapes:
        return shapes[name]
    param = module._parameters[name]
    assert param is not None
    return (param.shape[0], param.shape[1], param.shape[2])


def expert_weight(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Expert weight ``name`` of ``module`` as a ``[experts, rows, columns]`` tensor in ``dtype``, dequantized on the
    fly when packed (a new tensor each call: nothing full-precision is kept between calls).
    """
    param = module._parameters[name]
    assert param is not None
    state = getattr(param, "quant_state", None)
    if state is None:
        return param.to(dtype)
    import bitsandbytes.functional

    return bitsandbytes.functional.dequantize_4bit(param.data, state).to(dtype).view(expert_shape(module, name))


def expert_absmax(module: nn.Module, name: str) -> torch.Tensor | None:
    """The fp32 scale of every block of packed expert weight ``name`` (double quant undone: a 64th of the values, in
    fp32), for :func:`expert_weight_range`; ``None`` for an unpacked weight.
    """
    param = module._parameters[name]
    state = getattr(param, "quant_state", None)
    if state is None:
        return None
    if not state.nested:
        return state.absmax.float()
    import bitsandbytes.functional

    return (bitsandbytes.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def expert_weight_range(module: nn.Module, name: str, dtype: torch.dtype, start: int, end: int,
                        absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Experts ``start:end`` of weight ``name`` as ``[end - start, rows, columns]`` in ``dtype``: only their values
    are unpacked (``absmax``: :func:`expert_absmax`, computed once for several ranges). Each expert's matrix must
    fill whole blocks (:func:`experts_per_chunk` checks it).
    """
    param = module._parameters[name]
    assert param is not None
    state = getattr(param, "quant_state", None)
    if state is None:
        return param[start:end].to(dtype)
    import bitsandbytes.functional

    _, rows, columns = expert_shape(module, name)
    per_expert = rows * columns
    first, last = start * per_expert, end * per_expert
    scales = expert_absmax(module, name) if absmax is None else absmax
    assert scales is not None
    packed = param.data.view(torch.uint8).reshape(-1)[first // 2 : last // 2].reshape(-1, 1)
    functional = bitsandbytes.functional
    chunk = functional.QuantState(absmax=scales[first // state.blocksize : last // state.blocksize],
                                  shape=torch.Size([end - start, rows, columns]), dtype=state.dtype,
                                  blocksize=state.blocksize, quant_type=state.quant_type, code=state.code)
    return functional.dequantize_4bit(packed, chunk).to(dtype)


def experts_per_chunk(module: nn.Module, name: str, dtype: torch.dtype, max_bytes: int | None = None) -> int:
    """How many experts of packed weight ``name`` to unpack at once so that the unpacked chunk stays within
    ``max_bytes`` (default :data:`EXPERT_SCRATCH_BYTES`): all of them when the whole weight fits, or when it is not
    packed, or when an expert's matrix does not fill whole blocks (a toy shape: no released MoE has one).
    """
    max_bytes = EXPERT_SCRATCH_BYTES if max_bytes is None else max_bytes
    experts, rows, columns = expert_shape(module, name)
    state = getattr(module._parameters[name], "quant_state", None)
    per_expert_bytes = rows * columns * dtype.itemsize
    if state is None or experts * per_expert_bytes <= max_bytes or (rows * columns) % state.blocksize:
        return experts
    return max(1, max_bytes // per_expert_bytes)


@dataclass
class ExpertsReport:
    """What quantizing the experts did: names, values and bytes (the 3-D weights only; biases stay as they are)."""

    quantized: list[str] = field(default_factory=list)
    num_params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


def quantize_experts(
    module: nn.Module, module_name: str, config: QuantConfig, device: torch.device | None, report: ExpertsReport
) -> list[str]:
    """Pack every 3-D expert weight of ``module`` into NF4/FP4 (+ double quant) in place, on ``device``; returns the
    qualified names quantized. A weight still on the meta device (a model built without weights) is drawn from
    ``normal(0, initializer_range)`` first, as transformers initializes experts, and that is logged.
    """
    bnb = import_bitsandbytes()
    done = []
    shapes: dict[str, tuple[int, int, int]] = dict(getattr(module, _SHAPE_ATTR, {}))
    for name in expert_weight_names(module):
        param = module._parameters[name]
        assert param is not None
        if getattr(param, "quant_state", None) is not None:
            continue
        target = device if device is not None else (param.device if not param.is_meta else torch.device("cpu"))
        if param.is_meta:
            std = float(getattr(getattr(module, "config", None), "initializer_range", 0.02) or 0.02)
            weight = torch.empty(param.shape, device=target, dtype=config.torch_compute_dtype).normal_(0.0, std)
            log.info("%s.%s was built on the meta device: drawn from normal(0, %g) before quantizing", module_name,
                     name, std)
        else:
            weight = param.detach().to(target)
        shape = (weight.shape[0], weight.shape[1], weight.shape[2])
        report.bytes_before += weight.numel() * config.torch_compute_dtype.itemsize
        packed, state = pack_4bit(weight, config.quant_type, config.blocksize, config.double_quant,
                                  config.torch_quant_storage, dequantize_to=config.torch_compute_dtype)
        del weight
        module._parameters[name] = bnb.nn.Params4bit(
            packed, requires_grad=False, quant_state=state, blocksize=config.blocksize,
            compress_statistics=config.double_quant, quant_type=config.quant_type,
            quant_storage=config.torch_quant_storage, bnb_quantized=True,
        )
        shapes[name] = shape
        report.num_params += shape[0] * shape[1] * shape[2]
        report.bytes_after += packed.numel() * packed.element_size() + state_nbytes(state)
        full_name = f"{module_name}.{name}" if module_name else name
        report.quantized.append(full_name)
        done.append(full_name)
    setattr(module, _SHAPE_ATTR, shapes)
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta and name.endswith("_bias"):  # gpt-oss' expert biases: zero, as transformers starts them
            module._parameters[name] = nn.Parameter(torch.zeros(param.shape, device=device or "cpu"),
                                                    requires_grad=False)
    return done


def packed_expert_params(module: nn.Module) -> int:
    """Values held in packed expert weights of ``module`` (its own, not its children's)."""
    shapes: dict[str, Any] = getattr(module, _SHAPE_ATTR, {})
    return sum(s[0] * s[1] * s[2] for s in shapes.values())
