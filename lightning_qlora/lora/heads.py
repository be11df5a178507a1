"""Modules trained whole beside the adapters and saved with them: PEFT's ``modules_to_save`` (new task heads).

They stay out of 4-bit and get no adapter; their parameters are kept in fp32 (like the adapters' master weights)
and train; the model records which they are, so that saving, loading and the base fingerprint know. Plain torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lightning_qlora.modules import is_adapter_parameter, is_inside, matches_any

# Set on a model: the qualified names of its modules trained whole and saved with the adapter.
MODULES_TO_SAVE_ATTR = "_lightning_qlora_modules_to_save"
# Trained in fp32 for the same reason as the adapters: their updates would round away in bf16.
HEAD_DTYPE = torch.float32
# Set on a module trained whole: the dtype its output is handed on in (the model's compute dtype).
_OUTPUT_DTYPE_ATTR = "_lightning_qlora_output_dtype"


def find_modules_to_save(model: nn.Module, names: Iterable[str]) -> list[str]:
    """The qualified names of ``model``'s modules that ``names`` match (outermost matches only; the root never)."""
    wanted = tuple(names)
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and matches_any(name, wanted) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def modules_to_save_of(model: nn.Module) -> list[str]:
    """The modules of ``model`` (names relative to it) that train whole and are saved with the adapter."""
    return list(getattr(model, MODULES_TO_SAVE_ATTR, []))


def train_whole(model: nn.Module, names: Sequence[str], compute_dtype: torch.dtype | None = None) -> None:
    """Make the modules ``names`` of ``model`` trainable in fp32 and record them on ``model``.

    Each one computes in fp32 (floating inputs cast up) and hands its output on in ``compute_dtype`` (by default the
    dtype of the model's other floating parameters), so it fits between layers that compute in bf16.
    """
    if compute_dtype is None:
        compute_dtype = _base_dtype(model, names)
    for name in names:
        module = model.get_submodule(name)
        for param in module.parameters():
            if param.is_floating_point():
                param.data = param.data.to(HEAD_DTYPE)
            param.requires_grad_(True)
        if not hasattr(module, _OUTPUT_DTYPE_ATTR):
            module.register_forward_pre_hook(_inputs_in_head_dtype)
            module.register_forward_hook(_output_in_compute_dtype)
        setattr(module, _OUTPUT_DTYPE_ATTR, compute_dtype)
    setattr(model, MODULES_TO_SAVE_ATTR, sorted(set(modules_to_save_of(model)) | set(names)))


def saved_parameter_ids(model: nn.Module) -> set[int]:
    """``id`` of every parameter inside a module to save, found on ``model`` or any submodule holding the record."""
    ids: set[int] = set()
    for holder in model.modules():
        for name in getattr(holder, MODULES_TO_SAVE_ATTR, []):
            ids.update(id(p) for p in holder.get_submodule(name).parameters())
    return ids


def _base_dtype(model: nn.Module, heads: Sequence[str]) -> torch.dtype:
    """The dtype of the first floating parameter outside ``heads`` and the adapters: the model's compute dtype."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not is_inside(name, heads) and not is_adapter_parameter(name):
            return param.dtype
    return HEAD_DTYPE


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _inputs_in_head_dtype(module: nn.Module, args: tuple) -> tuple:
    return tuple(_cast(a, HEAD_DTYPE) for a in args)


def _output_in_compute_dtype(module: nn.Module, args: tuple, output: object) -> object:
    return _cast(output, getattr(module, _OUTPUT_DTYPE_ATTR))
