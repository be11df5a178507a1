"""PEFT's ``adapter_config.json``: written from our adapters, read into a :class:`LoRAConfig`, refused when it
describes an adapter this library would compute differently. Plain torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_qlora.config import LoRAConfig
from lightning_qlora.errors import QLoRAError
from lightning_qlora.lora.heads import modules_to_save_of
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.lora.router import is_router_target
from lightning_qlora.modules import FAN_IN_FAN_OUT
from lightning_qlora.quant.experts import EXPERT_WEIGHT_NAMES

ADAPTER_CONFIG = "adapter_config.json"


class AdapterFormatError(QLoRAError, ValueError):
    """An adapter directory is missing a file, is truncated or corrupted, or does not fit the model."""


# adapter_config.json fields PEFT (0.13 - 0.21) writes for LoRA. A field outside this set is refused: it may change
# what the adapter computes in a way this library would silently ignore.
KNOWN_PEFT_FIELDS = frozenset(
    [
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "astra_config", "auto_mapping",
        "base_model_name_or_path", "bias",
        "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
        "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
        "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
        "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size", "r", "rank_pattern",
        "revision", "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices",
        "use_bdlora", "use_dora", "use_qalora", "use_rslora", "velora_config",
    ]
)
# Fields that, when set to anything but their default, describe an adapter this library cannot reproduce.
_UNSUPPORTED_IF_SET: dict[str, Any] = {
    "bias": "none", "layers_to_transform": None,
    "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
    "trainable_token_indices": None, "use_qalora": False, "use_bdlora": False,
    "alora_invocation_tokens": None, "exclude_modules": None,
}


# PEFT inits that change the base weights along with the adapter (an adapter trained so needs that changed base).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga")


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


def peft_config_dict(
    root: nn.Module, layers: list[tuple[str, LoRALinear]], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT's ``LoraConfig`` reads."""
    first = layers[0][1]
    targets = sorted({name.rpartition(".")[2] for name, _ in layers})
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    expert_targets = _expert_targets(root)
    if expert_targets:
        dropout = 0.0  # PEFT refuses dropout beside target_parameters; it only matters in training
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": peft_task_type(root),
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.lora_alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        # GPT-2-style Conv1D layers store [in, out]; PEFT must know (it warns and sets it itself otherwise).
        "fan_in_fan_out": any(getattr(layer.base_layer, FAN_IN_FAN_OUT, False) for _, layer in layers),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": modules_to_save_of(root) or None,
        # MoE expert weights, in the order PEFT must nest its wrappers (lora.experts.peft_expert_tensors' keys).
        "target_parameters": expert_targets or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _expert_targets(root: nn.Module) -> list[str]:
    """PEFT ``target_parameters`` entries for the adapted experts (``experts.gate_up_proj``, ``experts.down_proj``) and
    routers (``mlp.gate.weight``).
    """
    from lightning_qlora.lora.experts import expert_factors, is_adapted_experts
    from lightning_qlora.lora.router import is_adapted_router, iter_routers, peft_router_target
    from lightning_qlora.quant.experts import expert_weight_names, iter_experts

    found: list[str] = []
    for name, module in iter_experts(root):
        if is_adapted_experts(module):
            short = name.rpartition(".")[2]
            found += [f"{short}.{w}" for w in expert_weight_names(module) if w in expert_factors(module)[0]]
    found += [peft_router_target(name) for name, module in iter_routers(root) if is_adapted_router(module)]
    return list(dict.fromkeys(found))


# PEFT's task types by the transformers head class's suffix: PeftModel.from_pretrained builds the matching wrapper
# (for SEQ_CLS it also treats classifier/score as modules_to_save, as we do).
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
)


def peft_task_type(root: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``root`` (``None`` for a model that is not a transformers task model)."""
    name = type(root).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    if getattr(getattr(root, "config", None), "is_encoder_decoder", False) and hasattr(root, "generate"):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM" if hasattr(root, "generate") else None


def lora_config_from_peft(config: dict[str, Any], source: Path | str = ADAPTER_CONFIG) -> LoRAConfig:
    """A :class:`LoRAConfig` from PEFT's ``adapter_config.json`` fields."""
    # A field a newer PEFT writes at its empty default (e.g. PEFT 0.22's astra_config: null) describes nothing new.
    unknown = sorted(k for k in set(config) - KNOWN_PEFT_FIELDS if config[k] not in (None, False, {}, []))
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
    parameters = config.get("target_parameters") or []
    odd = [p for p in parameters if not isinstance(p, str)
           or (p.rpartition(".")[2] not in EXPERT_WEIGHT_NAMES and not is_router_target(p))]
    if odd:
        raise AdapterFormatError(
            f"{source}: target_parameters={odd!r}: lightning_qlora adapts MoE expert weights "
            f"({', '.join(EXPERT_WEIGHT_NAMES)}) and routers (mlp.gate.weight, mlp.router.weight) this way, not "
            "other parameters."
        )
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
            modules_to_save=config.get("modules_to_save") or (),
            target_experts=any(not is_router_target(p) for p in parameters),
            target_router=any(is_router_target(p) for p in parameters),
        )
    except ValueError as err:
        raise AdapterFormatError(f"{source}: {err}") from None
