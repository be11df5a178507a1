"""Rows packed into fixed token budgets: every batch has one shape, no compute goes to padding between rows.

Rows are assigned to budgets by best-fit decreasing (longest row first, each into the fullest budget it still fits;
a new budget when none has room), which fills budgets to within a few tokens on realistic length mixes. In a packed
row the positions restart at 0 for every original row, and that is all the model needs: transformers reads the
restarts from ``position_ids`` (with no ``attention_mask``) and builds attention that never crosses rows, for SDPA,
eager, FlexAttention and flash attention's variable-length kernels alike. The label of each row's first token is
``-100``: it would otherwise be predicted from the previous row's last token. The tail of a budget left empty is
padding, a segment of its own with ``-100`` labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_qlora.app.data.chat import IGNORE_INDEX


def best_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Row indices grouped into bins of at most ``budget`` tokens (each row's length must be ``<= budget``).

    Deterministic: ties go to the lower row index and the lower bin. Runs in ``O(n log budget)``.

    Raises:
        ValueError: for a row longer than ``budget``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = _FreeSpace(budget)
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        length = lengths[i]
        if length > budget:
            raise ValueError(f"row {i} has {length} tokens, more than the budget of {budget}.")
        target = free.take_smallest_at_least(length)
        if target is None:
            bins.append([i])
            room.append(budget - length)
            free.add(len(bins) - 1, budget - length)
        else:
            bins[target].append(i)
            room[target] -= length
            free.add(target, room[target])
    return bins


class _FreeSpace:
    """Bins by free space, answering "the bin with the least free space that is still >= n" in O(log budget)."""

    def __init__(self, budget: int) -> None:
        self.size = 1
        while self.size < budget + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # bins per free-space value, summed up the tree
        self.bins: dict[int, list[int]] = {}

    def add(self, bin_id: int, space: int) -> None:
        if space <= 0:
            return  # a full bin never takes another row
        self.bins.setdefault(space, []).append(bin_id)
        self._bump(space, 1)

    def take_smallest_at_least(self, need: int) -> int | None:
        space = self._first_at_least(need)
        if space is None:
            return None
        ids = self.bins[space]
        ids.sort(reverse=True)  # the lowest bin id last: popped first
        bin_id = ids.pop()
        self._bump(space, -1)
        return bin_id

    def _bump(self, space: int, delta: int) -> None:
        node = space + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def _first_at_least(self, need: int) -> int | None:
        return self._descend(1, 0, self.size - 1, need)

    def _descend(self, node: int, low: int, high: int, need: int) -> int | None:
        if high < need or self.count[node] == 0:
            return None
        if low == high:
            return low
        middle = (low + high) // 2
        found = self._descend(2 * node, low, middle, need)
        return found if found is not None else self._descend(2 * node + 1, middle + 1, high, need)


class PackedRows(torch.utils.data.Dataset):
    """Tokenized rows packed into budgets of ``budget`` tokens; item ``i`` is the list of rows in budget ``i``.

    ``rows_per_item``: the mean number of original rows per item (calibration reads that many fewer items).
    """

    def __init__(self, rows: Sequence[dict[str, list[int]]], budget: int) -> None:
        self.budget = budget
        self.bins = best_fit_decreasing([len(r["input_ids"]) for r in rows], budget)
        self.rows = rows
        self.rows_per_item = len(rows) / max(1, len(self.bins))
        filled = sum(len(r["input_ids"]) for r in rows)
        self.fill = filled / max(1, len(self.bins) * budget)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> list[dict[str, list[int]]]:
        return [self.rows[i] for i in self.bins[index]]


def collate_packed(items: list[list[dict[str, list[int]]]], budget: int, pad_token_id: int) -> dict[str, Any]:
    """A batch of packed budgets: ``input_ids``, ``position_ids`` and ``labels``, all ``[len(items), budget]``.

    There is no ``attention_mask``: transformers finds the rows from the restarting positions. ``tokens`` is the
    number of real (non-padding) tokens.
    """
    input_ids = torch.full((len(items), budget), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), budget), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(items), budget), dtype=torch.long)
    real = 0
    for b, rows in enumerate(items):
        start = 0
        for row in rows:
            n = len(row["input_ids"])
            input_ids[b, start : start + n] = torch.tensor(row["input_ids"])
            labels[b, start : start + n] = torch.tensor(row["labels"])
            labels[b, start] = IGNORE_INDEX  # not predicted from the previous row's last token
            position_ids[b, start : start + n] = torch.arange(n)
            start += n
        position_ids[b, start:] = torch.arange(budget - start)  # the padding: a segment of its own
        real += start
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "tokens": torch.tensor(real)}
