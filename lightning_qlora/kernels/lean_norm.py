"""RMSNorm that keeps only its input for backward: no fp32 copy of the whole sequence's states.

transformers' Llama-style RMSNorm upcasts its input to fp32 and autograd keeps that copy for backward: 4 bytes a
hidden unit a token, twice per block (before attention and before the MLP), twice the bf16 input itself. At 400k
tokens and hidden 4,096 that is 13 GiB inside one recomputed block. Here the forward computes the same values and
keeps the input (alive anyway: the block's input or its residual) and one fp32 factor per token; the backward
recomputes the normalized states from them. Values equal the module's own to float rounding
(``tests/test_lean_norm.py``). Only norms whose forward is exactly Llama's are changed (Mistral, Qwen 2/3, Phi-3,
... share it); others are left as they are. Plain torch.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Hashable
from typing import Any, cast

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Attribute set on a norm whose forward is the lean one.
LEAN_ATTR = "_lightning_qlora_lean_norm"


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(hidden, weight, rstd)
        return weight * (hidden.float() * rstd).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        hidden, weight, rstd = ctx.saved_tensors
        normed = hidden.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            product = grad_output * normed.to(hidden.dtype)
            grad_weight = product.reshape(-1, product.shape[-1]).sum(0).to(weight.dtype)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            # d(w * n)/dn in the output's dtype, cast to the normed dtype as autograd does, then through n = x * rstd.
            grad_normed = (grad_output * weight).to(hidden.dtype).float()
            mean = (grad_normed * normed).mean(-1, keepdim=True)
            grad_hidden = (rstd * (grad_normed - normed * mean)).to(hidden.dtype)
        return grad_hidden, grad_weight, None


def _lean_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    module: Any = self
    return _LeanRMSNorm.apply(hidden_states, module.weight, float(module.variance_epsilon))


@functools.cache
def _llama_forward_source() -> str:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return _normalized_source(LlamaRMSNorm)


@functools.cache
def _normalized_source(cls: Any) -> str:
    method = cls.__dict__.get("forward")
    if method is None:
        return ""
    try:
        return inspect.getsource(method).strip()
    except (OSError, TypeError):
        return ""


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether ``module``'s forward is transformers' Llama RMSNorm, word for word (whatever the class is named)."""
    return (hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), Tensor)
            and _normalized_source(cast(Hashable, type(module))) == _llama_forward_source())


def _norms(blocks: list[nn.Module]) -> list[nn.Module]:
    return [m for block in blocks for m in block.modules() if "norm" in type(m).__name__.lower()]


def lean_norms_possible(blocks: list[nn.Module]) -> bool:
    """Whether every norm inside ``blocks`` is a Llama-style RMSNorm (or lean already): all of them can be lean."""
    norms = _norms(blocks)
    return bool(norms) and all(getattr(m, LEAN_ATTR, False) or is_llama_rms_norm(m) for m in norms)


def use_lean_norms(blocks: list[nn.Module]) -> int:
    """Give every Llama-style RMSNorm inside ``blocks`` the lean forward (see the module docstring); returns how
    many. The other norms are left as they are, and their classes said once.
    """
    changed, others = 0, set()
    for module in _norms(blocks):
        if getattr(module, LEAN_ATTR, False):
            changed += 1
        elif is_llama_rms_norm(module):
            module.forward = types.MethodType(_lean_forward, module)
            setattr(module, LEAN_ATTR, True)
            changed += 1
        else:
            others.add(type(module).__name__)
    if others:
        log.info("Lean norms: %s left as they are (their forward is not Llama's RMSNorm)", ", ".join(sorted(others)))
    return changed
