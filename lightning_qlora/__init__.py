"""lightning_qlora: QLoRA fine-tuning for PyTorch Lightning as a one-line change.

>>> from lightning.pytorch import Trainer
>>> from lightning_qlora import QLoRAPlugin
>>> trainer = Trainer(plugins=[QLoRAPlugin()])  # doctest: +SKIP

The public names below are loaded on first use (PEP 562): ``lightning_qlora.quant``, ``.lora``, ``.calibration``,
``.convert`` and ``.optim`` are plain torch and import without Lightning; the Lightning names (``QLoRAPlugin``, the
strategies, the callbacks) need it, and the app and tools need the ``[app]`` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "AdamW8bit": "lightning_qlora.optim.adamw8bit",
    "AdapterCheckpoint": "lightning_qlora.lightning.callbacks",
    "CalibrationError": "lightning_qlora.calibration",
    "CalibrationResult": "lightning_qlora.calibration",
    "ConfigError": "lightning_qlora.config",
    "ConversionSummary": "lightning_qlora.convert",
    "ErrorCorrectingInit": "lightning_qlora.calibration",
    "HostOffload": "lightning_qlora.kernels.offload",
    "LoRAConfig": "lightning_qlora.config",
    "LoRALinear": "lightning_qlora.lora",
    "MemoryBudgetError": "lightning_qlora.memory_plan",
    "MemoryPlan": "lightning_qlora.memory_plan",
    "OptimizerInBackward": "lightning_qlora.optim.in_backward",
    "PeakMemoryMonitor": "lightning_qlora.lightning.callbacks",
    "QLoRADDPStrategy": "lightning_qlora.lightning.strategies",
    "QLoRAError": "lightning_qlora.errors",
    "QLoRAFSDPStrategy": "lightning_qlora.lightning.strategies",
    "QLoRAPlugin": "lightning_qlora.lightning.plugin",
    "QLoRAStrategy": "lightning_qlora.lightning.strategies",
    "QuantConfig": "lightning_qlora.config",
    "QuantStorageMismatchError": "lightning_qlora.sharding",
    "QuantizationReport": "lightning_qlora.quant",
    "ResumeMismatchError": "lightning_qlora.lightning.plugin",
    "calibrate": "lightning_qlora.calibration",
    "calibrated_weights": "lightning_qlora.calibration",
    "causal_lm_loss": "lightning_qlora.kernels.chunked_loss",
    "convert_model": "lightning_qlora.convert",
    "inject_lora": "lightning_qlora.lora",
    "iter_converted_blocks": "lightning_qlora.convert",
    "load_adapter": "lightning_qlora.lora",
    "lora_state_dict": "lightning_qlora.lora",
    "mark_only_lora_as_trainable": "lightning_qlora.lora",
    "merge_lora": "lightning_qlora.lora",
    "offload_block_inputs": "lightning_qlora.kernels.offload",
    "plan_memory": "lightning_qlora.memory_plan",
    "preferred_compute_dtype": "lightning_qlora.hardware",
    "quantize_model": "lightning_qlora.quant",
    "save_adapter": "lightning_qlora.lora",
    "save_quantized": "lightning_qlora.quant.save",
    "stream_pretrained": "lightning_qlora.pretrained",
    "tile_block_mlps": "lightning_qlora.kernels.tiled_mlp",
    "unmerge_lora": "lightning_qlora.lora",
}

__all__ = [
    "AdamW8bit",
    "AdapterCheckpoint",
    "CalibrationError",
    "CalibrationResult",
    "ConfigError",
    "ConversionSummary",
    "ErrorCorrectingInit",
    "HostOffload",
    "LoRAConfig",
    "LoRALinear",
    "MemoryBudgetError",
    "MemoryPlan",
    "OptimizerInBackward",
    "PeakMemoryMonitor",
    "QLoRADDPStrategy",
    "QLoRAError",
    "QLoRAFSDPStrategy",
    "QLoRAPlugin",
    "QLoRAStrategy",
    "QuantConfig",
    "QuantStorageMismatchError",
    "QuantizationReport",
    "ResumeMismatchError",
    "calibrate",
    "calibrated_weights",
    "causal_lm_loss",
    "convert_model",
    "inject_lora",
    "iter_converted_blocks",
    "load_adapter",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "offload_block_inputs",
    "plan_memory",
    "preferred_compute_dtype",
    "quantize_model",
    "save_adapter",
    "save_quantized",
    "stream_pretrained",
    "tile_block_mlps",
    "unmerge_lora",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_qlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _register_strategies() -> None:
    """Make ``Trainer(strategy="qlora" | "qlora_ddp" | "qlora_fsdp")`` work as soon as the package is imported.

    Lightning's registry is filled when the strategy classes are defined, so this imports them, but only where
    Lightning is installed: the plain-torch core stays usable without it.
    """
    try:
        importlib.import_module("lightning_qlora.lightning.strategies")
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] not in ("lightning", "pytorch_lightning"):
            raise


_register_strategies()

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from lightning_qlora.calibration import (
        CalibrationError,
        CalibrationResult,
        ErrorCorrectingInit,
        calibrate,
        calibrated_weights,
    )
    from lightning_qlora.config import ConfigError, LoRAConfig, QuantConfig
    from lightning_qlora.convert import ConversionSummary, convert_model, iter_converted_blocks
    from lightning_qlora.errors import QLoRAError
    from lightning_qlora.kernels.chunked_loss import causal_lm_loss
    from lightning_qlora.kernels.offload import HostOffload, offload_block_inputs
    from lightning_qlora.kernels.tiled_mlp import tile_block_mlps
    from lightning_qlora.lightning.callbacks import AdapterCheckpoint, PeakMemoryMonitor
    from lightning_qlora.lightning.plugin import QLoRAPlugin, ResumeMismatchError
    from lightning_qlora.lightning.strategies import QLoRADDPStrategy, QLoRAFSDPStrategy, QLoRAStrategy
    from lightning_qlora.lora import (
        LoRALinear,
        inject_lora,
        load_adapter,
        lora_state_dict,
        mark_only_lora_as_trainable,
        merge_lora,
        save_adapter,
        unmerge_lora,
    )
    from lightning_qlora.memory_plan import MemoryBudgetError, MemoryPlan, plan_memory
    from lightning_qlora.optim.adamw8bit import AdamW8bit
    from lightning_qlora.optim.in_backward import OptimizerInBackward
    from lightning_qlora.pretrained import stream_pretrained
    from lightning_qlora.quant import QuantizationReport, quantize_model
    from lightning_qlora.quant.save import save_quantized
    from lightning_qlora.sharding import QuantStorageMismatchError
