"""Progress bars over long per-layer work (quantizing, calibrating, merging), quiet for toy models."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import Any, TypeVar

T = TypeVar("T")

# A bar is worth showing only for real models, not for the toy ones of tests.
MIN_ITEMS_FOR_PROGRESS = 64
MIN_BLOCKS_FOR_PROGRESS = 8


def progress_bar(
    items: Iterable[T] | None, show: bool | None, desc: str, unit: str = "layer", total: int | None = None
) -> Any:
    """``items`` wrapped in a tqdm bar when ``show`` (``None``: when there are at least 64 of them, or 8 blocks).
    With ``items=None``: a bar to advance by hand (``update``), or ``None`` when not shown.
    """
    count = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    if show is None:
        floor = MIN_BLOCKS_FOR_PROGRESS if unit == "block" else MIN_ITEMS_FOR_PROGRESS
        show = count is not None and count >= floor
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, total=count)
