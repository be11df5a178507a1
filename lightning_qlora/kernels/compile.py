"""``torch.compile`` the transformer blocks of a converted model, block by block.

Compiling blocks (not the whole model) keeps each graph to one block, leaves the embeddings, head and loss outside,
and works with per-block activation checkpointing. bitsandbytes' 4-bit ops are registered torch ops, so inductor
fuses the element-wise work around them (norms, rotary embeddings, activations, residual adds) and the step issues
far fewer kernels. Measured speed-ups are in ``benchmarks/README.md``.

Without activation checkpointing, a compiled block also runs under a selective-checkpoint policy that marks
bitsandbytes' dequantize ops "must recompute". Without it, AOT autograd's joint graph merges the backward's
dequantize with the forward's (the same call on the same packed weight) and inductor's min-cut partitioner then
saves every layer's bf16 weight for backward: a 7B model without checkpointing peaked at 24.92 GiB compiled against
17.49 GiB eager on the H200. With the policy the backward dequantizes again from the 4-bit weight (a few ms per step
on the H200) and only activations are saved.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lightning_qlora.quantize import has_quantized_linears
from lightning_qlora.sharding import shard_units


def compile_blocks(root: nn.Module, recompute_dequantize: bool = True, **compile_kwargs: Any) -> list[str]:
    """``torch.compile`` each transformer block of ``root`` in place (``nn.Module.compile``); returns their names.

    Args:
        root: the model (e.g. a transformers causal LM).
        recompute_dequantize: when a block is not activation-checkpointed, have its backward dequantize the 4-bit
            weights again instead of saving them in bf16 (see the module docstring); ``False`` only to compare.
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
            if recompute_dequantize:
                _recompute_dequantize_in_backward(block)
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


def dequantize_ops() -> frozenset[Any]:
    """bitsandbytes' dequantize ops (every overload of ``dequantize_4bit`` and ``dequantize_blockwise``, the latter
    for double-quantized constants); empty when bitsandbytes registered none."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    ops = []
    for name in ("dequantize_4bit", "dequantize_blockwise"):
        packet = getattr(torch.ops.bitsandbytes, name, None)
        if packet is not None:
            ops.extend(getattr(packet, overload) for overload in packet.overloads())
    return frozenset(ops)


def recompute_dequantize_policy(ops: frozenset[Any]) -> Any:
    """A selective-checkpoint policy: ``ops`` must be recomputed in backward, everything else may be saved."""

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_RECOMPUTE if func in ops else CheckpointPolicy.PREFER_SAVE

    return policy


def _recompute_dequantize_in_backward(block: nn.Module) -> None:
    """Route ``block``'s forward through a selective checkpoint that recomputes only the dequantize ops, whenever
    it runs with gradients and without its own (full) activation checkpointing.

    The wrapper is an instance attribute, so ``nn.Module.__call__`` (and the compiled call around it) runs it; the
    class's forward, transformers' checkpointing wrapper included, runs inside.
    """
    if not has_quantized_linears(block):
        return  # nothing to dequantize (bf16 LoRA): no wrapper
    ops = dequantize_ops()
    if not ops:
        return
    forward = block.forward
    context_fn = functools.partial(create_selective_checkpoint_contexts, recompute_dequantize_policy(ops))

    @functools.wraps(forward)
    def forward_recomputing_dequantize(*args: Any, **kwargs: Any) -> Any:
        checkpointed = getattr(block, "gradient_checkpointing", False) and block.training
        if not torch.is_grad_enabled() or checkpointed:
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = forward_recomputing_dequantize
