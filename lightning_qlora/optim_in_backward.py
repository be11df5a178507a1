"""Step each adapter parameter inside the backward pass, as soon as its gradient is complete, then free it.

A normal step keeps every trainable parameter's gradient alive until ``optimizer.step()``: with LoRA r=64 on a 65B
model that is 800M fp32 gradients, 3 GiB. Stepping one parameter at a time from a post-accumulate-grad hook (as
torchtune's ``optimizer_in_bwd`` and the PyTorch tutorial "How to save memory by fusing the optimizer step into the
backward pass" do) holds at most the gradients of the tensors backward is finishing at that moment.

The update is the same as the wrapped optimizer's on the same gradients (each parameter gets its own instance of it,
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
    """Wraps ``optimizer_class``: one instance per parameter, stepped from the backward pass.

    Args:
        params: the parameters to train (those without ``requires_grad`` are ignored).
        optimizer_class: e.g. ``torch.optim.AdamW`` or ``bitsandbytes.optim.PagedAdamW8bit``.
        **defaults: its hyper-parameters (``lr=...``, ``weight_decay=...``, ...).

    ``step(closure)`` runs the closure (forward and backward, which update the parameters) and returns its loss;
    ``zero_grad`` has nothing to free. ``state_dict``/``load_state_dict`` hold every instance's state, so Lightning
    checkpoints resume exactly.

    Example:
        >>> model = nn.Linear(4, 4)
        >>> optimizer = OptimizerInBackward(model.parameters(), torch.optim.AdamW, lr=1e-3)
        >>> model(torch.randn(2, 4)).sum().backward()   # the update happened here
        >>> model.weight.grad is None
        True
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_class: type[torch.optim.Optimizer], **defaults: Any):
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("OptimizerInBackward got no parameter that requires grad: nothing to train.")
        super().__init__(trainable, defaults)
        self.optimizer_class = optimizer_class
        self.inner = [optimizer_class([p], **defaults) for p in trainable]
        self._index = {p: i for i, p in enumerate(trainable)}
        self._handles = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in trainable]

    def _step_parameter(self, param: torch.Tensor) -> None:
        inner = self.inner[self._index[param]]
        group, own = self.param_groups[0], inner.param_groups[0]
        for key, value in group.items():  # a scheduler changes the wrapper's lr; every instance follows
            if key != "params":
                own[key] = value
        inner.step()
        inner.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Runs ``closure`` (the parameters are updated during its backward) and returns its result."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: every gradient was freed right after its parameter's step."""

    def state_dict(self) -> dict[str, Any]:
        return {"param_groups": [_without_params(g) for g in self.param_groups], "inner": [o.state_dict() for o in self.inner]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("inner")
        if inner is None or len(inner) != len(self.inner):
            raise ValueError(
                f"This OptimizerInBackward state holds {len(inner or [])} parameter states, the model has "
                f"{len(self.inner)} trainable tensors: it was saved for another model or another optimizer."
            )
        for optimizer, state in zip(self.inner, inner):
            optimizer.load_state_dict(state)
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)

    def remove_hooks(self) -> None:
        """Detach from the parameters (after this, backward leaves gradients for another optimizer)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _without_params(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}
