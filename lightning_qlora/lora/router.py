"""LoRA on a mixture-of-experts router: its ``[experts, hidden]`` weight plus ``scaling * B @ A``.

transformers 5's routers (``MixtralTopKRouter``, ``Qwen3MoeTopKRouter``, ``GptOssTopKRouter``, ``DeepseekV3TopkRouter``,
...) are modules of their own, not ``nn.Linear``: each multiplies by its ``weight`` parameter inside a forward that
also picks the top experts (with a bias, a score correction or a float32 cast, per family). The router keeps its
class name and its forward; an adapted router runs that forward with ``weight`` replaced, for the call, by
``weight + scaling * lora_B @ lora_A`` (the gradient reaches the factors through the routing weights). The factors
are ``lora_A["weight"]`` ``[r, hidden]`` (Kaiming-uniform, as ``nn.Linear`` draws) and ``lora_B["weight"]``
``[experts, r]`` (zero), fp32: under PEFT's keys that is exactly its ``target_parameters`` layout for a 2-D
parameter (``<router>.lora_A.weight``, ``<router>.lora_B.weight``), so PEFT loads them as they are. Plain torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from lightning_qlora.config import LoRAConfig

#: The names transformers gives a router inside its MoE block.
ROUTER_NAMES = ("gate", "router")
_SCALING = "lora_scaling"


def iter_routers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` for each MoE router of ``model``: a module named ``gate`` or ``router`` beside
    an ``experts`` module, with a 2-D ``weight`` of one row per expert (``nn.Linear`` gates are adapted as linears).
    """
    for name, module in model.named_modules():
        parent_name, _, short = name.rpartition(".")
        if short not in ROUTER_NAMES or isinstance(module, nn.Linear):
            continue
        weight = module._parameters.get("weight")
        if weight is None or weight.dim() != 2:
            continue
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(getattr(parent, "experts", None), nn.Module):
            yield name, module


def is_adapted_router(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ParameterDict) and hasattr(module, _SCALING) and getattr(
        type(module), "_qlora_router", False)


def router_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` of an adapted router: ``[r, hidden]`` and ``[experts, r]``."""
    factor_a, factor_b = cast(nn.ParameterDict, module.lora_A), cast(nn.ParameterDict, module.lora_B)
    return factor_a["weight"], factor_b["weight"]


def adapt_router(module: nn.Module, config: LoRAConfig) -> bool:
    """Give router ``module`` LoRA factors on its weight (``B`` zero); ``False`` when it already has them."""
    if is_adapted_router(module):
        return False
    weight = module._parameters["weight"]
    assert weight is not None
    experts, hidden = weight.shape
    a = torch.empty(config.r, hidden, device=weight.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    module.lora_A = nn.ParameterDict({"weight": nn.Parameter(a)})
    module.lora_B = nn.ParameterDict({"weight": nn.Parameter(torch.zeros(experts, config.r, device=weight.device))})
    setattr(module, _SCALING, config.scaling)
    cls: Any = type(module)
    module.__class__ = _adapted_class(cls)
    return True


def router_delta(module: nn.Module) -> torch.Tensor:
    """``scaling * B @ A``: what the adapter adds to the router's weight (fp32)."""
    factor_a, factor_b = router_factors(module)
    return (factor_b.float() @ factor_a.float()) * getattr(module, _SCALING)


def merged_router_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The router's weight with its adapter merged in (for exports)."""
    weight = module._parameters["weight"]
    assert weight is not None
    merged = weight.detach().float()
    if is_adapted_router(module):
        merged = merged + router_delta(module).detach()
    return merged.to(dtype)


@functools.cache
def _adapted_class(cls: Any) -> type:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        weight = self._parameters["weight"]
        # The call sees the adapted weight under the parameter's own name, whatever the family's forward does with it
        # (a float32 cast, a bias beside it); the parameter itself is put back at once.
        self._parameters["weight"] = weight + router_delta(self).to(weight.dtype)
        try:
            return cls.forward(self, *args, **kwargs)
        finally:
            self._parameters["weight"] = weight

    return type(cls.__name__, (cls,), {"forward": forward, "_qlora_router": True, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def peft_router_tensors(module_name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """An adapted router's factors under PEFT's ``target_parameters`` keys (without PEFT's prefix)."""
    if not is_adapted_router(module):
        return {}
    factor_a, factor_b = router_factors(module)
    return {f"{module_name}.lora_A.weight": factor_a.detach(), f"{module_name}.lora_B.weight": factor_b.detach()}


def load_peft_router_tensors(module_name: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy PEFT-layout router factors (:func:`peft_router_tensors`' keys) into ``module``; returns the keys used.

    Raises:
        ValueError: a tensor of the wrong shape, naming the key and both shapes.
    """
    used = []
    with torch.no_grad():
        for key, target in peft_router_tensors(module_name, module).items():
            if key not in tensors:
                continue
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, but the router "
                                 f"{module_name} needs {tuple(target.shape)}: the adapter was trained on another model "
                                 "or rank.")
            target.copy_(tensors[key])  # (a detached view of the factor: the copy writes through)
            used.append(key)
    return used


def peft_router_target(module_name: str) -> str:
    """PEFT's ``target_parameters`` entry for a router: its last two names and ``weight`` (``mlp.gate.weight``)."""
    return ".".join([*module_name.split(".")[-2:], "weight"])


def is_router_target(entry: str) -> bool:
    """Whether a PEFT ``target_parameters`` entry names a router's weight (``...gate.weight``, ``...router.weight``)."""
    parts = entry.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in ROUTER_NAMES
