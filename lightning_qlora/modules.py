"""Walking a model: its linear layers, its transformer blocks, adapter names and name matching.

One home for the small questions every layer of the library asks about a model ("which linears?", "does this name
match that target?", "is this tensor an adapter's?", "where are the transformer blocks?"). Plain torch.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch import nn

# The adapter's own submodules (PEFT's names): never part of the base, never quantized.
ADAPTER_MODULE_NAMES = frozenset({"lora_A", "lora_B"})
# Every trainable adapter tensor is under one of these names (the DoRA magnitude is a bare parameter).
ADAPTER_PARAMETER_NAMES = ADAPTER_MODULE_NAMES | {"lora_magnitude_vector"}
# The attribute under which an adapter wrapper keeps the layer it wraps (PEFT's name).
BASE_LAYER = "base_layer"
# Set on a linear made from transformers' Conv1D (whose checkpoint weight is [in, out]; PEFT's name for that layout).
FAN_IN_FAN_OUT = "fan_in_fan_out"


def name_matches(name: str, target: str) -> bool:
    """``name`` is ``target`` or ends with ``"." + target``: ``"q_proj"`` matches
    ``"model.layers.0.self_attn.q_proj"``.
    """
    return name == target or name.endswith("." + target)


def matches_any(name: str, targets: Iterable[str]) -> bool:
    """:func:`name_matches` for any of ``targets`` (how ``skip_modules`` and list ``target_modules`` match)."""
    return any(name_matches(name, target) for target in targets)


def is_inside(name: str, modules: Iterable[str]) -> bool:
    """Whether the qualified ``name`` (a module or parameter) is one of ``modules`` (qualified names) or inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def is_adapter_parameter(name: str) -> bool:
    """True for an adapter tensor's qualified name: ``...lora_A.weight``, ``...lora_B.weight`` or DoRA's
    ``...lora_magnitude_vector``.
    """
    return any(part in ADAPTER_PARAMETER_NAMES for part in name.split("."))


def strip_base_layer(name: str) -> str:
    """The name a wrapped layer had before an adapter was injected around it (``x.base_layer`` -> ``x``)."""
    suffix = "." + BASE_LAYER
    return name[: -len(suffix)] if name.endswith(suffix) else name


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(qualified_name, module)`` for every ``nn.Linear`` of the base model (4-bit ones included).

    The adapter matrices (``lora_A``/``lora_B``) are not part of the base and are never yielded.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] not in ADAPTER_MODULE_NAMES:
            yield name, module


def base_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The base model's linears as ``(name, module)``, named as before any adapter was injected."""
    return [(strip_base_layer(name), module) for name, module in iter_linears(model)]


def linears_from_conv1d(model: nn.Module) -> list[str]:
    """Replace each transformers ``Conv1D`` (GPT-2's linear layer, weight stored ``[in, out]``) by an ``nn.Linear``
    computing the same (weight transposed, ``fan_in_fan_out = True`` on it), so that it is quantized and adapted like
    any linear; returns their names. Meta weights stay on the meta device (a checkpoint read transposes them).
    """
    import torch

    names = []
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Conv1D" or getattr(module, "weight", None) is None or module.weight.dim() != 2:
            continue
        weight = module.weight
        fan_in, fan_out = weight.shape
        linear = nn.Linear(fan_in, fan_out, bias=module.bias is not None, device="meta", dtype=weight.dtype)
        value = torch.empty(fan_out, fan_in, device="meta", dtype=weight.dtype) if weight.is_meta else (
            weight.detach().t().contiguous())
        linear.weight = nn.Parameter(value, requires_grad=weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        setattr(linear, FAN_IN_FAN_OUT, True)
        replace_submodule(model, name, linear)
        names.append(name)
    return names


def linears_read_by_weight(model: nn.Module) -> list[str]:
    """Linears whose parent's forward reads ``self.<name>.weight`` as a matrix instead of calling the layer (Mamba's
    ``dt_proj.weight @ ...``): a 4-bit or adapted layer there would be read as packed bytes or without its adapter.
    Found in the source of the parent class's forward methods (``cuda_kernels_forward`` too when its kernels,
    ``mamba_ssm``, are installed).
    """
    names = []
    for parent_name, parent in model.named_modules():
        # An adapter wrapper reads its own factors' weights: those are no base linears.
        children = [n for n, c in parent.named_children()
                    if isinstance(c, nn.Linear) and n not in ADAPTER_MODULE_NAMES and n != BASE_LAYER]
        if not children:
            continue
        parent_class: Any = type(parent)
        source = _forward_source(parent_class)
        for child in children:
            if re.search(rf"(?<!isinstance\()self\.{re.escape(child)}\.weight\b(?!\.(dtype|device|shape))", source):
                names.append(f"{parent_name}.{child}" if parent_name else child)
    return names


@functools.cache
def _forward_source(cls: Any) -> str:
    methods = ["forward", "slow_forward", "torch_forward"]
    if importlib.util.find_spec("mamba_ssm") is not None:
        methods.append("cuda_kernels_forward")
    sources = []
    for name in methods:
        method = cls.__dict__.get(name)
        if method is None:
            continue
        try:
            sources.append(inspect.getsource(method))
        except (OSError, TypeError):  # built at run time, or a C function: nothing to read
            continue
    return "\n".join(sources)


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` inside ``root``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def find_blocks(root: nn.Module, class_names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks as ``(qualified_name, module)``: the unit the recipe converts, FSDP shards,
    calibration runs and ``torch.compile`` compiles, one at a time.

    Args:
        root: the model.
        class_names: class names of the blocks (e.g. ``["LlamaDecoderLayer"]``). ``None``: every element of the
            model's longest ``nn.ModuleList`` that holds a linear layer.

    Raises:
        ValueError: when ``class_names`` match no module, listing the model's module classes.
    """
    if class_names:
        wanted = set(class_names)
        blocks = [(n, m) for n, m in root.named_modules() if n and type(m).__name__ in wanted]
        if not blocks:
            found = sorted({type(m).__name__ for _, m in root.named_modules()})
            raise ValueError(
                f"shard_modules={list(class_names)} matches no module of {type(root).__name__}. Module classes in "
                f"this model: {found[:20]}."
            )
        return blocks
    lists = [(n, m) for n, m in root.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    list_name, longest = max(lists, key=lambda item: len(item[1]))
    return [
        (f"{list_name}.{i}", block)
        for i, block in enumerate(longest)
        if any(isinstance(m, nn.Linear) for m in block.modules())
    ]


def adapter_root(module: nn.Module) -> nn.Module:
    """The model that adapter and target names are relative to.

    For a LightningModule (anything with a ``training_step``) that holds its network in ``.model``, that network;
    otherwise ``module`` itself. A transformers model is its own root even though it has a ``.model`` attribute.
    """
    inner = getattr(module, "model", None)
    if isinstance(inner, nn.Module) and callable(getattr(module, "training_step", None)):
        return inner
    return module
