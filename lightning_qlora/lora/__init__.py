"""What trains: the LoRA/DoRA layer, injecting and merging adapters, their state, the PEFT adapter format.

Plain torch; importing it never imports Lightning.
"""

from lightning_qlora.lora.inject import (
    inject_lora,
    iter_lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    select_targets,
    target_names,
    unmerge_lora,
    wrap_linears,
)
from lightning_qlora.lora.layer import ADAPTER_DTYPE, LoRALinear
from lightning_qlora.lora.peft_format import (
    AdapterFormatError,
    adapter_state_dict,
    load_adapter,
    read_adapter_metadata,
    save_adapter,
)
from lightning_qlora.lora.state import load_trainable_state_dict, trainable_state_dict

__all__ = [
    "ADAPTER_DTYPE",
    "AdapterFormatError",
    "LoRALinear",
    "adapter_state_dict",
    "inject_lora",
    "iter_lora_layers",
    "load_adapter",
    "load_trainable_state_dict",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "read_adapter_metadata",
    "save_adapter",
    "select_targets",
    "target_names",
    "trainable_state_dict",
    "unmerge_lora",
    "wrap_linears",
]
