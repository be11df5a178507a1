"""LoRA on mixture-of-experts weights, and the experts' forward that dequantizes them on the fly.

Each 3-D expert weight ``W`` (``[experts, out, in]``; gpt-oss stores ``[experts, in, out]``) gets one adapter per
expert: ``lora_A[name]`` ``[experts, r, in]`` and ``lora_B[name]`` ``[experts, out, r]`` (fp32 master weights, ``B``
zero at the start), so expert ``e`` computes ``x W_e^T + scaling * x A_e^T B_e^T``. The experts module keeps its
class name and its router; its forward becomes :func:`grouped_experts_forward`: tokens sorted by expert, then one
grouped matmul per projection (``torch.nn.functional.grouped_mm``, on CUDA and the CPU) for the base (its 4-bit
weight dequantized for the call and again in backward, never kept) and two small ones for each adapter. No Python
loop over experts. PEFT loads these adapters through its ``target_parameters`` (``lora.ParamWrapper``);
:func:`peft_expert_tensors` writes its layout. Plain torch.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, cast

import torch
from torch import nn

from lightning_qlora.config import LoRAConfig
from lightning_qlora.quant import experts as quant_experts
from lightning_qlora.quant.experts import (
    expert_absmax,
    expert_shape,
    expert_weight,
    expert_weight_names,
    expert_weight_range,
    experts_per_chunk,
)

log = logging.getLogger(__name__)

# Attributes an adapted experts module carries (its adapters live in the ParameterDicts ``lora_A`` / ``lora_B``).
_SCALING = "lora_scaling"


def is_adapted_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ParameterDict) and hasattr(module, _SCALING)


def expert_factors(module: nn.Module) -> tuple[nn.ParameterDict, nn.ParameterDict]:
    """``(lora_A, lora_B)`` of an adapted experts module, keyed by expert weight name."""
    return cast(nn.ParameterDict, module.lora_A), cast(nn.ParameterDict, module.lora_B)


def in_out(module: nn.Module, name: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of one expert's matrix of weight ``name``."""
    _, rows, cols = expert_shape(module, name)
    return (rows, cols) if getattr(module, "is_transposed", False) else (cols, rows)


def adapt_experts(module: nn.Module, config: LoRAConfig) -> list[str]:
    """Give each 3-D expert weight of ``module`` per-expert LoRA factors (``B`` zero, ``A`` Kaiming-uniform per expert,
    as ``nn.Linear`` initializes); returns the weight names adapted. Dropout is not applied on experts (the input of
    an expert's adapter is shared with its base matmul), and DoRA is not available for them: both are logged.
    """
    names = expert_weight_names(module)
    if not names or is_adapted_experts(module):
        return []
    device = next(t.device for t in module.parameters())
    experts = expert_shape(module, names[0])[0]
    lora_a, lora_b = nn.ParameterDict(), nn.ParameterDict()
    for name in names:
        fan_in, fan_out = in_out(module, name)
        a = torch.empty(experts, config.r, fan_in, device=device)
        for e in range(experts):  # what nn.Linear(fan_in, r) draws, expert by expert
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        lora_a[name] = nn.Parameter(a)
        lora_b[name] = nn.Parameter(torch.zeros(experts, fan_out, config.r, device=device))
    module.lora_A = lora_a
    module.lora_B = lora_b
    setattr(module, _SCALING, config.scaling)
    _notes_once(config)
    use_grouped_forward(module)
    return names


def use_grouped_forward(module: nn.Module) -> None:
    """Run ``module`` (a transformers experts module) through :func:`grouped_experts_forward` from now on."""
    cls: Any = type(module)
    if not getattr(cls, "_qlora_grouped", False):
        module.__class__ = _grouped_class(cls)


@functools.cache
def _grouped_class(cls: Any) -> type:
    # Same name, so that transformers' and users' checks by class name still hold.
    return type(cls.__name__, (cls,), {"forward": grouped_experts_forward, "_qlora_grouped": True,
                                       "__module__": cls.__module__})


def grouped_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' output for ``hidden_states`` ``[tokens, hidden]`` routed to ``top_k_index`` ``[tokens, k]`` with
    weights ``top_k_weights``: what transformers' experts modules compute, with 4-bit weights and adapters.
    """
    tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    experts = int(self.num_experts)
    expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    x = hidden_states[order // top_k]
    # histc, not bincount: no host sync, so CUDA graphs can capture it (ids past the last expert are not counted).
    counts = torch.histc(expert_ids.float(), bins=experts, min=0, max=experts - 1)
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)
    names = expert_weight_names(self)
    up = _projection(self, names[0], x, offsets, expert_ids)
    if getattr(self, "has_gate", names[0] == "gate_up_proj"):
        gated = self._apply_gate(up) if hasattr(self, "_apply_gate") else _gate(self, up)
    else:
        gated = self.act_fn(up)
    out = _projection(self, names[-1], gated, offsets, expert_ids)
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    # The k outputs of a token summed in one reduction (in the compute dtype, as transformers' grouped path does).
    return unsorted.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def _gate(module: Any, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _projection(module: Any, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor
                ) -> torch.Tensor:
    transposed = bool(getattr(module, "is_transposed", False))
    out = _FrozenGroupedLinear.apply(x, offsets, module, name, transposed)
    bias = module._parameters.get(f"{name}_bias")
    if bias is not None:
        out = out + bias.to(out.dtype)[expert_ids]
    if is_adapted_experts(module) and name in expert_factors(module)[0]:
        factor_a, factor_b = expert_factors(module)
        a, b = factor_a[name].to(x.dtype), factor_b[name].to(x.dtype)
        low = _grouped_mm(x, a.transpose(-2, -1), offsets)
        out = out + _grouped_mm(low, b.transpose(-2, -1), offsets) * getattr(module, _SCALING)
    return out


class _FrozenGroupedLinear(torch.autograd.Function):
    """``x @ W_e^T`` per expert group, ``W`` unpacked from 4-bit for the forward and again for the backward: the
    full-precision weight never outlives one matmul (no gradient for ``W``: it is frozen).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, offsets: torch.Tensor, module: nn.Module, name: str, transposed: bool
                ) -> torch.Tensor:
        ctx.save_for_backward(offsets)
        ctx.module, ctx.name, ctx.transposed = module, name, transposed
        return _frozen_experts_matmul(x, offsets, module, name, flip=not transposed)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (offsets,) = ctx.saved_tensors
        grad_x = _frozen_experts_matmul(grad.contiguous(), offsets, ctx.module, ctx.name, flip=ctx.transposed)
        return grad_x, None, None, None, None


def _frozen_experts_matmul(x: torch.Tensor, offsets: torch.Tensor, module: nn.Module, name: str, flip: bool
                           ) -> torch.Tensor:
    """``x`` row group ``g`` times expert ``g``'s weight (transposed when ``flip``), the weight unpacked whole or, past
    :data:`lightning_qlora.quant.experts.EXPERT_SCRATCH_BYTES`, in chunks of experts (never while compiling or
    capturing a CUDA graph: whole then, logged once).
    """
    shape = expert_shape(module, name)
    experts = shape[0]
    per_chunk = experts_per_chunk(module, name, x.dtype)
    if per_chunk < experts and _cannot_sync(x):
        _log_whole_once(name, tuple(shape))
        per_chunk = experts
    if per_chunk >= experts:
        weight = expert_weight(module, name, x.dtype)
        return _grouped_mm(x, weight.transpose(-2, -1) if flip else weight, offsets)
    ends = offsets.tolist()  # the chunks' row ranges: one host synchronization
    absmax = expert_absmax(module, name)
    # Rows past the last offset stay zero, as in grouped_mm's output.
    out = x.new_zeros(x.shape[0], shape[1] if flip else shape[2])
    for start in range(0, experts, per_chunk):
        end = min(start + per_chunk, experts)
        first, last = (ends[start - 1] if start else 0), ends[end - 1]
        if last <= first:
            continue
        weight = expert_weight_range(module, name, x.dtype, start, end, absmax)
        out[first:last] = _grouped_mm(x[first:last], weight.transpose(-2, -1) if flip else weight,
                                      offsets[start:end] - first)
        del weight
    return out


def _cannot_sync(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@functools.cache
def _log_whole_once(name: str, shape: tuple[int, ...]) -> None:
    log.warning("Experts weight %s %s is unpacked whole (more than %.2f GiB at once): its chunked path needs a host "
                "synchronization, which compiled code and CUDA graphs cannot take; compile=False bounds it.",
                name, list(shape), quant_experts.EXPERT_SCRATCH_BYTES / 2**30)


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row group ``g`` of ``x`` (rows ``offsets[g-1]:offsets[g]``) times ``weight[g]``; rows past the last offset
    are zero. One grouped kernel where its layout rules hold (every row a multiple of 16 bytes), else a loop over
    the groups, logged once (e.g. a rank of 4 in bf16: 8-byte rows).
    """
    aligned = all((s * t.element_size()) % 16 == 0 for t in (x, weight) for s in t.stride() if s != 1) and all(
        (n * x.element_size()) % 16 == 0 for n in (x.shape[-1], weight.shape[-1]))
    if aligned:
        return torch.nn.functional.grouped_mm(x.contiguous(), weight, offs=offsets)
    _log_loop_once(tuple(x.shape[-1:]) + tuple(weight.shape[-1:]), x.dtype)
    out = x.new_zeros(x.shape[0], weight.shape[-1])
    start = 0
    for group, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ weight[group]
        start = end
    return out


@functools.cache
def _log_loop_once(dims: tuple[int, ...], dtype: torch.dtype) -> None:
    log.warning("MoE experts: a matrix of %s dims %s has rows that are not a multiple of 16 bytes, which grouped_mm "
                "needs: looping over the experts instead (slower). A LoRA rank that is a multiple of 8 avoids it.",
                dtype, dims)


@functools.cache
def _notes_once_for(dropout: float, dora: bool) -> None:
    if dropout:
        log.info("MoE experts: their adapters train without dropout (lora_dropout=%g applies to the linear layers)",
                 dropout)
    if dora:
        log.warning("MoE experts: DoRA is not available for expert weights: they get plain LoRA adapters")


def _notes_once(config: LoRAConfig) -> None:
    _notes_once_for(float(config.dropout), bool(config.use_dora))


def merged_expert_weight(module: nn.Module, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Expert weight ``name`` with its adapter merged in, ``[experts, ...]`` in the stored layout (for exports)."""
    weight = expert_weight(module, name, torch.float32)
    if is_adapted_experts(module) and name in expert_factors(module)[0]:
        factor_a, factor_b = expert_factors(module)
        delta = torch.bmm(factor_b[name].float(), factor_a[name].float()) * getattr(module, _SCALING)
        weight = weight + (delta.transpose(-2, -1) if getattr(module, "is_transposed", False) else delta)
    return weight.to(dtype)


def peft_expert_tensors(module_name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of an experts module under PEFT's ``target_parameters`` keys and layout (``lora.ParamWrapper``:
    ``lora_A`` ``[r x experts, in]`` expert-major, ``lora_B`` ``[out, r x experts]`` rank-major); wrappers nest in
    :func:`expert_weight_names` order, the first innermost (``experts.base_layer.lora_A.weight``).
    """
    if not is_adapted_experts(module):
        return {}
    factor_a, factor_b = expert_factors(module)
    names = [n for n in expert_weight_names(module) if n in factor_a]
    tensors = {}
    for depth, name in enumerate(reversed(names)):
        prefix = f"{module_name}." + "base_layer." * depth
        a, b = factor_a[name].detach(), factor_b[name].detach()
        experts, rank, fan_in = a.shape
        tensors[f"{prefix}lora_A.weight"] = a.reshape(experts * rank, fan_in)
        tensors[f"{prefix}lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)
    return tensors


def load_peft_expert_tensors(module_name: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Copy PEFT-layout expert adapters (:func:`peft_expert_tensors`'s keys) into ``module``; returns the keys used.

    Raises:
        ValueError: a tensor of the wrong shape, naming the key and both shapes.
    """
    if not is_adapted_experts(module):
        return []
    factor_a, factor_b = expert_factors(module)
    names = [n for n in expert_weight_names(module) if n in factor_a]
    used = []
    with torch.no_grad():
        for depth, name in enumerate(reversed(names)):
            prefix = f"{module_name}." + "base_layer." * depth
            a_key, b_key = f"{prefix}lora_A.weight", f"{prefix}lora_B.weight"
            if a_key not in tensors or b_key not in tensors:
                continue
            a, b = factor_a[name], factor_b[name]
            experts, rank, fan_in = a.shape
            fan_out = b.shape[1]
            for key, value, want in ((a_key, tensors[a_key], (experts * rank, fan_in)),
                                     (b_key, tensors[b_key], (fan_out, rank * experts))):
                if tuple(value.shape) != want:
                    raise ValueError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, but {module_name}.{name} "
                                     f"({experts} experts, r {rank}) needs {want}: the adapter was trained on another "
                                     "model or rank.")
            a.copy_(tensors[a_key].reshape(experts, rank, fan_in))
            b.copy_(tensors[b_key].reshape(fan_out, rank, experts).permute(2, 0, 1))
            used += [a_key, b_key]
    return used
