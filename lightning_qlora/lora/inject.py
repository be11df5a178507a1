"""Put LoRA adapters into a model, find them, merge them, and say which tensors train.

Plain torch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lightning_qlora._progress import progress_bar
from lightning_qlora.config import ALL_LINEAR, LoRAConfig
from lightning_qlora.lora.heads import saved_parameter_ids
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.modules import (
    is_adapter_parameter,
    iter_linears,
    linears_from_conv1d,
    matches_any,
    name_matches,
    replace_submodule,
    strip_base_layer,
)
from lightning_qlora.quant.weight import is_quantized_linear


def inject_lora(model: nn.Module, config: LoRAConfig, skip_modules: Sequence[str] = ()) -> list[str]:
    """Wrap every targeted linear of ``model`` in a :class:`LoRALinear`, in place.

    Args:
        model: the (usually already quantized and frozen) model; names are matched relative to it.
        config: rank, alpha, dropout and ``target_modules``.
        skip_modules: names never adapted (``QuantConfig.skip_modules``), matched like a list target.

    Returns:
        The qualified names of the adapted linears, in model order.

    Raises:
        ValueError: if the targets match no linear layer, or a listed name matches none, naming the real linears.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
        ['0']
    """
    linears_from_conv1d(model)
    return wrap_linears(model, target_names(model, config, skip_modules), config)


def target_names(model: nn.Module, config: LoRAConfig, skip_modules: Sequence[str] = ()) -> list[str]:
    """The qualified names of the linears ``config.target_modules`` selects in ``model`` (adapted ones included,
    by the name they had before), checked over the whole model.

    Raises:
        ValueError: as :func:`inject_lora`.
    """
    # A linear already wrapped is known by its wrapper's name, so injecting twice is a no-op, not an error.
    names = [strip_base_layer(name) for name, _ in iter_linears(model)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so LoRA has nothing to adapt. "
            "QLoRA applies to models built from torch.nn.Linear."
        )
    candidates = [n for n in names if not matches_any(n, skip_modules)]
    return select_targets(candidates, config.target_modules, all_linear_names=names)


def wrap_linears(model: nn.Module, names: list[str], config: LoRAConfig) -> list[str]:
    """Wrap the linears ``names`` (qualified, relative to ``model``) in adapters; returns the names newly wrapped."""
    adapted: list[str] = []
    for name in names:
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            continue
        assert isinstance(base, nn.Linear), f"{name} is a {type(base).__name__}, not a linear layer"
        layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora)
        replace_submodule(model, name, layer)
        adapted.append(name)
    return adapted


def select_targets(names: list[str], target_modules: str | Sequence[str], all_linear_names: list[str]) -> list[str]:
    """The subset of ``names`` selected by ``target_modules`` (see :class:`LoRAConfig`).

    Raises:
        ValueError: when nothing matches, or when listed names match nothing (those are named).
    """
    if target_modules == ALL_LINEAR:
        selected = list(names)
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        selected = [n for n in names if pattern.fullmatch(n)]
    else:
        selected = [n for n in names if any(name_matches(n, t) for t in target_modules)]
        unmatched = [t for t in target_modules if not any(name_matches(n, t) for n in names)]
        if unmatched and selected:
            raise ValueError(
                f"LoRAConfig(target_modules={list(target_modules)!r}): {unmatched!r} matched no nn.Linear, while "
                f"the rest matched {len(selected)} layer(s). Linear layers look like: {_examples(all_linear_names)}. "
                "Fix or remove the unmatched names."
            )
    if not selected:
        shown = target_modules if isinstance(target_modules, str) else list(target_modules)
        raise ValueError(
            f"LoRAConfig(target_modules={shown!r}) matched no nn.Linear in the model. Linear layers look like: "
            f"{_examples(all_linear_names)}. Use 'all-linear' or names such as "
            f"{_suffix_examples(all_linear_names)}."
        )
    return selected


def merge_lora(model: nn.Module, progress: bool = False) -> list[str]:
    """Merge every adapter of ``model`` into its base weight (see :meth:`LoRALinear.merge`); returns their names.

    Merging into a 4-bit base re-quantizes it, which adds rounding error: a warning says so.
    """
    layers = list(iter_lora_layers(model))
    if any(is_quantized_linear(layer.base_layer) for _, layer in layers):
        warnings.warn(
            "Merging LoRA into a 4-bit base re-quantizes every adapted weight: the merged model differs from base + "
            "adapter by 4-bit rounding. Export a bf16 merge (lightning-qlora-export) for an exact copy.",
            stacklevel=2,
        )
    for _, layer in progress_bar(layers, progress, "Merging adapters"):
        layer.merge()
    return [name for name, _ in layers]


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo :func:`merge_lora` exactly; returns the names of the restored layers."""
    layers = [(name, layer) for name, layer in iter_lora_layers(model) if layer.merged]
    for _, layer in layers:
        layer.unmerge()
    return [name for name, _ in layers]


def iter_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield ``(qualified_name, layer)`` for every :class:`LoRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def mark_only_lora_as_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapters (and the modules trained whole, ``modules_to_save``); return the number of
    trainable parameters.
    """
    saved = saved_parameter_ids(model)
    trainable = 0
    for name, param in model.named_parameters():
        trains = is_adapter_parameter(name) or id(param) in saved
        param.requires_grad_(trains)
        trainable += param.numel() if trains else 0
    return trainable


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, keyed by qualified name (``...q_proj.lora_A.weight``)."""
    return {name: param.detach() for name, param in model.named_parameters() if is_adapter_parameter(name)}


def _examples(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (", ..." if len(names) > limit else "")


def _suffix_examples(names: list[str], limit: int = 3) -> str:
    suffixes = list(dict.fromkeys(n.rpartition(".")[2] for n in names))
    return repr(suffixes[:limit])
