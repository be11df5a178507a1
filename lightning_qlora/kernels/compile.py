"""``torch.compile`` the transformer blocks of a converted model, block by block.

Compiling blocks (not the whole model) keeps each graph to one block, leaves the embeddings, head and loss outside,
and works with per-block activation checkpointing. bitsandbytes' 4-bit ops are registered torch ops, so inductor
fuses the element-wise work around them (norms, rotary embeddings, activations, residual adds) and the step issues
far fewer kernels. Measured speed-ups are in ``benchmarks/README.md``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_qlora.sharding import shard_units


def compile_blocks(root: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` each transformer block of ``root`` in place (``nn.Module.compile``); returns their names.

    Args:
        root: the model (e.g. a transformers causal LM).
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).

    Raises:
        ValueError: when the model has no repeated blocks (no ``nn.ModuleList`` of layers holding linears).
    """
    blocks = shard_units(root)
    if not blocks:
        raise ValueError(
            f"{type(root).__name__} has no transformer blocks to compile (no nn.ModuleList of layers with linear "
            "layers). Compile the model yourself with torch.compile, or leave compile off."
        )
    for _, block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(**compile_kwargs)
    config = getattr(root, "config", None)
    if getattr(config, "use_cache", False):
        # transformers builds a KV cache in every forward by default, training included (checkpointing turns it
        # off, nothing else does). Each block updates its own layer of the cache, and the compiled block guards on
        # that layer's state, so block after block recompiled up to torch.compile's limit (8) and the rest ran
        # eagerly: seen on a 7B model without checkpointing (TORCH_LOGS=recompiles), where compile gave no speed-up.
        # Training never reads the cache; generate() still caches (it passes use_cache from its generation config).
        config.use_cache = False
    return [name for name, _ in blocks]
