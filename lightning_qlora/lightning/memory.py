"""The plugin's memory plan: made from the converted model and applied to it, and compile turned off (loudly) where
the plan's measures must run eagerly.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_qlora.kernels.compile import CompileChoice
from lightning_qlora.memory_plan import (
    MemoryPlan,
    apply_memory_plan,
    eager_memory_measures,
    is_checkpointing,
    plan_memory,
)
from lightning_qlora.sharding import is_sharded

#: Attribute under which a planned model keeps its plan: a second conversion pass neither plans nor applies again.
PLAN_ATTR = "_lightning_qlora_memory_plan"


def plan_and_apply(
    module: nn.Module, root: nn.Module, budget_gib: float, tokens: int | None, dtype: torch.dtype,
    device: torch.device,
) -> MemoryPlan:
    """Plan ``root`` (the converted model of LightningModule ``module``, on ``device``) into ``budget_gib`` for
    batches of ``tokens`` tokens, apply the plan and log it. Sharded (FSDP) models get checkpointing only.

    Raises:
        ValueError: when the batch size is unknown (``tokens`` None), naming the fix.
        MemoryBudgetError: when nothing fits, naming the largest batch that would.
    """
    planned = getattr(root, PLAN_ATTR, None)
    if isinstance(planned, MemoryPlan):
        return planned  # converted and planned before (fit after validate, or the strategy's second pass)
    if tokens is None:
        raise ValueError(
            f"QLoRAPlugin(memory_budget_gib={budget_gib}) plans for the largest batch, but its size is unknown: pass "
            "QLoRAPlugin(max_batch_tokens=rows x tokens per row), or give the datamodule a max_batch_tokens attribute."
        )
    sharded = any(is_sharded(p) for p in root.parameters())
    plan = plan_memory(
        root, budget_gib, int(tokens), dtype=dtype, chunked_loss=bool(getattr(module, "chunked_loss", False)),
        checkpointing_on=is_checkpointing(root), offload_possible=not sharded, tiling_possible=not sharded,
    )
    apply_memory_plan(root, plan, device)
    setattr(root, PLAN_ATTR, plan)
    rank_zero_info(plan.as_text() + ("" if not sharded else " (sharded: checkpointing only)"))
    return plan


def eager_for_memory_measures(root: nn.Module, compile: CompileChoice) -> CompileChoice:
    """``compile``, or eager when the model's blocks offload their inputs or tile their MLPs: a compiled block takes
    over its checkpoint function (which is what offloads) and would trace the tiles' autograd node.
    """
    measures = eager_memory_measures(root)
    if not measures or compile.kwargs is None:
        return compile
    rank_zero_warn(f"{' and '.join(measures)} run eagerly: torch.compile ({compile.reason}) is off for this run.")
    return CompileChoice(None, f"eager: {' and '.join(measures)} run outside torch.compile")
