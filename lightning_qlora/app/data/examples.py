"""The unit of instruction data: one prompt and the response the model should learn to give."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One instruction-tuning pair. ``source`` says where it came from (``file:line``), for error messages."""

    prompt: str
    response: str
    source: str = ""

    @property
    def key(self) -> str:
        """A stable identity used for the held-out split (independent of file order and random seeds)."""
        return hashlib.sha1(self.prompt.encode("utf-8")).hexdigest()


def split_held_out(examples: list[Example], val_size: int) -> tuple[list[Example], list[Example]]:
    """A fixed train/held-out split: the ``val_size`` examples with the smallest key are held out.

    Raises:
        ValueError: when there are too few examples to hold ``val_size`` out and still train.
    """
    if val_size < 1:
        raise ValueError(f"val_size={val_size} must be >= 1: the run reports held-out perplexity before and after.")
    if len(examples) <= val_size:
        raise ValueError(
            f"The data set has {len(examples)} example(s), too few to hold out val_size={val_size} and still train. "
            "Add data or lower data.val_size."
        )
    ordered = sorted(examples, key=lambda e: e.key)
    held_out = ordered[:val_size]
    held = {e.key for e in held_out}
    return [e for e in examples if e.key not in held], held_out
