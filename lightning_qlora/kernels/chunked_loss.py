"""The LM head and cross-entropy in chunks of tokens: the logits never exist for the whole sequence.

At a 128k vocabulary a 4,096-token step's logits take 1 GiB in bf16, 2 GiB again as the fp32 copy the loss is taken
in, and as much for their gradient. Here each chunk of hidden states is projected, its loss taken in fp32 and the
gradient of that loss with respect to the chunk's hidden states (and the head's weight, when it trains) computed at
once, in the forward; the logits of one chunk exist at a time (``chunk_tokens`` x vocabulary x 4 bytes). The
backward only scales the stored gradient. The model's final norm runs chunk by chunk inside it too: what the whole
step keeps for the loss is one gradient of the last block's output, ``tokens x hidden`` in the compute dtype.
The loss and gradients equal the plain path's to float rounding
(``tests/test_chunked_loss.py``).

:func:`causal_lm_loss` runs a transformers causal LM this way (its body, then this loss on the head), for the
architectures whose head is a plain projection (optionally soft-capped or scaled, as Gemma 2/3, Cohere and Granite
do); any other model is run as it is, and the reason is logged once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_qlora.sharding import is_sharded

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# One chunk's fp32 logits stay near this many bytes (256 MiB): 512 tokens at a 128k vocabulary.
CHUNK_BYTES = 2**28
# Model types whose causal-LM head is ``lm_head(hidden)`` (times the scalings read from the config) and whose body is
# ``model.model``: the loss may be taken in chunks.
CHUNKABLE_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "cohere", "starcoder2", "deepseek_v3", "glm", "glm4", "smollm3", "ministral",
})


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
        softcap: float | None, scale: float, norm: nn.Module | None,
    ) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            keep = valid[rows]
            if not bool(keep.any()):
                continue
            h = hidden[rows][keep]
            if norm is not None:  # the final norm of this chunk's states only, its gradient taken here too
                pre = h.detach().requires_grad_(grad_hidden is not None)
                with torch.enable_grad():
                    normed = norm(pre)
                h = normed.detach()
            target = labels[rows][keep]
            raw = (h @ weight.t()).float() * scale
            logits = torch.tanh(raw / softcap) * softcap if softcap else raw
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - one-hot, over the tokens taken (the mean's 1/count applied in backward).
            grad = torch.exp(logits - lse[:, None])
            grad.scatter_add_(1, target[:, None], torch.full_like(target[:, None], -1.0, dtype=grad.dtype))
            if softcap:
                grad *= 1 - (logits / softcap) ** 2  # through tanh: d(c tanh(z/c))/dz
            grad *= scale
            if grad_hidden is not None:
                # Rows not taken keep a zero gradient. The gradient is cast to the hidden dtype before the matmul,
                # as the plain path's is (its logits are bf16, its loss fp32). (A view: the write goes through.)
                grad_h = grad.to(hidden.dtype) @ weight
                if norm is not None:
                    (grad_h,) = torch.autograd.grad(normed, pre, grad_h.to(normed.dtype))
                grad_hidden[rows][keep] = grad_h.to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad.t() @ h.float()
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight) if t is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        ctx.count = max(count, 1)
        ctx.weight_dtype = weight.dtype
        return total / ctx.count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        saved = list(ctx.saved_tensors)
        has_hidden, has_weight = ctx.has
        factor = grad_output / ctx.count  # the mean's 1/count, and whatever scales the loss after this
        grad_hidden = None
        if has_hidden:
            stored = saved.pop(0)
            grad_hidden = stored * factor.to(stored.dtype)
        grad_weight = (saved.pop(0) * factor).to(ctx.weight_dtype) if has_weight else None
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, softcap: float | None = None,
    scale: float = 1.0, chunk_tokens: int | None = None, norm: nn.Module | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``softcap(scale * norm(hidden) @ weight.T)`` against ``labels`` (``-100``: not taken),
    chunk by chunk over the tokens.

    Args:
        hidden: ``[tokens, hidden]``, already aligned with ``labels`` (position t's state, token t + 1's label).
        weight: the head's ``[vocab, hidden]`` weight.
        labels: ``[tokens]``.
        softcap: Gemma 2/3's final logit soft-capping (``c * tanh(z / c)``), if any.
        scale: a factor on the logits (Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``).
        chunk_tokens: tokens per chunk; by default as many as keep one chunk's fp32 logits near 256 MiB.
        norm: a per-token module with frozen parameters (the model's final norm) applied to each chunk first: the
            whole sequence's normed states (and the fp32 copies a norm saves for backward) never exist.
    """
    if norm is not None and any(p.requires_grad for p in norm.parameters()):
        raise ValueError("chunked_cross_entropy(norm=...) takes a norm whose parameters are frozen; apply a "
                         "trainable norm before the loss instead.")
    chunk = chunk_tokens or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap, scale, norm)


_fallbacks_logged: set[str] = set()


def causal_lm_loss(model: nn.Module, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """The causal-LM loss of a transformers model with the head and loss in chunks (see the module docstring):
    the same value as ``model(**inputs, labels=labels).loss``, without the whole sequence's logits.

    A model this cannot run so (another architecture, a quantized or adapted head, a head with a bias) is run as
    ``model(**inputs, labels=labels)``; the reason is logged once per model type.
    """
    reason = why_not_chunked(model)
    if reason is not None:
        key = f"{type(model).__name__}: {reason}"
        if key not in _fallbacks_logged:
            _fallbacks_logged.add(key)
            log.info("Loss: the whole sequence's logits for %s (%s); the chunked head covers %s", type(model).__name__,
                     reason, ", ".join(sorted(CHUNKABLE_MODEL_TYPES)))
        return model(**inputs, labels=labels).loss
    config: Any = model.config
    body: Any = model.model
    norm = _final_norm(body)
    with _without(body, "norm") if norm is not None else contextlib.nullcontext():
        hidden = body(**inputs).last_hidden_state
    head: Any = model.lm_head
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    # Token t's state against token t + 1's label; each row's last state against none. (Shifting the labels, not
    # the states: a view of the states, no copy of them.)
    labels = labels.to(hidden.device)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, softcap=softcap,
                                 scale=scale, norm=norm)


def _final_norm(body: nn.Module) -> nn.Module | None:
    """The body's final norm when the loss can apply it chunk by chunk: a module named ``norm`` (what every
    chunkable architecture's body calls last), frozen (a trained norm stays in the body).
    """
    norm = getattr(body, "norm", None)
    if not isinstance(norm, nn.Module) or any(p.requires_grad for p in norm.parameters()):
        return None
    return norm


@contextlib.contextmanager
def _without(module: nn.Module, name: str) -> Iterator[None]:
    """``module.<name>`` as an identity for the duration (the body then returns its states before that norm)."""
    kept = getattr(module, name)
    setattr(module, name, nn.Identity())
    try:
        yield
    finally:
        setattr(module, name, kept)


def why_not_chunked(model: nn.Module) -> str | None:
    """Why :func:`causal_lm_loss` runs ``model`` as it is (whole-sequence logits), or ``None`` when it chunks."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in CHUNKABLE_MODEL_TYPES:
        return f"model_type {model_type!r} is not one whose head is known to be a plain projection"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear or getattr(model, "model", None) is None:
        return "its head is quantized, adapted or not an nn.Linear"
    if any(is_sharded(p) for p in model.parameters(recurse=False)) or is_sharded(head.weight) or hasattr(
        model, "unshard"
    ):
        # FSDP2 gathers the root's weights in the root's forward: the body and head may not be called apart.
        return "it is sharded (FSDP)"
    if head.bias is not None:
        return "its head has a bias"
    return None
