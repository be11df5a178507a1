"""Save a quantized base in transformers' bitsandbytes 4-bit format, so transformers, PEFT and vLLM load it.

The directory holds ``config.json`` (with a ``quantization_config`` that says ``load_in_4bit``), safetensors weights
(shards with an index when large) where each 4-bit linear is its packed bytes plus bitsandbytes' quant-state tensors
(``weight.absmax``, ``weight.quant_map``, ``weight.nested_*``, ``weight.quant_state.bitsandbytes__nf4``), and the
other tensors as they are. The base's fingerprint (a hash of its full-precision weights, which are not there any
more) goes into the safetensors header, so adapters trained on the saved base still match the original. Plain torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora._atomic import output_directory, write_file_atomically
from lightning_qlora.modules import adapter_root, is_adapter_parameter, iter_linears, strip_base_layer
from lightning_qlora.quant.checkpoint import INDEX_FILE
from lightning_qlora.quant.fingerprint import WEIGHTS_HASH_ATTR
from lightning_qlora.quant.quantize import CALIBRATION_ATTR
from lightning_qlora.quant.streaming import METADATA_KEY
from lightning_qlora.quant.weight import is_quantized_linear, quant_state_of

MAX_SHARD_SIZE = "4GB"


def save_quantized(model: nn.Module, directory: str | os.PathLike, max_shard_size: str = MAX_SHARD_SIZE) -> Path:
    """Write ``model``'s quantized base (adapters left out) to ``directory`` in transformers' 4-bit format.

    Args:
        model: a transformers model (or a LightningModule holding one in ``.model``) whose linears are 4-bit.
        directory: created if needed; the files written there replace their namesakes one by one (each atomically),
            other files are left alone.
        max_shard_size: the largest safetensors file before the weights are split into shards with an index.

    Returns:
        The directory.

    Raises:
        ValueError: when the model has no 4-bit linear or is not a transformers model (no ``config``).

    Example:
        >>> save_quantized(model, "llama-7b-nf4")  # doctest: +SKIP
        >>> AutoModelForCausalLM.from_pretrained("llama-7b-nf4")  # doctest: +SKIP
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    root: Any = adapter_root(model)
    quantized = [(strip_base_layer(name), m) for name, m in iter_linears(root) if is_quantized_linear(m)]
    if not quantized or not hasattr(root, "config"):
        raise ValueError(
            f"save_quantized needs a transformers model with 4-bit linears, got {type(root).__name__} with "
            f"{len(quantized)} of them. Quantize it first (QLoRAPlugin, convert_model or quantize_model)."
        )
    target = output_directory(directory)
    state = _base_state_dict(root)
    facts = {
        "weights_sha256": getattr(root, WEIGHTS_HASH_ATTR, None),
        "calibration": getattr(root, CALIBRATION_ATTR, "none"),
    }
    metadata = {"format": "pt", METADATA_KEY: json.dumps(facts, sort_keys=True)}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state[name] for name in names}

        def write_shard(path: Path, shard: dict[str, torch.Tensor] = shard) -> None:
            save_file(shard, str(path), metadata=metadata)

        write_file_atomically(target / filename, write_shard)
    if split.is_sharded:
        index = {
            "metadata": {**split.metadata, "total_size": _total_bytes(state)},
            "weight_map": split.tensor_to_filename,
        }
        write_file_atomically(target / INDEX_FILE, lambda path: path.write_text(json.dumps(index, indent=2) + "\n"))
    config = root.config.__class__.from_dict(root.config.to_dict())
    config.quantization_config = _quantization_config(quantized[0][1], root)
    write_file_atomically(target / "config.json", lambda path: path.write_text(config.to_json_string()))
    generation = getattr(root, "generation_config", None)
    if generation is not None:
        text = generation.to_json_string()
        write_file_atomically(target / "generation_config.json", lambda path: path.write_text(text))
    return target


def _base_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """The base's tensors under the names an unadapted model gives them, packed bytes viewed as uint8, ties once."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...]]] = set()
    raw = root.state_dict()
    packed = {name[: -len(".quant_state.bitsandbytes__nf4")] for name in raw if name.endswith("__nf4")}
    packed |= {name[: -len(".quant_state.bitsandbytes__fp4")] for name in raw if name.endswith("__fp4")}
    for name, tensor in raw.items():
        if is_adapter_parameter(name):
            continue
        tensor = tensor.detach()
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and identity in seen:
            continue  # a tied weight (the head sharing the embedding): stored once, as transformers does
        seen.add(identity)
        if name in packed and tensor.dtype != torch.uint8:
            tensor = tensor.contiguous().view(torch.uint8).reshape(-1, 1)  # bf16-stored bytes (FSDP) as uint8
        state[name.replace(".base_layer.", ".")] = tensor.contiguous().cpu()
    return state


def _quantization_config(layer: nn.Module, root: nn.Module) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    state = quant_state_of(layer)
    skipped = sorted(
        {strip_base_layer(n).rpartition(".")[2] for n, m in iter_linears(root) if not is_quantized_linear(m)}
    )
    compute = getattr(layer, "compute_dtype", None) or torch.bfloat16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=state.quant_type,
        bnb_4bit_use_double_quant=bool(state.nested),
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage="uint8",
        llm_int8_skip_modules=skipped or None,
    )
    return config.to_dict()


def _total_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())
