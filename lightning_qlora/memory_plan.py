"""Fit a training step into a memory budget: choose checkpointing, MLP tiling and activation offloading before the
first step, from the model's shapes and the tokens a batch holds. Plain torch.

The estimate is the peak of allocated device memory in one step, in parts:

- the model as it is (4-bit codes and their constants, embeddings, norms, adapters), the adapters' gradients and
  AdamW moments (fp32), and one linear's dequantized weight and its gradient's scratch;
- what the step keeps for backward: every block's activations, or with checkpointing only each block's input (none
  on the device for the offloaded blocks, but two on their way), plus what the loss keeps (below);
- the transient of one block's recompute and backward, in which the MLP's ``tokens x intermediate`` buffers shrink
  to one tile's when the MLP is tiled (and with the tiles, Llama-style norms keep no fp32 copy of their input:
  :mod:`lightning_qlora.kernels.lean_norm`);
- the loss: the whole sequence's logits (bf16, their fp32 copy and its gradient), or one chunk's with the chunked
  loss (:mod:`lightning_qlora.kernels.chunked_loss`, which keeps only the gradient of the last block's output).

The two transients (one block's backward, the loss) come one after the other: the peak holds the larger.

Per-token activation bytes are fitted to saved-tensor counts of Llama blocks (``tests/test_memory_plan.py`` measures
them): a block keeps ``e (5 hidden + 4 intermediate) + 8 hidden`` bytes a token in compute dtype of ``e`` bytes (its
norms keep fp32 copies). The plan asks for the cheapest choice that fits with ``HEADROOM`` to spare (the allocator's
fragmentation), in this order: nothing, checkpointing, checkpointing with MLP tiles, then offloading the fewest
blocks' inputs that fits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_qlora.errors import QLoRAError
from lightning_qlora.kernels.chunked_loss import CHUNK_BYTES
from lightning_qlora.kernels.lean_norm import lean_norms_possible
from lightning_qlora.modules import find_blocks
from lightning_qlora.quant.experts import expert_shape, expert_weight_names, experts_per_chunk, iter_experts
from lightning_qlora.quant.weight import is_quantized_linear, quant_state_of, state_nbytes

log = logging.getLogger(__name__)

GIB = 2**30
#: The share of the budget the plan leaves free (the caching allocator's fragmentation, the CUDA context's buffers).
HEADROOM = 0.1
#: The share of the host's available memory the offloaded inputs may take.
HOST_SHARE = 0.8
#: Tokens per MLP tile when the plan tiles.
MLP_TILE_TOKENS = 8192
#: Adapter bytes per trainable parameter besides the parameter: its fp32 gradient and AdamW's two fp32 moments.
OPTIMIZER_BYTES_PER_PARAM = 12


class MemoryBudgetError(QLoRAError, ValueError):
    """No combination of checkpointing, tiling and offloading fits the step into the memory budget."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads from a model: sizes from its config, bytes from its tensors."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    model_bytes: int
    trainable_params: int
    largest_linear: int
    eager_attention_heads: int  # heads of an attention that builds ``tokens x tokens`` scores (0: a fused kernel)
    lean_norms: bool = False  # every norm in the blocks is Llama's RMSNorm (kernels.lean_norm can replace them)

    @classmethod
    def of(cls, model: nn.Module, dtype: torch.dtype) -> ModelShape:
        """Read ``model``'s shape (a transformers model: its config's sizes).

        Raises:
            MemoryBudgetError: when the config lacks the sizes the estimate needs, naming them.
        """
        config: Any = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        blocks = find_blocks(model)
        sizes = {name: getattr(text, name, None) for name in ("hidden_size", "vocab_size")}
        intermediate = getattr(text, "intermediate_size", None)
        routed = getattr(text, "moe_intermediate_size", None)
        if routed and getattr(text, "num_experts_per_tok", None):
            intermediate = int(routed) * int(text.num_experts_per_tok) + int(intermediate or 0)
        missing = [n for n, v in sizes.items() if not v] + ([] if intermediate else ["intermediate_size"])
        if missing or not blocks:
            raise MemoryBudgetError(
                f"memory_budget_gib plans from a transformers model's config, but {type(model).__name__} has "
                f"{'no ' + ', '.join(missing) if missing else 'no repeated blocks'}. Leave memory_budget_gib unset "
                "and choose checkpointing yourself."
            )
        attention = str(getattr(config, "_attn_implementation", "") or "")
        model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        model_bytes += sum(state_nbytes(quant_state_of(m)) for m in model.modules() if is_quantized_linear(m))
        # Only a 4-bit linear is dequantized in the step (a kept head, e.g. lm_head, is used as it is); a packed
        # experts weight as many experts at a time as its chunks hold.
        linears = [int(m.in_features) * int(m.out_features)  # type: ignore[arg-type]
                   for m in model.modules() if is_quantized_linear(m)]
        for _, experts in iter_experts(model):
            for name in expert_weight_names(experts):
                state = getattr(experts._parameters[name], "quant_state", None)
                if state is not None:
                    model_bytes += state_nbytes(state)
                    _, rows, columns = expert_shape(experts, name)
                    linears.append(experts_per_chunk(experts, name, dtype) * rows * columns)
        return cls(
            layers=len(blocks), hidden=int(sizes["hidden_size"]), intermediate=int(intermediate),  # type: ignore[arg-type]
            vocab=int(sizes["vocab_size"]), dtype_bytes=torch.empty((), dtype=dtype).element_size(),  # type: ignore[arg-type]
            model_bytes=model_bytes, trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            largest_linear=max(linears, default=0),
            eager_attention_heads=int(getattr(text, "num_attention_heads", 0) or 0) if attention == "eager" else 0,
            lean_norms=lean_norms_possible([block for _, block in blocks]),
        )


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`plan_memory` chose, and the estimate behind it (bytes by part)."""

    budget_bytes: int
    tokens: int
    checkpointing: bool
    mlp_tile_tokens: int | None
    offloaded_blocks: int
    chunked_loss: bool
    layers: int
    estimate: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0  # page-locked host memory the offloaded inputs take

    @property
    def estimated_bytes(self) -> int:
        return peak_bytes(self.estimate)

    def describe_choices(self) -> str:
        parts = ["checkpointing every block" if self.checkpointing else "no checkpointing"]
        if self.mlp_tile_tokens:
            parts.append(f"MLPs in tiles of {self.mlp_tile_tokens:,} tokens, lean norms")
        if self.offloaded_blocks:
            parts.append(f"{self.offloaded_blocks} of {self.layers} blocks' inputs offloaded to host memory")
        parts.append("chunked loss" if self.chunked_loss else "whole-sequence logits")
        return ", ".join(parts)

    def as_text(self) -> str:
        """One line: the budget, the choices and the estimate by part (GiB)."""
        detail = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.estimate.items())
        host = f"; host memory for the offloaded inputs {self.host_bytes / GIB:.2f} GiB" if self.host_bytes else ""
        return (
            f"Memory plan for {self.budget_bytes / GIB:.1f} GiB at {self.tokens:,} tokens a batch: "
            f"{self.describe_choices()}; estimated peak {self.estimated_bytes / GIB:.2f} GiB ({detail}){host}"
        )

    def as_metrics(self) -> dict[str, float]:
        return {"memory_plan/estimated_gib": self.estimated_bytes / GIB,
                "memory_plan/budget_gib": self.budget_bytes / GIB,
                "memory_plan/checkpointing": float(self.checkpointing),
                "memory_plan/offloaded_blocks": float(self.offloaded_blocks),
                "memory_plan/mlp_tile_tokens": float(self.mlp_tile_tokens or 0),
                "memory_plan/host_gib": self.host_bytes / GIB}


def estimate_bytes(
    shape: ModelShape, tokens: int, *, checkpointing: bool, mlp_tile_tokens: int | None, offloaded_blocks: int,
    chunked_loss: bool,
) -> dict[str, int]:
    """The peak of one training step's allocated memory, by part (see the module docstring)."""
    e, h, inter, t = shape.dtype_bytes, shape.hidden, shape.intermediate, tokens
    mlp_tokens = min(t, mlp_tile_tokens) if mlp_tile_tokens else t
    # The block's two norms keep their fp32 inputs, or (lean norms, set with the tiles) their inputs as they are.
    norms = 2 * e * h if mlp_tile_tokens and shape.lean_norms else 8 * h
    per_block = (e * 5 * h + norms) * t + e * 4 * inter * mlp_tokens
    if shape.eager_attention_heads:
        per_block += shape.eager_attention_heads * t * t * (e + 4)  # the scores and their fp32 softmax
    if checkpointing:
        # The offloaded blocks are the first ones, needed last in backward: by then the kept inputs of the others
        # are gone, and two offloaded inputs are on the device (the one in use, the one on its way).
        kept_blocks = max(shape.layers - offloaded_blocks, min(2, offloaded_blocks)) * e * h * t
        # One block recomputed and taken back: its activations, the gradients of its widest ones.
        mlp_backward = e * (2 * h * t + 3 * inter * mlp_tokens) + (e * h * t if mlp_tile_tokens else 0)
        # Once the MLP is bounded the attention's backward sets the peak: its inputs and gradients in SDPA's layout
        # and the rotary temporaries, 12 x tokens x hidden in all (fitted to the Llama-3-8B shape on an H100 at 32k,
        # 196k and 262k tokens with every block offloaded: benchmarks/NOTES.md).
        transient = per_block + max(mlp_backward, 12 * e * h * t)
    else:
        kept_blocks = shape.layers * per_block
        transient = e * (2 * h * t + 3 * inter * mlp_tokens)
    if chunked_loss:
        # Kept: the gradient of the last block's output (the loss takes it in its forward, with the final norm).
        # Transient: that output itself and a chunk's fp32 logits three times over (logits, exponentials, gradient).
        outside = e * h * t
        loss = e * h * t + 3 * min(CHUNK_BYTES, 4 * shape.vocab * t)
    else:
        # Kept: the final norm's fp32 input and the head's input. Transient: the bf16 logits, their fp32 copy and
        # its gradient.
        outside = (4 + e) * h * t
        loss = t * shape.vocab * (e + 8)
    return {
        "model": shape.model_bytes,
        "optimizer": shape.trainable_params * OPTIMIZER_BYTES_PER_PARAM,
        "dequantized": 2 * e * shape.largest_linear,
        "kept activations": kept_blocks + outside,
        "block transient": transient,
        "loss": loss,
    }


#: Parts of the estimate that do not coexist: a block's backward runs after the loss's transient is gone.
TRANSIENT_PARTS = ("block transient", "loss")


def peak_bytes(estimate: dict[str, int]) -> int:
    """The peak an :func:`estimate_bytes` dict stands for: the lasting parts and the larger transient."""
    lasting = sum(v for k, v in estimate.items() if k not in TRANSIENT_PARTS)
    return lasting + max((estimate.get(k, 0) for k in TRANSIENT_PARTS), default=0)


def plan_memory(
    model: nn.Module, budget_gib: float, tokens: int, *, dtype: torch.dtype = torch.bfloat16,
    chunked_loss: bool = False, checkpointing_on: bool = False, mlp_tile_tokens: int = MLP_TILE_TOKENS,
    offload_possible: bool = True, tiling_possible: bool = True, host_bytes: int | None = None,
) -> MemoryPlan:
    """The cheapest of checkpointing, MLP tiling and offloading (in that order) whose estimated peak leaves
    ``HEADROOM`` of ``budget_gib`` free for a batch of ``tokens`` tokens.

    Args:
        model: the converted model (4-bit linears, adapters), on its device.
        budget_gib: the device memory the step may allocate at its peak, in GiB.
        tokens: tokens in the largest training batch (rows x tokens per row).
        dtype: the compute dtype.
        chunked_loss: whether the loss is taken in chunks (the LightningModule says).
        checkpointing_on: checkpointing is already on (asked for): the plan keeps it.
        mlp_tile_tokens: tokens per MLP tile when tiling.
        offload_possible: whether blocks' inputs can be offloaded (transformers checkpointing layers, not sharded).
        tiling_possible: whether MLPs can run in tiles (not sharded).
        host_bytes: host memory the offloaded inputs may take (page-locked); by default 80% of what the machine has
            available now. Offloading that needs more is not chosen.

    Raises:
        MemoryBudgetError: when nothing fits, naming the largest batch that would fit with everything on.
    """
    if budget_gib <= 0 or tokens < 1:
        raise ValueError(f"plan_memory(budget_gib={budget_gib}, tokens={tokens}): both must be positive.")
    shape = ModelShape.of(model, dtype)
    budget = int(budget_gib * GIB)
    usable = budget * (1 - HEADROOM)
    tile = mlp_tile_tokens if tiling_possible else None
    host = host_bytes if host_bytes is not None else int(HOST_SHARE * available_host_bytes())
    host_short = None
    for choice in _choices(shape.layers, checkpointing_on, tile, offload_possible):
        estimate = estimate_bytes(shape, tokens, chunked_loss=chunked_loss, **choice)
        if peak_bytes(estimate) <= usable:
            offloaded = offloaded_bytes(shape, tokens, choice["offloaded_blocks"])
            if offloaded > host:
                host_short = (choice["offloaded_blocks"], offloaded)
                break  # more offloading needs more host memory still
            return MemoryPlan(budget, tokens, chunked_loss=chunked_loss, layers=shape.layers, estimate=estimate,
                              host_bytes=offloaded, **choice)
    if host_short is not None:
        blocks, offloaded = host_short
        raise MemoryBudgetError(
            f"memory_budget_gib={budget_gib} holds a batch of {tokens:,} tokens only with {blocks} of "
            f"{shape.layers} blocks' inputs offloaded, {offloaded / GIB:.1f} GiB of page-locked host memory, but "
            f"{host / GIB:.1f} GiB is all the host can spare ({HOST_SHARE:.0%} of what is available now). Lower "
            "data.max_tokens (or rows per batch), raise the budget, or free host memory."
        )
    most = _choice(True, tile, shape.layers if offload_possible else 0)
    fits = _largest_fitting_tokens(shape, usable, chunked_loss=chunked_loss, **most)
    needed = peak_bytes(estimate_bytes(shape, tokens, chunked_loss=chunked_loss, **most)) / (1 - HEADROOM)
    raise MemoryBudgetError(
        f"memory_budget_gib={budget_gib} cannot hold a batch of {tokens:,} tokens: even with checkpointing"
        f"{', MLP tiles' if tile else ''} and "
        f"{'every block offloaded' if offload_possible else 'no offloading (not possible here)'} the step needs "
        f"about {needed / GIB:.1f} GiB. The largest batch that would fit is about {fits:,} tokens: lower "
        f"data.max_tokens (or rows per batch) to that, or raise the budget."
        + ("" if chunked_loss else " The chunked loss (chunked_loss=True) would also save the logits.")
    )


def offloaded_bytes(shape: ModelShape, tokens: int, offloaded_blocks: int) -> int:
    """Host memory the offloaded blocks' inputs take: one ``tokens x hidden`` tensor each, in compute dtype."""
    return offloaded_blocks * shape.dtype_bytes * shape.hidden * tokens


def available_host_bytes() -> int:
    """Memory the host can give now (Linux: ``MemAvailable``; elsewhere its free pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _choices(layers: int, checkpointing_on: bool, tile: int | None, offload_possible: bool) -> list[dict[str, Any]]:
    choices = [] if checkpointing_on else [_choice(False, None, 0)]
    choices.append(_choice(True, None, 0))
    if tile:
        choices.append(_choice(True, tile, 0))
    if offload_possible:
        choices.extend(_choice(True, tile, k) for k in range(1, layers + 1))
    return choices


def _choice(checkpointing: bool, tile: int | None, offloaded: int) -> dict[str, Any]:
    return {"checkpointing": checkpointing, "mlp_tile_tokens": tile, "offloaded_blocks": offloaded}


def _largest_fitting_tokens(shape: ModelShape, usable: float, **choice: Any) -> int:
    lo, hi = 0, 1
    while peak_bytes(estimate_bytes(shape, hi, **choice)) <= usable and hi < 2**31:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak_bytes(estimate_bytes(shape, mid, **choice)) <= usable else (lo, mid)
    return lo


def apply_memory_plan(model: nn.Module, plan: MemoryPlan, device: torch.device) -> list[str]:
    """Set ``model`` up as ``plan`` says: checkpointing on, MLPs tiled, the first ``plan.offloaded_blocks`` blocks'
    inputs kept in host memory (the earliest blocks' inputs wait longest for backward). Returns what changed, in
    words.
    """
    from lightning_qlora.kernels.lean_norm import use_lean_norms
    from lightning_qlora.kernels.offload import HostOffload, offload_block_inputs
    from lightning_qlora.kernels.tiled_mlp import tile_block_mlps

    blocks = [block for _, block in find_blocks(model)]
    changed = []
    if plan.checkpointing and not is_checkpointing(model):
        enable_checkpointing(model)
        changed.append("checkpointing turned on")
    if plan.mlp_tile_tokens:
        tiled = tile_block_mlps(blocks, plan.mlp_tile_tokens)
        changed.append(f"{len(tiled)} MLPs tiled")
        lean = use_lean_norms(blocks)
        changed.append(f"{lean} norms keep no fp32 copy")
    if plan.offloaded_blocks:
        offload_block_inputs(blocks[: plan.offloaded_blocks], HostOffload(device))
        changed.append(f"{plan.offloaded_blocks} blocks offloaded")
    return changed


def enable_checkpointing(model: nn.Module) -> None:
    """Turn transformers' activation checkpointing on for ``model`` (torch's non-reentrant checkpoint, each block).

    With a frozen base, the checkpointed blocks must see an input that requires grad: the embeddings' output is made
    to.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)  # (transformers >= 5.2x's name)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    model.enable_input_require_grads()  # type: ignore[operator]


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on for ``model``'s blocks (transformers' switch)."""
    switch = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else (
        "is_gradient_checkpointing")
    return bool(getattr(model, switch, False)) or any(
        getattr(block, "gradient_checkpointing", False) for _, block in find_blocks(model)
    )


def eager_memory_measures(model: nn.Module) -> list[str]:
    """The measures set on ``model``'s blocks that run outside ``torch.compile``, in words (empty: none)."""
    from lightning_qlora.kernels.offload import OffloadedCheckpoint
    from lightning_qlora.kernels.tiled_mlp import TILED_ATTR

    blocks = [block for _, block in find_blocks(model)]
    offloaded = sum(isinstance(getattr(b, "_gradient_checkpointing_func", None), OffloadedCheckpoint) for b in blocks)
    tiled = sum(getattr(m, TILED_ATTR, None) is not None for b in blocks for m in b.modules())
    measures = []
    if offloaded:
        measures.append(f"activation offloading ({offloaded} blocks)")
    if tiled:
        measures.append(f"MLP tiles ({tiled} MLPs)")
    return measures
