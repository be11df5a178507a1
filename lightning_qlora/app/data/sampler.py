"""A shuffling sampler that can resume in the middle of an epoch with exactly the order it would have had."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableRandomSampler(Sampler[int]):
    """Shuffles ``num_samples`` indices with a permutation that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at every epoch start, so epoch ``e`` always sees the same order, in a fresh
    process too. :meth:`resume` makes the next pass over epoch ``epoch`` skip the ``batches_done`` batches that were
    already trained on before a checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, batches_done: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, batches_done)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.order(self.epoch)
        if self._resume is not None:
            epoch, batches_done = self._resume
            self._resume = None
            if epoch == self.epoch:
                indices = indices[batches_done * self.batch_size :]
        yield from indices

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableRandomSampler` that Lightning checkpoints and restores.

    Lightning saves ``state_dict()`` of stateful loaders in every checkpoint and calls ``load_state_dict()`` before
    iterating again. Because Lightning fetches batches ahead of the step, the loader cannot count consumed batches
    itself: ``progress`` returns ``(epoch, batches trained on in that epoch)`` from the trainer's loop.
    """

    def __init__(
        self, dataset: Any, *, sampler: ResumableRandomSampler, progress: Callable[[], tuple[int, int]], **kwargs: Any
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._resumable = sampler
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self._progress()
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resumable.resume(int(state_dict["epoch"]), int(state_dict["batches_done"]))
