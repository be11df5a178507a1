"""Activation checkpointing whose kept inputs wait in host memory: what frees ``layers x tokens x hidden`` bytes of
device memory at long context.

A checkpointed block keeps only its input for the recompute, but at 300k tokens and hidden 4,096 that is 2.3 GiB a
block, 75 GiB over 32 blocks: more than the 4-bit model. Here a block's input is copied to pinned host memory on a
side stream as soon as the block has run (the device copy is then free), and brought back in backward one block
ahead of its use, on that side stream, so that the copy overlaps the later block's recompute and backward.
transformers' own ``offload=True`` copies on the compute stream, which stalls it.

The block's trainable parameters are inputs of the one autograd node the block becomes and their gradients are its
outputs: each adapter receives its gradient once per step through the engine, so hooks on gradient accumulation (an
optimizer stepped in backward, DDP's reducer) see it as they see any other. On the CPU the "host copy" is a clone:
the same code path, no memory saved (tests run it there). Plain torch.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class _Stored:
    """One tensor waiting on the host: its copy there, and (once fetched or prefetched) its copy back."""

    host: Tensor
    device: torch.device
    requires_grad: bool
    copied_out: Any = None  # a CUDA event: the copy to the host is done
    back: Tensor | None = None
    copied_back: Any = None  # a CUDA event: the copy back is done


class HostOffload:
    """Moves tensors to pinned host memory and back on a stream of its own, prefetching in backward order.

    One instance serves every offloaded block of a model: it remembers the order tensors were stored in (forward
    order), so that fetching one starts bringing back the one stored before it (the next one backward needs).

    Attributes:
        bytes_offloaded: bytes copied to the host since the last :meth:`reset_counters`.
        prefetched: fetches that found their tensor already on its way back (the overlap working).
        fetched_late: fetches that had to start their own copy (the step waited for it).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._order: list[weakref.ref[_Stored]] = []
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[Tensor]] = {}
        self.bytes_offloaded = 0
        self.prefetched = 0
        self.fetched_late = 0

    def reset_counters(self) -> None:
        self.bytes_offloaded = self.prefetched = self.fetched_late = 0

    def store(self, tensor: Tensor) -> _Stored:
        """Start copying ``tensor`` to the host; the caller may drop ``tensor`` at once."""
        self._order = [r for r in self._order if r() is not None]  # (entries of finished steps fall away)
        if self.stream is None:
            stored = _Stored(tensor.detach().clone(), tensor.device, tensor.requires_grad)
        else:
            host = self._host_buffer(tuple(tensor.shape), tensor.dtype)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor.detach(), non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            # The compute stream may reuse the device memory only once the side stream has read it.
            tensor.record_stream(self.stream)
            stored = _Stored(host, tensor.device, tensor.requires_grad, copied_out=event)
        self._order.append(weakref.ref(stored))
        if self.stream is not None:  # the buffer serves the next step once this one's backward is done with it
            weakref.finalize(stored, self._free.setdefault((tuple(tensor.shape), tensor.dtype), []).append,
                             stored.host)
        self.bytes_offloaded += tensor.numel() * tensor.element_size()
        return stored

    def _host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Page-locked host memory of exactly this size: a buffer a finished step gave back, or a new one.

        torch's pinned allocator rounds every block up to a power of two (a 3.3 GB block input would pin 4 GiB, and a
        400k-token step's 32 of them 128 GiB of host memory), so new buffers are ordinary host memory that CUDA
        registers as page-locked; the allocator's own pinned memory only where registering fails (logged once).
        """
        free = self._free.get((shape, dtype))
        if free:
            return free.pop()
        buffer = torch.empty(shape, dtype=dtype)
        code = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel() * buffer.element_size(), 0)
        if int(code) != 0:
            if not getattr(self, "_register_failed", False):
                self._register_failed = True
                log.warning("Activation offloading: cudaHostRegister failed (%s); torch's pinned allocator is used "
                            "instead, which rounds each buffer up to a power of two", code)
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        weakref.finalize(buffer, torch.cuda.cudart().cudaHostUnregister, buffer.data_ptr())
        return buffer

    def fetch(self, stored: _Stored) -> Tensor:
        """``stored`` back on its device (waiting for its copy if one is under way), and the one stored before it
        set on its way back.
        """
        if stored.back is None:
            self.fetched_late += 1
            self._copy_back(stored)
        else:
            self.prefetched += 1
        tensor = stored.back
        assert tensor is not None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(stored.copied_back)
            tensor.record_stream(current)
        stored.back = None
        previous = self._previous(stored)
        if previous is not None and previous.back is None:
            self._copy_back(previous)
        return tensor

    def _previous(self, stored: _Stored) -> _Stored | None:
        position = next((i for i, r in enumerate(self._order) if r() is stored), None)
        if not position:
            return None
        return self._order[position - 1]()

    def _copy_back(self, stored: _Stored) -> None:
        if self.stream is None:
            stored.back = stored.host.clone()
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(stored.copied_out)
            stored.back = stored.host.to(stored.device, non_blocking=True)
            stored.copied_back = torch.cuda.Event()
            stored.copied_back.record(self.stream)


class OffloadedCheckpoint:
    """A transformers block's ``_gradient_checkpointing_func`` that checkpoints it with its input kept on the host.

    transformers calls it as ``func(partial(forward, block, **kwargs), *args)``; the positional tensors (the hidden
    states) are stored through :class:`HostOffload`, keyword tensors (masks, rotary tables: shared by every block)
    are kept as they are. A keyword tensor that requires grad would get no gradient here: such a call runs through
    torch's own checkpoint instead, logged once and counted in :attr:`fallbacks`.
    """

    def __init__(self, block: nn.Module, offload: HostOffload) -> None:
        self.block = block
        self.offload = offload
        self.fallbacks = 0

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if kwargs or _keyword_tensors_need_grad(function):
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("Activation offloading: %s gets a tensor that needs a gradient as a keyword; it is "
                            "checkpointed on the device instead (no offload)", type(self.block).__name__)
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
        params = [p for p in self.block.parameters() if p.requires_grad]
        positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        tensors = [args[i] for i in positions]
        # (The layout holds no tensor: the device copy of the input must be free to go once the block has run.)
        layout = (tuple(None if i in positions else a for i, a in enumerate(args)), tuple(positions))
        return _OffloadedBlock.apply(function, self.offload, layout, len(tensors), *tensors, *params)


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, function: Callable[..., Any], offload: HostOffload, layout: tuple[Any, ...], n_tensors: int,
        *tensors: Tensor,
    ) -> Any:
        inputs, params = tensors[:n_tensors], tensors[n_tensors:]
        ctx.function, ctx.offload, ctx.layout, ctx.params = function, offload, layout, params
        ctx.rng = rng_state(inputs[0].device if inputs else torch.device("cpu"))
        with torch.no_grad():
            output = function(*_with_tensors(layout, inputs))
        ctx.stored = [offload.store(t) for t in inputs]
        return output

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, ...]:
        inputs = []
        for stored in ctx.stored:
            tensor = ctx.offload.fetch(stored).detach()
            inputs.append(tensor.requires_grad_(stored.requires_grad))
        ctx.stored = None
        with torch.enable_grad(), restored_rng(ctx.rng):
            output = ctx.function(*_with_tensors(ctx.layout, inputs))
        outputs = [output] if isinstance(output, Tensor) else list(output)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=False)
                 if isinstance(o, Tensor) and o.requires_grad and g is not None]
        wanted = [t for t in inputs if t.requires_grad] + list(ctx.params)
        found: Sequence[Tensor | None] = ()
        if pairs and wanted:
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        found_iter = iter(found)
        input_grads = [next(found_iter) if t.requires_grad else None for t in inputs]
        param_grads = list(found_iter) or [None] * len(ctx.params)
        return (None, None, None, None, *input_grads, *param_grads)


def _with_tensors(layout: tuple[Any, ...], tensors: Sequence[Tensor]) -> list[Any]:
    args, positions = layout
    merged = list(args)
    for position, tensor in zip(positions, tensors, strict=True):
        merged[position] = tensor
    return merged


def _keyword_tensors_need_grad(function: Any) -> bool:
    keywords = getattr(function, "keywords", None) or {}
    values: list[Any] = []
    for value in keywords.values():
        values.extend(value if isinstance(value, (tuple, list)) else [value])
    return any(isinstance(v, Tensor) and v.requires_grad for v in values)


def rng_state(device: torch.device) -> tuple[Tensor, Tensor | None, torch.device]:
    """The CPU's random state, and ``device``'s when it is a GPU: what a recompute needs to draw the same numbers."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


@contextmanager
def restored_rng(state: tuple[Tensor, Tensor | None, torch.device]) -> Iterator[None]:
    """The random state of the forward, for the recompute (dropout draws the same mask), restored afterwards."""
    cpu, cuda, device = state
    devices = [device] if cuda is not None else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


def offload_block_inputs(blocks: Sequence[nn.Module], offload: HostOffload) -> list[OffloadedCheckpoint]:
    """Make each of ``blocks`` (transformers checkpointing layers, checkpointing on) keep its input on the host.

    Raises:
        ValueError: for a block transformers does not checkpoint (no ``gradient_checkpointing`` switch), one
            whose checkpointing is off (offloading is what happens to a checkpointed block's input), or a compiled
            one.
    """
    installed = []
    for block in blocks:
        if not hasattr(type(block), "gradient_checkpointing"):
            raise ValueError(
                f"{type(block).__name__} is not a transformers checkpointing layer: its inputs cannot be offloaded. "
                "Offloading serves transformers models (GradientCheckpointingLayer blocks)."
            )
        if not block.gradient_checkpointing:
            raise ValueError(
                f"{type(block).__name__} is not activation-checkpointed: enable checkpointing first "
                "(model.gradient_checkpointing_enable()), then offload its kept inputs."
            )
        if getattr(block, "_compiled_call_impl", None) is not None:
            raise ValueError(
                f"{type(block).__name__} is compiled (torch.compile): the compiled block runs its own checkpoint and "
                "would skip the offload. Offload blocks of an eager model: QLoRAPlugin(compile=False), or let "
                "memory_budget_gib choose (it turns compile off when it offloads)."
            )
        checkpoint = OffloadedCheckpoint(block, offload)
        block._gradient_checkpointing_func = checkpoint  # type: ignore[assignment]
        installed.append(checkpoint)
    return installed
