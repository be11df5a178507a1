"""Replace ``nn.Linear`` layers by bitsandbytes 4-bit linears (NF4/FP4, optional double quantization).

:class:`LinearQuantizer` converts one linear at a time, so at most one layer's full-precision weight exists on the
target device at once; a layer on the meta device is materialized (``reset_parameters``) on the target device and
quantized right away. :func:`quantize_model` runs it over a whole model; the conversion recipe
(:mod:`lightning_qlora.convert`) runs it block by block. Plain torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lightning_qlora._progress import progress_bar
from lightning_qlora.config import QuantConfig
from lightning_qlora.modules import (
    FAN_IN_FAN_OUT,
    is_adapter_parameter,
    is_inside,
    iter_linears,
    linears_from_conv1d,
    matches_any,
    replace_submodule,
)
from lightning_qlora.quant.checkpoint import CheckpointError
from lightning_qlora.quant.fingerprint import WEIGHTS_HASH_ATTR, Sample, digest_samples, sample_values
from lightning_qlora.quant.streaming import StreamedWeights
from lightning_qlora.quant.weight import (
    QuantFormatMismatchError,
    is_quantized_linear,
    prequantized_linear,
    quantized_linear,
    quantized_nbytes,
)

# Set on a model whose 4-bit codes were calibrated (the method's name, e.g. "gptq"); recorded with its adapters.
CALIBRATION_ATTR = "_lightning_qlora_calibration"


@dataclass
class QuantizationReport:
    """What quantization did.

    Attributes:
        quantized: qualified names of the linears that now hold 4-bit weights (or were cast, for ``"none"``).
        skipped: qualified names of linears left as they were because of ``skip_modules``.
        bytes_before: bytes of those linears' weights before conversion.
        bytes_after: bytes after conversion, counting packed weights and every quantization constant.
        num_params: number of weights converted.
        weights_sha256: hash of sampled base weights before quantization (see :mod:`lightning_qlora.quant.fingerprint`).
    """

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    num_params: int = 0
    weights_sha256: str | None = None

    @property
    def bits_per_parameter(self) -> float:
        """Measured storage bits per converted weight (packed weights + constants + biases)."""
        return 8 * self.bytes_after / self.num_params if self.num_params else 0.0


class LinearQuantizer:
    """Converts linears into their frozen form one at a time and keeps the report and the base fingerprint.

    Args:
        config: the quantization settings; ``quant_type="none"`` casts to the compute dtype instead.
        linears: every base linear of the model, in model order, as ``(name, module)``: which ones
            ``skip_modules`` leaves alone, how large the reusable buffer must be, and the fingerprint's order.
        device: where the converted layers live; ``None`` keeps each layer's device (meta layers go to the CPU).
        rounded: ``{name: weight}`` to pack instead of a layer's own weight (calibrated codes, see
            :mod:`lightning_qlora.calibration`); the fingerprint still samples the layer's own weight.
        streamed: where the weights of layers still on the meta device are read from (a checkpoint on disk);
            without it such layers get their own random initialization.
    """

    def __init__(
        self,
        config: QuantConfig,
        linears: Sequence[tuple[str, nn.Linear]],
        device: torch.device | str | None = None,
        rounded: Mapping[str, torch.Tensor] | None = None,
        streamed: StreamedWeights | None = None,
    ) -> None:
        self.config = config
        self.streamed = streamed
        self.prequantized: list[str] = []  # linears whose 4-bit bytes came from the checkpoint as they were
        self.device = torch.device(device) if device is not None else None
        self.rounded = rounded or {}
        self.report = QuantizationReport()
        self._order = [name for name, _ in linears]
        self._samples: dict[str, Sample] = {}
        to_convert = [m for name, m in linears if not self.skips(name)]
        self._scratch = _ScratchBuffers(max((m.weight.numel() for m in to_convert), default=0))

    def skips(self, name: str) -> bool:
        """Whether ``skip_modules`` leaves the linear ``name`` as it is."""
        return matches_any(name, self.config.skip_modules)

    def keep(self, name: str, linear: nn.Linear, fingerprint: bool = True) -> None:
        """Record a skipped linear (its weights count in the fingerprint unless ``fingerprint=False``: a task head
        trained whole, whose weights the adapter carries).
        """
        self.report.skipped.append(name)
        if self.streamed is not None and linear.weight.is_meta:
            self.streamed.materialize(name, linear, self._target(linear), self.config.torch_compute_dtype)
        if fingerprint and not linear.weight.is_meta:
            self._samples[name] = _sample(name, linear.weight)

    def convert(self, name: str, linear: nn.Linear, rounded: torch.Tensor | None = None) -> nn.Module:
        """The frozen layer that replaces ``linear``: 4-bit (from ``rounded`` when given: calibrated codes), or cast
        to the compute dtype for ``"none"``.
        """
        config = self.config
        target = self._target(linear)
        numel = linear.weight.numel()
        before = numel * linear.weight.element_size()
        streamed = self.streamed if linear.weight.is_meta else None
        prequantized = streamed.prequantized(name) if streamed is not None and config.quantized else None
        if streamed is not None and prequantized is not None:
            packed, state = prequantized
            try:
                new = prequantized_linear(linear, packed, state, config, target)
            except QuantFormatMismatchError as err:
                raise CheckpointError(f"{streamed.checkpoint.directory}: {name}: {err}") from None
            if linear.bias is not None:
                bias = streamed.tensor(f"{name}.bias", target, config.torch_compute_dtype)
                new.bias = nn.Parameter(bias, requires_grad=False)
            self.prequantized.append(name)
            self.report.quantized.append(name)
            self.report.bytes_after += quantized_nbytes(new)
            self.report.bytes_before += linear.weight.numel() * config.torch_compute_dtype.itemsize
            self.report.num_params += linear.weight.numel()
            if getattr(linear, FAN_IN_FAN_OUT, False):
                setattr(new, FAN_IN_FAN_OUT, True)
            return new
        if streamed is not None:
            before = numel * streamed.stored_dtype(f"{name}.weight").itemsize
            if linear.bias is not None:
                bias = streamed.tensor(f"{name}.bias", target, config.torch_compute_dtype)
                linear.bias = nn.Parameter(bias, requires_grad=False)
            if not config.quantized:  # a plain base: read straight in the compute dtype
                streamed.materialize(name, linear, target, config.torch_compute_dtype)
        if config.quantized:
            if streamed is not None:
                buffer = self._scratch.get(linear.weight.shape, streamed.stored_dtype(f"{name}.weight"), target)
                weight = streamed.linear_weight(name, linear, buffer)
            else:
                weight = _full_precision_weight(linear, target, self._scratch)
            self._samples[name] = _sample(name, weight)
            rounded = rounded if rounded is not None else self.rounded.get(name)
            packed_from = rounded.to(target) if rounded is not None else weight
            new = quantized_linear(linear, packed_from, config, target)
            after = quantized_nbytes(new)
        else:
            new = _cast_linear(linear, config.torch_compute_dtype, target)
            self._samples[name] = _sample(name, new.weight)
            after = new.weight.numel() * new.weight.element_size()
        self.report.quantized.append(name)
        self.report.bytes_before += before
        self.report.num_params += numel
        self.report.bytes_after += after
        if getattr(linear, FAN_IN_FAN_OUT, False):
            setattr(new, FAN_IN_FAN_OUT, True)  # a Conv1D's: exported and saved in its [in, out] layout
        return new

    def _target(self, linear: nn.Linear) -> torch.device:
        return self.device if self.device is not None else _default_device(linear)

    def finish(self, model: nn.Module) -> QuantizationReport:
        """Record the fingerprint on ``model``, release the buffer and return the report."""
        self._scratch.release()
        if self.device is not None and self.device.type == "cuda" and self.report.quantized:
            torch.cuda.empty_cache()  # returns the scratch buffer's segment
        self.report.weights_sha256 = digest_samples(self._samples[n] for n in self._order if n in self._samples)
        if self.prequantized:  # the full-precision weights were never here: the hash the checkpoint recorded, if any
            self.report.weights_sha256 = self.streamed.recorded_fingerprint if self.streamed is not None else None
        setattr(model, WEIGHTS_HASH_ATTR, self.report.weights_sha256)
        return self.report


def quantize_model(
    model: nn.Module,
    config: QuantConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = None,
    rounded: Mapping[str, torch.Tensor] | None = None,
    trained_whole: Sequence[str] = (),
) -> QuantizationReport:
    """Quantize every ``nn.Linear`` of ``model`` in place, one layer at a time, and freeze the whole model.

    Args:
        model: any module; its linears are replaced by :class:`bitsandbytes.nn.Linear4bit` subclasses.
        config: the quantization settings; ``QuantConfig()`` (NF4, double quant, bf16 compute) by default.
        device: where the 4-bit weights should live. ``None`` keeps each layer on its current device (meta layers
            go to the CPU). On CUDA, passing the GPU here quantizes there, which is much faster than on the CPU.
        progress: show a progress bar; ``None`` shows one for models with many linears.
        rounded: ``{qualified name: weight}`` to pack instead of the layer's own weight, for the layers named
            (e.g. GPTQ-rounded weights from :func:`lightning_qlora.calibration.calibrated_weights`, which
            bitsandbytes packs into exactly the codes chosen there). The fingerprint still hashes the layer's own
            weights: the base is the same pretrained model.
        trained_whole: qualified names of modules trained whole (``LoRAConfig.modules_to_save``): their linears stay
            as they are and out of the fingerprint (the adapter carries their weights).

    Returns:
        A :class:`QuantizationReport` with the names and byte counts (``bytes_before`` is in the original dtype).

    Raises:
        ValueError: if the model has no ``nn.Linear``.
        BitsandbytesUnavailableError: if bitsandbytes is missing or too old (only when quantizing).

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> report = quantize_model(model, QuantConfig(skip_modules=()))
        >>> len(report.quantized)
        2
    """
    config = config or QuantConfig()
    linears_from_conv1d(model)
    linears = require_linears(model)
    if any(is_quantized_linear(module) for _, module in linears):
        freeze(model)
        return QuantizationReport()  # already converted: conversion is idempotent across fit/validate calls.
    if trained_whole:
        config = replace(config, skip_modules=(*config.skip_modules, *trained_whole))
    quantizer = LinearQuantizer(config, linears, device, rounded)
    for name, module in linears:
        if quantizer.skips(name):
            quantizer.keep(name, module, fingerprint=not is_inside(name, trained_whole))
    todo = [(name, m) for name, m in linears if not quantizer.skips(name)]
    for name, module in progress_bar(todo, progress, desc=f"Quantizing to {config.quant_type}"):
        replace_submodule(model, name, quantizer.convert(name, module))
    report = quantizer.finish(model)
    freeze(model)
    return report


def require_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """``model``'s linears in model order.

    Raises:
        ValueError: when it has none (QLoRA has nothing to quantize or adapt).
    """
    linears = list(iter_linears(model))
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer, so there is nothing to quantize or adapt. "
            "QLoRA applies to models built from torch.nn.Linear (transformers models, nn.Sequential of Linear, ...)."
        )
    return linears


def freeze(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every base parameter of ``model`` (LoRA adapters are left as they are)."""
    for name, param in model.named_parameters():
        if not is_adapter_parameter(name):
            param.requires_grad_(False)


def _sample(name: str, weight: torch.Tensor) -> Sample:
    return name, tuple(weight.shape), sample_values(weight)


def _cast_linear(linear: nn.Linear, dtype: torch.dtype, device: torch.device) -> nn.Linear:
    if linear.weight.is_meta:
        # A meta layer has no values: give it its own initialization, on the target device only.
        linear.to_empty(device=device)
        linear.reset_parameters()
    return linear.to(device=device, dtype=dtype)


class _ScratchBuffers:
    """One reusable buffer per dtype for the full-precision weight of the layer being quantized.

    Materializing each layer's temporary weight in fresh memory lets the small, long-lived 4-bit results land in the
    same allocator segments, which then can never be released (``benchmarks/NOTES.md``: most of the reserved memory
    after converting a 7B model). Reusing one buffer keeps temporaries and results apart.
    """

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(self.numel, dtype=dtype, device=device)
        return self._buffers[key][: shape.numel()].view(shape)

    def release(self) -> None:
        self._buffers.clear()


def _full_precision_weight(linear: nn.Linear, device: torch.device, scratch: _ScratchBuffers) -> torch.Tensor:
    """The layer's weight on ``device``, in a scratch buffer when it has to be materialized or moved there."""
    weight = linear.weight
    if weight.is_meta:
        # A meta layer has no values: give it its own initialization, on the target device only.
        linear.weight = nn.Parameter(scratch.get(weight.shape, weight.dtype, device), requires_grad=False)
        if linear.bias is not None and linear.bias.is_meta:
            linear.bias = nn.Parameter(torch.empty_like(linear.bias, device=device), requires_grad=False)
        linear.reset_parameters()
        return linear.weight.detach()
    if weight.device != device:
        buffer = scratch.get(weight.shape, weight.dtype, device)
        buffer.copy_(weight.detach())
        return buffer
    return weight.detach()


def _default_device(module: nn.Linear) -> torch.device:
    device = module.weight.device
    return torch.device("cpu") if device.type == "meta" else device
