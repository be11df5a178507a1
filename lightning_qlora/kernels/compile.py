"""``torch.compile`` the transformer blocks of a converted model, block by block.

Compiling blocks (not the whole model) keeps each graph to one block, leaves the embeddings, head and loss outside,
and works with per-block activation checkpointing. bitsandbytes' 4-bit ops are registered torch ops, so inductor
fuses the element-wise work around them (norms, rotary embeddings, activations, residual adds) and the step issues
far fewer kernels.

Activation checkpointing happens inside the compiled region. transformers checkpoints a layer in its ``__call__``
(up to 5.17) or its ``forward`` (later); a compiled block takes that over (the layer's checkpoint function becomes a
pass-through, the block's own forward checkpoints when ``gradient_checkpointing`` is on), so one compiled graph holds
the forward and another the recompute and backward, whatever the transformers version. A recompute outside the
compiled region would replay the compiled forward during backward, which CUDA graphs (``mode="reduce-overhead"``)
cannot do. The checkpoint is a selective one whose policy makes every op "must recompute": with torch's plain
checkpoint (ops only "prefer" recompute) inductor may recompute nothing and keep each layer's bf16 weights and
activations.

Without activation checkpointing, a compiled block runs under a selective-checkpoint policy that marks
bitsandbytes' dequantize ops "must recompute". Otherwise AOT autograd's joint graph merges the backward's dequantize
with the forward's (the same call on the same packed weight) and inductor's min-cut partitioner saves every layer's
bf16 weight for backward, which is what 4-bit storage exists to avoid. (Measurements: ``benchmarks/NOTES.md``.)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lightning_qlora._imports import import_bitsandbytes
from lightning_qlora.modules import find_blocks
from lightning_qlora.quant.weight import has_quantized_linears

log = logging.getLogger(__name__)


def compile_blocks(
    root: nn.Module, recompute_dequantize: bool = True, checkpointing: str = "must-recompute", **compile_kwargs: Any
) -> list[str]:
    """``torch.compile`` each transformer block of ``root`` in place (``nn.Module.compile``); returns their names.

    Args:
        root: the model (e.g. a transformers causal LM).
        recompute_dequantize: when a block is not activation-checkpointed, have its backward dequantize the 4-bit
            weights again instead of saving them in bf16 (see the module docstring); ``False`` only to compare.
        checkpointing: how an activation-checkpointed block checkpoints inside the compiled region:
            ``"must-recompute"`` (a selective checkpoint recomputing every op) or ``"torch-default"`` (torch's plain
            checkpoint, which inductor may not honour; only to compare).
        **compile_kwargs: passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).

    Raises:
        ValueError: when the model has no repeated blocks (no ``nn.ModuleList`` of layers holding linears), or for
            an unknown ``checkpointing``.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"compile_blocks(checkpointing={checkpointing!r}): expected one of {CHECKPOINTING}.")
    blocks = find_blocks(root)
    if not blocks:
        raise ValueError(
            f"{type(root).__name__} has no transformer blocks to compile (no nn.ModuleList of layers with linear "
            "layers). Compile the model yourself with torch.compile, or leave compile off."
        )
    _allow_forward_side_effects_under_checkpoint()
    for _, block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            _checkpoint_inside_compiled_region(block, recompute_dequantize, checkpointing)
            block.compile(**compile_kwargs)
    config = getattr(root, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        # transformers builds a KV cache in every forward by default, training included (checkpointing turns it
        # off, nothing else does). Each block updates its own layer of the cache, and the compiled block guards on
        # that layer's state, so block after block recompiled up to torch.compile's limit (8) and the rest ran
        # eagerly: seen on a 7B model without checkpointing (TORCH_LOGS=recompiles), where compile gave no speed-up.
        # Training never reads the cache; generate() still caches (it passes use_cache from its generation config).
        config.use_cache = False
    return [name for name, _ in blocks]


def _allow_forward_side_effects_under_checkpoint() -> None:
    # transformers 5.25 wraps attention layers in the `kernels` package's forward, which sets a global (the kernel
    # routing) on every call. Inside the checkpoint a compiled block runs under, dynamo refuses that side effect, breaks
    # the graph and runs the whole block eagerly: compile silently did nothing (0 compiled graphs run, seen with
    # transformers 5.25 on CPU). The routing is Python state, not tensor work, so the recompute in backward does not
    # need it replayed; this switch (process-wide) tells dynamo so.
    config = torch._dynamo.config
    if hasattr(config, _SIDE_EFFECTS_SWITCH) and not getattr(config, _SIDE_EFFECTS_SWITCH):
        setattr(config, _SIDE_EFFECTS_SWITCH, True)
        log.info("torch.compile: torch._dynamo.config.%s = True (forward side effects in checkpointed blocks, such as "
                 "transformers' kernel routing, are not replayed in backward)", _SIDE_EFFECTS_SWITCH)


_SIDE_EFFECTS_SWITCH = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def dequantize_ops() -> frozenset[Any]:
    """Bitsandbytes' dequantize ops (every overload of ``dequantize_4bit`` and ``dequantize_blockwise``, the latter
    for double-quantized constants); empty when bitsandbytes registered none.
    """
    import_bitsandbytes()  # registers torch.ops.bitsandbytes

    ops: list[Any] = []
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


def recompute_everything_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Full activation checkpointing spelled as a selective policy: every op must be recomputed in backward."""
    return CheckpointPolicy.MUST_RECOMPUTE


#: How a compiled, activation-checkpointed block checkpoints (``compile_blocks(checkpointing=...)``).
CHECKPOINTING = ("must-recompute", "torch-default")


def run_in_place(function: Any, *args: Any) -> Any:
    """What a compiled transformers layer's checkpoint function becomes: it calls ``function`` (the block's own
    forward checkpoints instead, inside the compiled region).
    """
    return function(*args)


_COMPILED_LAYER_CLASSES: dict[type, type] = {}


def _compiled_layer_class(cls: type) -> type:
    """A subclass of a transformers checkpointing layer whose ``_gradient_checkpointing_func`` is always
    :func:`run_in_place` (what ``gradient_checkpointing_enable`` sets, before or after compiling, is ignored).
    """
    if cls not in _COMPILED_LAYER_CLASSES:
        hook = property(lambda self: run_in_place, lambda self, value: None)
        _COMPILED_LAYER_CLASSES[cls] = type(cls.__name__, (cls,), {
            "_gradient_checkpointing_func": hook, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        })
    return _COMPILED_LAYER_CLASSES[cls]


def _checkpoint_inside_compiled_region(block: nn.Module, recompute_dequantize: bool, checkpointing: str) -> None:
    """Route ``block``'s forward through the checkpoint it needs, inside the compiled call.

    With gradients: a checkpoint that recomputes every op when the block is activation-checkpointed
    (``block.gradient_checkpointing`` in training, transformers' switch); otherwise, for a block with 4-bit
    linears and ``recompute_dequantize``, the selective checkpoint that recomputes only the dequantize ops. The
    wrapper is an instance attribute, so ``nn.Module.__call__`` (and the compiled call around it) runs it. A
    transformers layer becomes an instance of a same-named subclass (see :func:`_compiled_layer_class`), so a
    compiled model pickles no more than any ``torch.compile``-d module does (its state dict is unchanged).
    """
    takes_over = hasattr(type(block), "gradient_checkpointing")  # a transformers GradientCheckpointingLayer
    if takes_over:
        block.__class__ = _compiled_layer_class(type(block))
    ops = dequantize_ops() if recompute_dequantize and has_quantized_linears(block) else frozenset()
    if not takes_over and not ops:
        return
    forward = block.forward
    selective = functools.partial(create_selective_checkpoint_contexts, recompute_dequantize_policy(ops))
    recompute_everything = functools.partial(create_selective_checkpoint_contexts, recompute_everything_policy)

    @functools.wraps(forward)
    def forward_in_compiled_region(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if takes_over and block.gradient_checkpointing and block.training:
            if checkpointing == "torch-default":
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, context_fn=recompute_everything, **kwargs)
        if ops:
            return checkpoint(forward, *args, use_reentrant=False, context_fn=selective, **kwargs)
        return forward(*args, **kwargs)

    block.forward = forward_in_compiled_region


@dataclass(frozen=True)
class CompileChoice:
    """What ``QLoRAPlugin(compile=...)`` resolved to for one run: ``torch.compile`` arguments (``None``: eager) and
    why, in words for the one line the plugin logs.
    """

    kwargs: dict[str, Any] | None
    reason: str


def choose_compile(setting: Any, device: torch.device, static_shapes: bool | None, distributed: bool) -> CompileChoice:
    """Resolve ``compile="auto"`` (explicit settings pass through unchanged).

    ``auto`` on CUDA compiles every block, with CUDA graphs (``mode="reduce-overhead"``) when every batch has one
    shape (``static_shapes``: packed rows), since a new shape means a new graph recorded; without them otherwise. The
    CPU, and DDP/FSDP (not measured compiled yet), keep the eager path.
    """
    if setting is False or setting is None:
        return CompileChoice(None, "compile=False")
    if setting != "auto":
        kwargs = {} if setting is True else dict(setting)
        return CompileChoice(kwargs, f"compile={setting!r} as asked")
    if device.type != "cuda":
        return CompileChoice(None, f"eager on {device.type} (compile='auto' compiles on CUDA only)")
    if distributed:
        return CompileChoice(None, "eager under DDP/FSDP (compile='auto' is measured on one device; compile=True to "
                                   "try it)")
    if static_shapes:
        return CompileChoice({"mode": "reduce-overhead"}, "compiled blocks with CUDA graphs: every batch has one "
                                                          "shape (packed rows)")
    return CompileChoice({}, "compiled blocks without CUDA graphs: batch shapes may vary (padded rows re-record a "
                             "graph per shape; packed data or static_batch_shapes=True enables them)")


@dataclass(frozen=True)
class CompileStats:
    """dynamo's and inductor's process-wide counters: graphs compiled (recompiles included), graph breaks (code
    run eagerly between graphs), CUDA-graph skips (graphs run without CUDA graphs).
    """

    graphs: int
    graph_breaks: int
    cudagraph_skips: int
    break_reasons: tuple[str, ...] = ()

    @classmethod
    def now(cls) -> CompileStats:
        from torch._dynamo.utils import counters

        breaks = counters["graph_break"]
        return cls(
            int(counters["stats"]["unique_graphs"]),
            int(sum(breaks.values())),
            int(counters["inductor"]["cudagraph_skips"]),
            tuple(reason for reason, _ in breaks.most_common(3)),
        )

    def as_metrics(self) -> dict[str, float]:
        return {"compile/graphs": float(self.graphs), "compile/graph_breaks": float(self.graph_breaks),
                "compile/cudagraph_skips": float(self.cudagraph_skips)}
