"""Read the next layers' weights from disk while the device quantizes the current one.

A background thread copies each weight, in the order the recipe will ask for them, from the memory-mapped shard
into one of two pinned host buffers (paying the page faults and the disk there); the recipe then copies a filled
buffer to the device asynchronously, and the thread refills it once that copy is done. Two buffers of the largest
layer's size are all the extra host memory it takes. Plain torch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

import torch

# How many weights may wait in pinned memory: two, so one is filled while the other is copied to the device.
_BUFFERS = 2


class WeightPrefetcher:
    """Fills pinned buffers with ``views(name)`` for ``names``, in order, on a thread.

    Args:
        names: the tensors the recipe will read, in the order it reads them.
        views: ``name -> tensor`` (a view of the mapped file: reading it is what is moved off the main thread).
        numel: elements of the largest tensor (the buffers' size).
        dtype: their dtype (the checkpoint's).
    """

    def __init__(self, names: Sequence[str], views: Callable[[str], torch.Tensor], numel: int, dtype: torch.dtype):
        self._names = list(names)
        self._views = views
        self._free: queue.Queue[tuple[torch.Tensor, torch.cuda.Event | None]] = queue.Queue()
        for _ in range(_BUFFERS):
            self._free.put((torch.empty(numel, dtype=dtype, pin_memory=True), None))
        self._ready: queue.Queue[tuple[str, torch.Tensor | None, torch.Tensor | None, BaseException | None]] = (
            queue.Queue()
        )
        self._next = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="lightning-qlora-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        for name in self._names:
            buffer, copied = self._free.get()
            if self._stopped.is_set():
                return
            try:
                if copied is not None:
                    copied.synchronize()  # the device has finished reading this buffer
                view = self._views(name)
                staged = buffer[: view.numel()].view(view.shape)
                staged.copy_(view)
                self._ready.put((name, staged, buffer, None))
            except BaseException as err:  # handed to the main thread, which raises it
                self._ready.put((name, None, None, err))
                return

    def expects(self, name: str) -> bool:
        """Whether ``name`` is the next tensor this prefetcher holds."""
        return not self._stopped.is_set() and self._next < len(self._names) and self._names[self._next] == name

    def copy_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy the prefetched ``name`` into ``out`` (on the device) without waiting for the copy to finish.

        Raises:
            whatever reading ``name`` raised on the thread.
        """
        got, staged, buffer, error = self._ready.get()
        self._next += 1
        if error is not None:
            self.stop()
            raise error
        assert got == name, (got, name)
        assert staged is not None
        assert buffer is not None
        out.copy_(staged, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._free.put((buffer, event))
        return out

    def stop(self) -> None:
        """Stop filling (the thread exits at its next buffer)."""
        self._stopped.set()
        for _ in range(_BUFFERS):
            self._free.put((torch.empty(0), None))
