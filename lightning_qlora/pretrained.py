"""Pretrained models at 4-bit cost: built on the meta device, their weights streamed from disk by the recipe.

``stream_pretrained(path)`` reads ``config.json``, builds the transformers model with every parameter on the meta
device (buffers such as rotary frequencies are computed as usual) and records where its weights are. The conversion
recipe (:mod:`lightning_qlora.convert`, run by ``QLoRAPlugin`` and the QLoRA strategies) then reads each linear's
weight straight to the training device, quantizes it and drops it before the next, and reads the other tensors in the
compute dtype: the full-precision model never exists, on the device or on the host. Plain torch + transformers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora.quant.checkpoint import CheckpointError, SafetensorsCheckpoint
from lightning_qlora.quant.streaming import CHECKPOINT_ATTR


def stream_pretrained(path: str | os.PathLike, model_class: Any = None, **config_overrides: Any) -> nn.Module:
    """A transformers model from the checkpoint directory ``path``, parameters on the meta device, weights on disk.

    Use it where the model would be loaded, e.g. in ``LightningModule.configure_model``; the QLoRA plugin's
    conversion reads the weights layer by layer. Loaded without the plugin, the model has no weights.

    Args:
        path: a directory with ``config.json`` and safetensors weights (one file or shards with their index).
        model_class: the transformers class to build (default: ``AutoModelForCausalLM``), e.g.
            ``AutoModelForSequenceClassification``.
        **config_overrides: set on the config before the model is built (e.g. ``attn_implementation="sdpa"``).

    Returns:
        The model in train mode, on the meta device but for its non-persistent buffers.

    Raises:
        CheckpointError: a missing or unreadable ``config.json``, an architecture the installed transformers does not
            know, or missing / damaged weight files (checked before anything is built).

    Example:
        >>> model = stream_pretrained("/models/llama-2-7b")  # doctest: +SKIP
        >>> trainer = Trainer(strategy="qlora", plugins=[QLoRAPlugin()])  # converts it on the GPU, layer by layer
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{config_file} is missing: {directory} is not a transformers model directory (config.json + weights)."
        )
    checkpoint = SafetensorsCheckpoint(directory)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError) as err:
        message = str(err).splitlines()[0][:300]
        raise CheckpointError(
            f"{config_file} cannot be used by the installed transformers ({type(err).__name__}: {message}). An "
            "architecture this transformers does not know needs a newer one: pip install -U transformers."
        ) from None
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with parameters_on_meta():
        model = (model_class or AutoModelForCausalLM).from_config(config)
    model.config._name_or_path = str(directory)
    if (directory / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)  # as from_pretrained would
    setattr(model, CHECKPOINT_ATTR, checkpoint)
    return model.train()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside, every parameter a module registers goes to the meta device (no memory, no initialization cost);
    buffers are built where they would be, so values computed in ``__init__`` (rotary frequencies) are real.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign, assignment]
    try:
        with torch.device("cpu"):
            yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
