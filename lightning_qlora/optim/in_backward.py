"""Step the adapters inside the backward pass, a bucket of neighbouring tensors at a time, and free their gradients.

A normal step keeps every trainable parameter's gradient alive until ``optimizer.step()``: with LoRA r=64 on a 65B
model that is 800M fp32 gradients, 3 GiB. Stepping from post-accumulate-grad hooks (as torchtune's
``optimizer_in_bwd`` and the PyTorch tutorial "How to save memory by fusing the optimizer step into the backward pass"
do, there one tensor at a time) holds only the gradients of the bucket backward is finishing (64 MB by default).

The update is the same as the wrapped optimizer's on the same gradients (each bucket gets its own instance of it,
with the same hyper-parameters; a learning-rate scheduler that edits ``param_groups`` is honoured). What it cannot do:
clip the global gradient norm (no moment has all gradients) or accumulate gradients over several batches; the
Lightning strategies refuse both with this optimizer.

Plain torch; nothing here knows about Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


class OptimizerInBackward(torch.optim.Optimizer):
    """Wraps ``optimizer_class``: parameters in buckets, each bucket stepped from the backward pass once all its
    gradients are there.

    Args:
        params: the parameters to train (those without ``requires_grad`` are ignored).
        optimizer_class: e.g. ``torch.optim.AdamW`` or ``bitsandbytes.optim.PagedAdamW8bit``.
        bucket_mb: gradient memory per bucket (consecutive parameters, i.e. neighbouring layers, whose gradients
            arrive together). At most about one bucket of gradients is alive at a time; larger buckets mean fewer
            optimizer calls, each with a fixed Python and launch cost (``benchmarks/NOTES.md``). ``0``: one bucket per
            tensor.
        **defaults: the optimizer's hyper-parameters (``lr=...``, ``weight_decay=...``, ...).

    ``step(closure)`` runs the closure (forward and backward, which update the parameters), then steps any bucket some
    of whose parameters got no gradient, and returns the closure's loss; ``zero_grad`` has nothing to free.
    ``state_dict``/``load_state_dict`` hold every bucket's state, so Lightning checkpoints resume exactly.

    Example:
        >>> model = nn.Linear(4, 4)
        >>> optimizer = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-3)
        >>> model(torch.randn(2, 4)).sum().backward()   # the update happened here
        >>> model.weight.grad is None
        True
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        optimizer_class: type[torch.optim.Optimizer],
        bucket_mb: float = 64.0,
        **defaults: Any,
    ) -> None:
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("OptimizerInBackward got no parameter that requires grad: nothing to train.")
        if bucket_mb < 0:
            raise ValueError(f"bucket_mb={bucket_mb} must be >= 0 (0: one bucket per tensor).")
        super().__init__(trainable, defaults)
        self.optimizer_class = optimizer_class
        self.buckets = _buckets(trainable, int(bucket_mb * 2**20))
        self.inner = [optimizer_class(bucket, **defaults) for bucket in self.buckets]
        self._bucket_of: dict[torch.Tensor, int] = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._ready = [0] * len(self.buckets)
        self._skip_next = False
        # While True, the tensors whose gradient was non-zero in the last backward are kept in ``gradients_seen``
        # (a gradient check cannot look at ``.grad`` afterwards: it is gone).
        self.record_gradients = False
        self.gradients_seen: set[torch.Tensor] = set()
        self._handles = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in trainable]

    def skip_next_backward(self) -> None:
        """Drop the gradients of the next backward pass without any update (e.g. a batch with a NaN loss)."""
        self._skip_next = True

    def _gradient_ready(self, param: torch.Tensor) -> None:
        if self.record_gradients and param.grad is not None and bool(param.grad.detach().abs().sum() > 0):
            self.gradients_seen.add(param)
        index = self._bucket_of[param]
        self._ready[index] += 1
        if self._ready[index] == len(self.buckets[index]):
            self._step_bucket(index)

    def _step_bucket(self, index: int) -> None:
        inner = self.inner[index]
        group = self.param_groups[0]
        for own in inner.param_groups:  # a scheduler changes the wrapper's lr; every bucket follows
            own.update({k: v for k, v in group.items() if k != "params"})
        if not self._skip_next:
            inner.step()
        inner.zero_grad(set_to_none=True)
        self._ready[index] = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Runs ``closure`` (the parameters are updated during its backward), then steps the buckets left partly
        ready (parameters that got no gradient), and returns the closure's result.
        """
        result = None
        self.gradients_seen = set()
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        for index, ready in enumerate(self._ready):
            if ready:
                self._step_bucket(index)
        self._skip_next = False
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient was freed right after its bucket's step."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "param_groups": [_without_params(g) for g in self.param_groups],
            "inner": [o.state_dict() for o in self.inner],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("inner")
        if inner is None or len(inner) != len(self.inner):
            raise ValueError(
                f"This OptimizerInBackward state holds {len(inner or [])} bucket states, this optimizer has "
                f"{len(self.inner)}: it was saved for another model, optimizer or bucket_mb."
            )
        for optimizer, state in zip(self.inner, inner, strict=False):
            optimizer.load_state_dict(state)
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=False):
            group.update(saved)

    def remove_hooks(self) -> None:
        """Detach from the parameters (after this, backward leaves gradients for another optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _buckets(params: list[nn.Parameter], max_bytes: int) -> list[list[nn.Parameter]]:
    """Consecutive parameters grouped up to ``max_bytes`` of gradient each (a tensor larger than that alone)."""
    buckets: list[list[nn.Parameter]] = []
    size = 0
    for param in params:
        nbytes = param.numel() * param.element_size()
        if not buckets or size + nbytes > max_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(param)
        size += nbytes
    return buckets


def _without_params(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}
