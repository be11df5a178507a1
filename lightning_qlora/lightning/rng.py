"""The random state of a process (torch CPU and CUDA, Python, NumPy), as checkpointable values.

Saved in every Lightning checkpoint by :class:`~lightning_qlora.QLoRAPlugin` so that a resumed run draws the same
numbers (LoRA dropout, sampling) as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, cast

import torch


def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), Python and NumPy random states."""
    import random

    import numpy as np

    # Only tensors and plain Python values: Lightning loads checkpoints with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
