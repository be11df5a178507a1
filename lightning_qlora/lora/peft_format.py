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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora._atomic import output_directory, write_files_atomically, writer_lock
from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.errors import QLoRAError
from lightning_qlora.lora.inject import inject_lora, iter_lora_layers
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.modules import adapter_root, base_linears
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
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
_METADATA_KEY = "lightning_qlora"
# adapter_config.json fields PEFT (0.13 - 0.21) writes for LoRA. A field outside this set is refused: it may change
# what the adapter computes in a way this library would silently ignore.
KNOWN_PEFT_FIELDS = frozenset(
    [
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
        "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
        "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
        "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
        "revision", "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
        "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
    ]
)
# Fields that, when set to anything but their default, describe an adapter this library cannot reproduce.
_UNSUPPORTED_IF_SET = {
    "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
    "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
    "trainable_token_indices": None, "target_parameters": None, "use_qalora": False, "use_bdlora": False,
    "alora_invocation_tokens": None, "exclude_modules": None,
}


# PEFT inits that change the base weights along with the adapter (an adapter trained so needs that changed base).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")


class AdapterFormatError(QLoRAError, ValueError):
    """An adapter directory is missing a file, is truncated or corrupted, or does not fit the model."""


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
        "base_fingerprint": base_fingerprint(root, base_linears(root)),
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
    if not any(True for _ in iter_lora_layers(root)):
        if quant is not None and quant.quantized and not any(is_quantized_linear(m) for _, m in base_linears(root)):
            quantize_model(root, quant)
        # PEFT's "all-linear" never adapts the output head; neither do we unless the caller's QuantConfig says so.
        inject_lora(root, lora_config, skip_modules=(quant or QuantConfig()).skip_modules)
    _check_fingerprint(facts, root, path, strict)
    _warn_calibration_mismatch(facts, root, path)
    layers = dict(iter_lora_layers(root))
    expected = {f"{PEFT_PREFIX}{n}.{key}" for n, layer in layers.items() for key in adapter_tensors(layer)}
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
    return loaded


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``module`` under PEFT's keys, whole and on the CPU.

    Sharded (FSDP) adapters are all-gathered: under FSDP every rank must call this, in the same order.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in iter_lora_layers(adapter_root(module)):
        for key, tensor in adapter_tensors(layer).items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = full_tensor(tensor.detach()).cpu().contiguous()
    return tensors


def adapter_tensors(layer: LoRALinear) -> dict[str, torch.Tensor]:
    """The trainable tensors of one adapter under PEFT's key suffixes."""
    tensors = {"lora_A.weight": layer.lora_A.weight, "lora_B.weight": layer.lora_B.weight}
    if layer.use_dora:
        tensors["lora_magnitude_vector"] = layer.lora_magnitude_vector
    return tensors


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict.

    Raises:
        AdapterFormatError: a missing file, invalid JSON, bytes that are not UTF-8, or not a JSON object.
    """
    config_file = Path(directory) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterFormatError(f"{config_file} is missing: {directory} is not a complete PEFT adapter directory.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{config_file} is not valid JSON ({err.msg}, line {err.lineno}).") from None
    except UnicodeDecodeError as err:
        raise AdapterFormatError(
            f"{config_file} is not UTF-8 text (byte {err.start}: {err.reason}): it is damaged or not a PEFT adapter "
            "config. Restore it, or write it again with save_adapter."
        ) from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_file} must hold a JSON object, got {type(config).__name__}.")
    return config


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


def peft_config_dict(
    root: nn.Module, layers: list[tuple[str, LoRALinear]], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT's ``LoraConfig`` reads."""
    first = layers[0][1]
    targets = sorted({name.rpartition(".")[2] for name, _ in layers})
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(root, "generate") else None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def lora_config_from_peft(config: dict[str, Any], source: Path | str = ADAPTER_CONFIG) -> LoRAConfig:
    """A :class:`LoRAConfig` from PEFT's ``adapter_config.json`` fields."""
    unknown = sorted(set(config) - KNOWN_PEFT_FIELDS)
    if unknown:
        raise AdapterFormatError(
            f"{source}: unknown field(s) {unknown}. Known PEFT LoRA fields are e.g. r, lora_alpha, target_modules; "
            "was this file edited, or written by a newer PEFT? Remove the field if it is not needed."
        )
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{source}: peft_type={config.get('peft_type')!r}; only LORA adapters are supported.")
    unsupported = [
        f"{key}={config[key]!r}" for key, default in _UNSUPPORTED_IF_SET.items()
        if key in config and config[key] not in (default, None, {}, [], False) and config[key] != default
    ]
    if unsupported:
        raise AdapterFormatError(f"{source}: {', '.join(unsupported)} is not supported by lightning_qlora yet.")
    if "r" not in config:
        raise AdapterFormatError(f"{source}: the required field 'r' (adapter rank) is missing.")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterFormatError(
            f"{source}: init_lora_weights={init!r} trains an adapter for a base that PEFT rewrote at initialization "
            "(it subtracts the adapter's starting point from the weights): on the original base its outputs are "
            "other ones. Save it converted to a plain LoRA adapter in PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) and load that."
        )
    target = config.get("target_modules")
    if target is not None and not isinstance(target, (str, list)):
        raise AdapterFormatError(
            f"{source}: target_modules={target!r} must be a list of module names or a string, not "
            f"{type(target).__name__}."
        )
    if isinstance(target, str) and target != "all-linear":
        target_modules: Any = target
    elif target == "all-linear" or target is None:
        target_modules = "all-linear"
    else:
        target_modules = list(target)
    try:
        return LoRAConfig(
            r=config["r"],
            alpha=config.get("lora_alpha", config["r"]),
            dropout=config.get("lora_dropout", 0.0),
            target_modules=target_modules,
            use_rslora=config.get("use_rslora", False),
            use_dora=config.get("use_dora", False),
        )
    except ValueError as err:
        raise AdapterFormatError(f"{source}: {err}") from None


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
    current = base_fingerprint(root, base_linears(root))
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
