"""lightning_qlora: QLoRA fine-tuning for PyTorch Lightning as a one-line change.

>>> from lightning.pytorch import Trainer
>>> from lightning_qlora import QLoRAPlugin
>>> trainer = Trainer(plugins=[QLoRAPlugin()])  # doctest: +SKIP
"""

from lightning_qlora.adapters import load_adapter, save_adapter
from lightning_qlora.calibration import CalibrationError, calibrated_weights
from lightning_qlora.callbacks import AdapterCheckpoint, PeakMemoryMonitor
from lightning_qlora.config import ConfigError, LoRAConfig, QuantConfig
from lightning_qlora.lora import LoRALinear, inject_lora, lora_state_dict, mark_only_lora_as_trainable
from lightning_qlora.lora_init import ErrorCorrectingInit
from lightning_qlora.optim_8bit import AdamW8bit
from lightning_qlora.optim_in_backward import OptimizerInBackward
from lightning_qlora.precision import QLoRAPlugin
from lightning_qlora.quantize import QuantizationReport, quantize_model
from lightning_qlora.sharding import QuantStorageMismatchError
from lightning_qlora.strategy import QLoRADDPStrategy, QLoRAFSDPStrategy, QLoRAStrategy

__version__ = "0.1.0"

__all__ = [
    "AdamW8bit",
    "AdapterCheckpoint",
    "CalibrationError",
    "ConfigError",
    "ErrorCorrectingInit",
    "LoRAConfig",
    "LoRALinear",
    "OptimizerInBackward",
    "PeakMemoryMonitor",
    "QLoRAPlugin",
    "QLoRADDPStrategy",
    "QLoRAFSDPStrategy",
    "QLoRAStrategy",
    "QuantConfig",
    "QuantStorageMismatchError",
    "QuantizationReport",
    "calibrated_weights",
    "inject_lora",
    "load_adapter",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "quantize_model",
    "save_adapter",
]
