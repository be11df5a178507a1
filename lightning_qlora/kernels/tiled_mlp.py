"""A transformer block's MLP run over the sequence in tiles: its ``tokens x intermediate`` buffers stay bounded.

An MLP works token by token, but its buffers grow with the whole sequence: at 300k tokens and an intermediate size
of 14,336 each of the gate, up and product activations takes 8 GiB in bf16, and their gradients as much again.
Here the MLP runs on ``tile_tokens`` tokens at a time: the forward keeps only its input (and returns the output
tiles joined), the backward recomputes each tile and takes its gradient, so one tile's buffers exist at a time. The
result equals the whole-sequence MLP's (each token's output is computed from that token alone).

The MLP's trainable parameters are inputs of the one autograd node and their summed gradients its outputs, so each
adapter receives one gradient per step through the engine (hooks on gradient accumulation see it once). Mixtures of
experts are left as they are (their routers balance load over the whole batch). Plain torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_qlora.kernels.offload import restored_rng, rng_state

log = logging.getLogger(__name__)

#: The names transformers gives a block's feed-forward module.
MLP_NAMES = ("mlp", "feed_forward")
#: Attribute set on an MLP whose forward runs in tiles (its tile size in tokens).
TILED_ATTR = "_lightning_qlora_tile_tokens"


class _TiledPerToken(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, function: Callable[[Tensor], Tensor], tile: int, hidden: Tensor, *params: Tensor
    ) -> Tensor:
        ctx.function, ctx.tile, ctx.params = function, tile, params
        ctx.rng = rng_state(hidden.device)
        ctx.save_for_backward(hidden)
        with torch.no_grad():
            return _run_in_tiles(function, hidden, tile)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Any, ...]:
        (hidden,) = ctx.saved_tensors
        flat, grad_flat = hidden.reshape(-1, hidden.shape[-1]), grad_output.reshape(-1, grad_output.shape[-1])
        grad_hidden = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        param_grads: list[Tensor | None] = [None] * len(ctx.params)
        # The tiles are recomputed in the forward's order from the forward's random state: dropout draws the same
        # masks.
        with restored_rng(ctx.rng):
            for start in range(0, flat.shape[0], ctx.tile):
                rows = slice(start, start + ctx.tile)
                piece = flat[rows].detach().requires_grad_(grad_hidden is not None)
                with torch.enable_grad():
                    out = ctx.function(piece[None])
                wanted = ([piece] if grad_hidden is not None else []) + list(ctx.params)
                found = list(torch.autograd.grad(out, wanted, grad_flat[rows][None], allow_unused=True))
                if grad_hidden is not None:
                    grad_hidden[rows] = found.pop(0)
                for i, g in enumerate(found):
                    if g is not None:
                        param_grads[i] = g if param_grads[i] is None else param_grads[i] + g  # type: ignore[operator]
        shaped = grad_hidden.reshape(hidden.shape) if grad_hidden is not None else None
        return (None, None, shaped, *param_grads)


def _run_in_tiles(function: Callable[[Tensor], Tensor], hidden: Tensor, tile: int) -> Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    pieces = [function(flat[start : start + tile][None])[0] for start in range(0, flat.shape[0], tile)]
    out = torch.cat(pieces)
    return out.reshape(*hidden.shape[:-1], out.shape[-1])


def tile_mlp(mlp: nn.Module, tile_tokens: int) -> None:
    """Run ``mlp`` (a per-token module taking ``[..., hidden]``) in tiles of ``tile_tokens`` tokens from now on,
    whenever its input has more tokens than that; idempotent (a second call changes the tile size).

    Raises:
        ValueError: for ``tile_tokens < 1``.
    """
    if tile_tokens < 1:
        raise ValueError(f"tile_mlp(tile_tokens={tile_tokens}) must be at least 1 (tokens per tile).")
    if getattr(mlp, TILED_ATTR, None) is None:
        forward = mlp.forward

        def tiled_forward(hidden: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            tile = getattr(mlp, TILED_ATTR)
            if args or kwargs or hidden.numel() // hidden.shape[-1] <= tile:
                return forward(hidden, *args, **kwargs)
            if not torch.is_grad_enabled():
                return _run_in_tiles(forward, hidden, tile)
            params = [p for p in mlp.parameters() if p.requires_grad]
            return _TiledPerToken.apply(forward, tile, hidden, *params)

        mlp.forward = tiled_forward
    setattr(mlp, TILED_ATTR, int(tile_tokens))


def tile_block_mlps(blocks: list[nn.Module], tile_tokens: int) -> list[str]:
    """:func:`tile_mlp` on each block's dense MLP (``block.mlp`` / ``block.feed_forward``); returns what was tiled,
    as ``Class.name``. Mixtures of experts (an MLP holding ``experts``) are left as they are, and said so once.
    """
    tiled, skipped = [], set()
    for block in blocks:
        for name in MLP_NAMES:
            mlp = getattr(block, name, None)
            if not isinstance(mlp, nn.Module):
                continue
            if any(n.split(".")[-1] == "experts" for n, _ in mlp.named_modules()):
                skipped.add(type(mlp).__name__)
                continue
            tile_mlp(mlp, tile_tokens)
            tiled.append(f"{type(block).__name__}.{name}")
    if skipped:
        log.info("MLP tiling: %s left whole (mixtures of experts route over the whole batch)",
                 ", ".join(sorted(skipped)))
    return tiled
