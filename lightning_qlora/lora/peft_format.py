"""Save and load LoRA adapters in PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``).

Keys are PEFT's: ``base_model.model.<module path>.lora_A.weight``, with the module path relative to the adapter root
(the LightningModule's ``model`` attribute, or the model itself). Our own metadata (library version, quantization
settings, training step) goes into the safetensors header metadata, which PEFT ignores.

Every save writes its two files into the directory, each to a temporary name renamed over the old one once complete,
and leaves every other file there alone: an interrupted save never leaves a half-written file, and concurrent saves
to one directory take turns (a lock file). Loading never touches what a writer is writing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora._atomic import output_directory, write_files_atomically, writer_lock
from lightning_qlora.config import QuantConfig
from lightning_qlora.lora.experts import adapt_experts, load_peft_expert_tensors, peft_expert_tensors
from lightning_qlora.lora.heads import find_modules_to_save, modules_to_save_of, train_whole
from lightning_qlora.lora.inject import inject_lora, iter_lora_layers
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.lora.peft_config import (
    ADAPTER_CONFIG,
    AdapterFormatError,
    lora_config_from_peft,
    peft_config_dict,
    read_adapter_config,
)
from lightning_qlora.lora.router import adapt_router, iter_routers, load_peft_router_tensors, peft_router_tensors
from lightning_qlora.modules import FAN_IN_FAN_OUT, adapter_root, base_linears, is_inside, linears_from_conv1d
from lightning_qlora.quant.experts import iter_experts
from lightning_qlora.quant.fingerprint import (
    FingerprintMismatchError,
    base_fingerprint,
    compare_fingerprints,
    describe,
)
from lightning_qlora.quant.quantize import CALIBRATION_ATTR, quantize_model
from lightning_qlora.quant.weight import has_quantized_linears, is_quantized_linear, quant_state_of
from lightning_qlora.sharding import full_tensor

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_METADATA_KEY = "lightning_qlora"


def save_adapter(
    module: nn.Module,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the LoRA adapters of ``module`` to ``directory`` in PEFT format, atomically.

    Args:
        module: a model with :class:`LoRALinear` layers, or a LightningModule holding one in ``.model``.
        directory: created (parents too); the adapter's two files there are replaced one by one, each once complete;
            other files in it stay. A *file* at this path is refused.
        base_model_name_or_path: recorded in ``adapter_config.json`` for ``PeftModel.from_pretrained``.
        metadata: extra JSON-serializable facts stored in the safetensors header (e.g. the training step).
        state: the tensors from :func:`adapter_state_dict`, when already gathered (FSDP: every rank gathers, one
            writes); by default they are read from ``module``.

    Returns:
        The adapter directory.

    Raises:
        ValueError: if the model has no LoRA adapters.

    Example:
        >>> save_adapter(model, "adapters/last")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    root = adapter_root(module)
    layers = list(iter_lora_layers(root))
    if not layers:
        raise ValueError(
            f"{type(root).__name__} has no LoRA adapters to save. Inject them first (QLoRAPlugin or inject_lora)."
        )
    tensors = adapter_state_dict(module) if state is None else state
    config = peft_config_dict(root, layers, base_model_name_or_path)
    facts = {
        "library": "lightning_qlora",
        "base_fingerprint": base_fingerprint(root, _fingerprinted_linears(root)),
        "quantization": quantization_settings(root),
        **(metadata or {}),
    }
    header = {_METADATA_KEY: json.dumps(facts, sort_keys=True, default=str), "format": "pt"}

    target = output_directory(directory)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    with writer_lock(target):  # two writers of one directory take turns
        # Both files are written before either is renamed into place: a failed save changes nothing. (A reader between
        # the two renames sees the new weights with the previous save's config, which describes them as long as r
        # and the targets stay; a mismatch is refused at load, by shape.)
        write_files_atomically({
            target / ADAPTER_WEIGHTS: lambda path: save_file(tensors, str(path), metadata=header),
            target / ADAPTER_CONFIG: lambda path: path.write_text(text),
        })
    return target


def load_adapter(
    module: nn.Module, directory: str | os.PathLike, strict: bool = True, quant: QuantConfig | None = None
) -> list[str]:
    """Load a PEFT-format adapter (ours or one PEFT saved) into ``module``.

    A model without LoRA layers gets the ones the adapter's ``adapter_config.json`` names (as
    ``PeftModel.from_pretrained`` does), after quantizing its base with ``quant`` if given.

    Args:
        module: a model, or a LightningModule holding it in ``.model``.
        directory: the adapter directory.
        strict: refuse an adapter whose recorded base fingerprint (architecture, linear shapes, sampled weights)
            differs from this model's, or whose weights do not cover exactly the model's adapters. ``False`` loads it
            anyway, with a warning, and skips missing weights.
        quant: quantize a not-yet-quantized base with these settings before injecting adapters.

    Returns:
        The module paths whose adapters were loaded.

    Raises:
        AdapterFormatError: for a missing directory or file, an unreadable/truncated file, an unknown or unsupported
            config field, unknown or missing keys (with ``strict``), or a shape mismatch.
        FingerprintMismatchError: with ``strict``, when the adapter was trained on another base model.

    Example:
        >>> load_adapter(model, "outputs/2026-11-29/10-00-00/adapter/last")  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    weights, config_file = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
    for file in (weights, config_file):
        if not file.is_file():
            raise AdapterFormatError(f"{file} is missing: {path} is not a complete PEFT adapter directory.")
    config = read_adapter_config(path)
    lora_config = lora_config_from_peft(config, config_file)
    try:
        state = load_file(str(weights))
        facts = read_adapter_metadata(path)
    except AdapterFormatError:
        raise
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"{weights} cannot be read: truncated or corrupted ({err}).") from None
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(
                f"{weights}: tensor {key!r} has dtype {tensor.dtype}; adapter weights are floating point. The file "
                "was not written by PEFT or lightning_qlora, or is damaged."
            )
        if not bool(tensor.isfinite().all()):
            raise AdapterFormatError(
                f"{weights}: tensor {key!r} holds NaN or inf: the adapter diverged before it was saved. Use an "
                "earlier adapter (AdapterCheckpoint keeps step-* directories)."
            )

    root = adapter_root(module)
    conv1d = linears_from_conv1d(root)
    if config.get("fan_in_fan_out") and not conv1d and not any(
        getattr(m, FAN_IN_FAN_OUT, False) for _, m in base_linears(root)
    ):
        raise AdapterFormatError(
            f"{config_file}: fan_in_fan_out=true describes GPT-2-style Conv1D layers, but {type(root).__name__} has "
            "none: the adapter was trained on another architecture."
        )
    heads = find_modules_to_save(root, lora_config.modules_to_save) if config.get("modules_to_save") else []
    if heads and not isinstance(lora_config.target_modules, str):
        # PEFT lists the linears inside modules_to_save among its targets but never adapts them (the head trains
        # whole): neither do we.
        kept = [t for t in lora_config.target_modules if not is_inside(t, heads)]
        lora_config = replace(lora_config, target_modules=kept or lora_config.target_modules)
    if not any(True for _ in iter_lora_layers(root)):
        inside_heads = [name for name, _ in base_linears(root) if is_inside(name, heads)]
        skip = (*(quant or QuantConfig()).skip_modules, *heads, *inside_heads)
        if quant is not None and quant.quantized and not any(is_quantized_linear(m) for _, m in base_linears(root)):
            quantize_model(root, quant, trained_whole=[*heads, *inside_heads])
        # PEFT's "all-linear" never adapts the output head; neither do we unless the caller's QuantConfig says so.
        inject_lora(root, lora_config, skip_modules=skip)
        if lora_config.target_experts:
            for _, experts_module in iter_experts(root):
                adapt_experts(experts_module, lora_config)
        if lora_config.target_router:
            for _, router in iter_routers(root):
                adapt_router(router, lora_config)
    if heads:
        train_whole(root, heads)
    _check_fingerprint(facts, root, path, strict)
    _warn_calibration_mismatch(facts, root, path)
    layers = dict(iter_lora_layers(root))
    expected = {f"{PEFT_PREFIX}{n}.{key}" for n, layer in layers.items() for key in adapter_tensors(layer)}
    saved_heads = _head_tensors(root)
    expected |= set(saved_heads)
    all_experts = list(iter_experts(root))
    expected |= {f"{PEFT_PREFIX}{k}" for name, module in all_experts for k in peft_expert_tensors(name, module)}
    all_routers = list(iter_routers(root))
    expected |= {f"{PEFT_PREFIX}{k}" for name, module in all_routers for k in peft_router_tensors(name, module)}
    unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if strict and (unknown or missing):
        raise AdapterFormatError(
            f"{weights} does not match the model: {len(missing)} adapter weight(s) missing (e.g. {missing[:3]}), "
            f"{len(unknown)} unexpected (e.g. {unknown[:3]}). Was it trained on this model with the same "
            "target_modules? Pass strict=False to load the weights that match."
        )
    loaded: list[str] = []
    with torch.no_grad():
        for name, layer in layers.items():
            for suffix, target in adapter_tensors(layer).items():
                key = f"{PEFT_PREFIX}{name}.{suffix}"
                if key not in state:
                    continue
                if target.shape != state[key].shape:
                    raise AdapterFormatError(
                        f"{weights}: {key} has shape {tuple(state[key].shape)}, the model's is {tuple(target.shape)} "
                        "(different rank or base model)."
                    )
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
            loaded.append(name)
        for key, target in saved_heads.items():
            if key in state:
                if target.shape != state[key].shape:
                    raise AdapterFormatError(
                        f"{weights}: {key} has shape {tuple(state[key].shape)}, the model's is {tuple(target.shape)}."
                    )
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
        unprefixed = {k[len(PEFT_PREFIX):]: v for k, v in state.items() if k.startswith(PEFT_PREFIX)}
        parameter_targets = [(n, m, load_peft_expert_tensors) for n, m in all_experts]
        parameter_targets += [(n, m, load_peft_router_tensors) for n, m in all_routers]
        for name, module, load in parameter_targets:  # PEFT's target_parameters: experts, then routers
            try:
                if load(name, module, unprefixed):
                    loaded.append(name)
            except ValueError as err:
                raise AdapterFormatError(f"{weights}: {err}") from None
    return loaded


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``module`` under PEFT's keys, whole and on the CPU.

    Sharded (FSDP) adapters are all-gathered: under FSDP every rank must call this, in the same order.
    """
    tensors: dict[str, torch.Tensor] = {}
    root = adapter_root(module)
    for name, layer in iter_lora_layers(root):
        for key, tensor in adapter_tensors(layer).items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = full_tensor(tensor.detach()).cpu().contiguous()
    for key, tensor in _head_tensors(root).items():  # modules trained whole, under PEFT's modules_to_save keys
        tensors[key] = full_tensor(tensor.detach()).cpu().contiguous()
    for name, experts_module in iter_experts(root):  # per-expert adapters, in PEFT's target_parameters layout
        for key, tensor in peft_expert_tensors(name, experts_module).items():
            tensors[f"{PEFT_PREFIX}{key}"] = full_tensor(tensor).cpu().contiguous()
    for name, router in iter_routers(root):  # router adapters, the same way
        for key, tensor in peft_router_tensors(name, router).items():
            tensors[f"{PEFT_PREFIX}{key}"] = full_tensor(tensor).cpu().contiguous()
    return tensors


def _head_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the modules trained whole, keyed as PEFT saves ``modules_to_save``: ``<prefix><name>.<param>``."""
    return {
        f"{PEFT_PREFIX}{head}.{name}": tensor
        for head in modules_to_save_of(root)
        for name, tensor in root.get_submodule(head).state_dict(keep_vars=True).items()
    }


def adapter_tensors(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """The trainable tensors of one adapter under PEFT's key suffixes."""
    tensors = {"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}
    if layer.use_dora:
        tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector
    return tensors


def read_adapter_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Our metadata stored in the adapter's safetensors header (``{}`` for adapters written by PEFT)."""
    from safetensors import SafetensorError, safe_open

    file = Path(directory) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise AdapterFormatError(f"{file} cannot be read: missing, truncated or corrupted ({err}).") from None
    try:
        facts = json.loads(header.get(_METADATA_KEY, "{}"))
    except (json.JSONDecodeError, TypeError) as err:
        raise AdapterFormatError(f"{file}: its {_METADATA_KEY!r} metadata is not JSON ({err}).") from None
    if not isinstance(facts, dict):
        raise AdapterFormatError(
            f"{file}: its {_METADATA_KEY!r} metadata must be a JSON object, got {type(facts).__name__}."
        )
    return facts


def quantization_settings(root: nn.Module) -> dict[str, Any]:
    """How the base linears of ``root`` are stored: ``{"quant_type": "nf4", "blocksize": 64, ...}`` or ``none``."""
    for _, layer in base_linears(root):
        if is_quantized_linear(layer):
            state = quant_state_of(layer)  # survives FSDP, which replaces the Params4bit weight
            return {
                "quant_type": state.quant_type,
                "blocksize": state.blocksize,
                "double_quant": bool(state.nested),
                "compute_dtype": str(getattr(layer, "compute_dtype", None)),
                "calibration": getattr(root, CALIBRATION_ATTR, "none"),
            }
        return {"quant_type": "none", "dtype": str(layer.weight.dtype)}
    return {"quant_type": "none"}


def _fingerprinted_linears(root: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The base linears the fingerprint describes: all but the modules trained whole (the adapter carries those)."""
    heads = modules_to_save_of(root)
    return [(name, m) for name, m in base_linears(root) if not is_inside(name, heads)]


def _warn_calibration_mismatch(facts: dict[str, Any], root: nn.Module, path: Path) -> None:
    """An adapter learned on a base whose 4-bit codes were calibrated (GPTQ) partly corrects *that* base's rounding;
    on a base rounded another way it still works, but not exactly as trained.
    """
    trained_on = (facts.get("quantization") or {}).get("calibration", "none")
    here = quantization_settings(root).get("calibration", "none")
    if trained_on != here and has_quantized_linears(root):
        log.warning(
            "Adapter %s was trained on a 4-bit base with calibration=%r, but this base has calibration=%r: its outputs "
            "will differ slightly from the trained model's. Quantize the base the same way (QuantConfig(calibration="
            "%r) with the same data) for identical results, or merge with lightning-qlora-export in the run itself.",
            path, trained_on, here, trained_on,
        )


def _check_fingerprint(facts: dict[str, Any], root: nn.Module, path: Path, strict: bool) -> None:
    saved = facts.get("base_fingerprint")
    if not saved:
        return  # written by PEFT or another tool: nothing recorded to compare
    current = base_fingerprint(root, _fingerprinted_linears(root))
    problems = compare_fingerprints(saved, current)
    if not problems:
        return
    message = (
        f"Adapter {path} was trained on {describe(saved)} but is being loaded into {describe(current)}: "
        + "; ".join(problems)
        + "."
    )
    if strict:
        raise FingerprintMismatchError(message + " Pass strict=False to load it anyway.")
    log.warning("%s Loading anyway (strict=False).", message)
