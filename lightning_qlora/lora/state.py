"""The trainable tensors of a model as one state dict, whole, for checkpoints that never hold the frozen base.

Plain torch; sharded (FSDP2) adapters are gathered one tensor at a time.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_qlora.sharding import copy_full_into, full_tensor, is_sharded


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad (the adapters), detached and whole, keyed by qualified name.

    Sharded (FSDP) parameters are all-gathered one at a time and moved to the CPU, so a rank never holds all the
    whole adapters on its GPU (65B at r 64: 3 GiB); under FSDP every rank must call this.
    """
    return {
        name: full_tensor(p.detach()).cpu() if is_sharded(p) else p.detach()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load adapter weights saved by :func:`trainable_state_dict` into ``module``.

    Raises:
        KeyError: with ``strict``, when the checkpoint lacks a trainable weight of the model or has unknown keys.
        ValueError: when a weight's shape differs.
    """
    params = dict(module.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    unknown = sorted(set(state) - set(params))
    missing = sorted(expected - set(state))
    if strict and (unknown or missing):
        raise KeyError(
            f"The checkpoint does not match the model's trainable weights: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unknown[:5]} ({len(unknown)} in all). Was it saved with the same "
            "LoRAConfig (r, target_modules) and model? Pass strict=False to load what matches."
        )
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                continue
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"Checkpoint weight {name!r} has shape {tuple(value.shape)} but the model's has "
                    f"{tuple(target.shape)}: the checkpoint was saved with another rank or model."
                )
            copy_full_into(target, value)
