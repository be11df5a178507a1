"""Calibration statistics, block by block: each linear's input second moment ``X^T X / n`` on real data.

Blocks are calibrated in order with one forward pass each: a block's statistics come from the full-precision outputs
of the blocks before it (GPTQ's second pass through the rounded block, to feed the next one, measured no better:
``benchmarks/NOTES.md``). Linears that read the same input (q/k/v, gate/up) share one statistic. With
``rounding="gptq"`` their weights are GPTQ-rounded in one pass; an ``on_layer`` hook sees every layer's statistic
(with ``rounding="nearest"`` only that: the error-correcting adapter init needs the statistics, not GPTQ). Nothing of
the model is changed here: the rounded weights are returned, to be packed by the quantizer (``rounded=``) while the
model's own weights keep their values (and fingerprint). Plain torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_qlora._progress import progress_bar
from lightning_qlora.calibration.gptq import GPTQ_DAMPING, CalibrationError, gptq_round
from lightning_qlora.config import QuantConfig
from lightning_qlora.modules import find_blocks, iter_linears, matches_any

log = logging.getLogger(__name__)

# Keyword arguments of transformers' decoder layers that carry a KV cache.
_CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "cache")

# on_layer(qualified linear name, its own weight, the weight to pack, input second moment X^T X / n)
LayerStatisticsHook = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


class _StopForward(Exception):
    """Raised by a hook to stop a forward pass once the first block's inputs are captured."""


@dataclass
class CalibrationReport:
    """What :func:`calibrated_weights` did.

    Attributes:
        layers: linears whose codes were chosen by GPTQ.
        nearest: linears outside the calibrated blocks (or with rows not divisible into blocks), left to plain
            round-to-nearest.
        tokens: calibration tokens each layer saw (padding excluded).
        seconds: wall time.
    """

    layers: int = 0
    nearest: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_text(self) -> str:
        """``"on 12,345 tokens per layer in 89 s (GPTQ codes for ...)"``, for the log."""
        codes = f" (GPTQ codes for {self.layers} linears, {self.nearest} rounded to nearest)" if self.layers else ""
        return f"on {self.tokens:,} tokens per layer in {self.seconds:.0f} s{codes}"


def calibrated_weights(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Any], Any] | None = None,
    config: QuantConfig | None = None,
    damping: float = GPTQ_DAMPING,
    progress: bool | None = None,
    rounding: str = "gptq",
    on_layer: LayerStatisticsHook | None = None,
) -> tuple[dict[str, torch.Tensor], CalibrationReport]:
    """GPTQ-rounded weights for every linear ``quantize_model(model, config)`` would quantize, block by block.

    Args:
        model: the full-precision model (not on the meta device, not sharded); it is left unchanged.
        batches: calibration batches, already on the model's device. A mapping with an ``attention_mask`` excludes
            padding from the statistics.
        forward: runs the model on one batch; by default ``model(**batch)`` for a mapping, else ``model(batch)``.
        config: the quantization settings (type, blocksize, ``skip_modules``); ``QuantConfig()`` by default.
        damping: see :func:`gptq_round`.
        progress: show a progress bar over the blocks; ``None``: when there are many.
        rounding: ``"gptq"``, or ``"nearest"`` to only gather the statistics for ``on_layer`` (nothing is rounded
            here and the dict returned is empty: the layers keep bitsandbytes' round-to-nearest).
        on_layer: called as ``on_layer(name, weight, packed, hessian)`` for every calibrated linear, with its own
            weight, the weight that will be packed (GPTQ-rounded, or its own) and its input second moment
            ``X^T X / n`` (shared by the linears that read one input; do not modify them): e.g. to initialize
            adapters from the rounding error (:mod:`lightning_qlora.calibration.cloq`).

    Returns:
        ``({qualified linear name: rounded fp32 weight}, report)``. Linears outside the model's transformer blocks
        (the elements of its longest ``ModuleList``) are not in the dict: they are rounded to nearest as usual.

    Raises:
        CalibrationError: no batches, a meta model, or no transformer blocks to calibrate.
    """
    config = config or QuantConfig()
    forward = forward or default_forward(model)
    if any(p.is_meta for p in model.parameters()):
        raise CalibrationError(
            "calibration needs the full-precision weights, but the model has parameters on the meta device. Load the "
            "pretrained weights first (stream_pretrained(path) streams them, and the QLoRA strategies calibrate it "
            "block by block), or use calibration='none'."
        )
    blocks = require_blocks(model)
    calibration = BlockCalibration(config, rounding, damping, on_layer)
    rounded: dict[str, torch.Tensor] = {}
    with eval_mode(model):  # no dropout in the statistics
        calibration.begin(blocks[0][1], batches, forward)
        desc = "Calibrating 4-bit rounding (GPTQ)" if rounding == "gptq" else "Gathering calibration statistics"
        for block_name, block in progress_bar(blocks, progress if progress is not None else len(blocks) >= 8, desc):
            rounded.update(calibration.block(block_name, block))
    return rounded, calibration.finish(model, rounded)


def require_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks, which calibration visits in order.

    Raises:
        CalibrationError: when it has none.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise CalibrationError(
            f"{type(model).__name__} has no transformer blocks (a ModuleList of layers with linears) to calibrate one "
            "after another. Use calibration='none' (round to nearest) and init_lora_weights='default'."
        )
    return blocks


class BlockCalibration:
    """Calibration one transformer block at a time, as the conversion recipe reaches each block.

    :meth:`begin` runs the batches up to the first block and keeps its inputs; :meth:`block` takes one
    full-precision block's input statistics (and GPTQ codes), calls ``on_layer`` for each of its linears and moves the
    inputs on to the block's outputs. So only the block being calibrated needs its full-precision weights.

    Args:
        config: the quantization settings (type, blocksize, ``skip_modules``).
        rounding: ``"gptq"`` or ``"nearest"`` (statistics only).
        damping: see :func:`~lightning_qlora.calibration.gptq.gptq_round`.
        on_layer: see :func:`calibrated_weights`.

    Raises:
        CalibrationError: for an unknown ``rounding``.
    """

    def __init__(
        self,
        config: QuantConfig,
        rounding: str = "gptq",
        damping: float = GPTQ_DAMPING,
        on_layer: LayerStatisticsHook | None = None,
    ) -> None:
        if rounding not in ("gptq", "nearest"):
            raise CalibrationError(f"rounding={rounding!r} must be 'gptq' or 'nearest'.")
        self.config = config
        self.rounding = rounding
        self.damping = damping
        self.on_layer = on_layer
        self.report = CalibrationReport()
        self._inputs: list[_BlockInput] = []
        self._started = time.perf_counter()

    def begin(self, first_block: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> None:
        """Run ``forward`` on each batch up to ``first_block`` and keep that block's arguments.

        Raises:
            CalibrationError: no batches, or a forward that never reaches the block.
        """
        batches = list(batches)
        if not batches:
            raise CalibrationError("calibration got no batches: give it some training data (e.g. 256 sequences).")
        self._started = time.perf_counter()
        self._inputs = _first_block_inputs(first_block, batches, forward)

    def block(self, block_name: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """Calibrate the full-precision ``block`` (named ``block_name`` in the model) on the current inputs; returns
        its GPTQ-rounded weights by qualified name (empty with ``rounding="nearest"``).
        """
        config, rounded = self.config, {}
        linears = [
            (f"{block_name}.{name}", module)
            for name, module in iter_linears(block)
            if not matches_any(f"{block_name}.{name}", config.skip_modules)
        ]
        modules = dict(linears)
        with torch.no_grad(), eval_mode(block):
            second_moments, self._inputs = _input_second_moments(block, linears, self._inputs)
            for names, total, tokens in second_moments:
                hessian = total / max(tokens, 1)
                self.report.tokens = tokens
                if self.rounding == "gptq" and not modules[names[0]].in_features % config.blocksize:
                    # (else bitsandbytes' blocks would straddle rows: round to nearest)
                    # Rows are rounded independently given the shared statistics: one pass for all readers of an input.
                    stacked = torch.cat([modules[name].weight for name in names])
                    result = gptq_round(stacked, hessian, config.quant_type, config.blocksize, self.damping)
                    split = result.split([modules[n].out_features for n in names])
                    for name, part in zip(names, split, strict=False):
                        rounded[name] = part.contiguous()
                    self.report.layers += len(names)
                if self.on_layer is not None:
                    for name in names:
                        weight = modules[name].weight.detach()
                        self.on_layer(name, weight, rounded.get(name, weight), hessian)
        return rounded

    def finish(self, model: nn.Module, rounded: Mapping[str, torch.Tensor]) -> CalibrationReport:
        """The report, once every block was calibrated (``rounded``: all the GPTQ codes chosen)."""
        report = self.report
        skip = self.config.skip_modules
        report.nearest = sum(
            1 for name, _ in iter_linears(model) if name not in rounded and not matches_any(name, skip)
        )
        report.seconds = time.perf_counter() - self._started
        if self.rounding == "gptq":  # (debug: the plugin logs the result once, with what asked for it)
            log.debug(
                "Calibrated the 4-bit rounding of %d linears on %d tokens in %.0f s (%d rounded to nearest).",
                report.layers, report.tokens, report.seconds, report.nearest,
            )
        else:
            log.debug("Gathered the input statistics of the linears on %d tokens in %.0f s.", report.tokens,
                     report.seconds)
        self._inputs = []
        return report


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside (no dropout in the statistics), each submodule's own mode restored after."""
    was_training = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, training in was_training.items():
            sub.training = training


def default_forward(model: nn.Module) -> Callable[[Any], Any]:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    def run(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)

    return run


@dataclass
class _BlockInput:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None


def _first_block_inputs(block: nn.Module, batches: list[Any], forward: Callable[[Any], Any]) -> list[_BlockInput]:
    """Run the model up to its first block for every batch and keep that block's arguments."""
    captured: list[_BlockInput] = []

    def capture(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        for key, value in kwargs.items():  # a KV cache would grow each time the block runs again
            if key in _CACHE_ARGUMENTS or type(value).__name__.endswith("Cache"):
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append(_BlockInput(args, kwargs, None))
        raise _StopForward

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(batch)
                except _StopForward:
                    pass
                else:
                    raise CalibrationError("the forward pass never reached the model's first transformer block.")
                mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                captured[-1].token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    finally:
        handle.remove()
    return captured


def _input_second_moments(
    block: nn.Module, linears: Sequence[tuple[str, nn.Module]], inputs: list[_BlockInput]
) -> tuple[list[tuple[list[str], torch.Tensor, int]], list[_BlockInput]]:
    """Run ``block`` once over ``inputs``. Returns ``[(names, X^T X summed over real tokens, token count)]``, one
    entry per distinct input (q, k and v read the same tensor, as do gate and up: they share one entry), and the
    block's outputs.
    """
    groups: dict[str, list[Any]] = {}  # first reader's name -> [names, sum, tokens]
    owner: dict[str, str] = {}  # every linear's name -> the first reader of its input
    current: dict[str, Any] = {"mask": None, "seen": {}}

    def accumulate(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], __: Any) -> None:
            x = args[0]
            seen = current["seen"]
            if id(x) in seen:
                owner.setdefault(name, seen[id(x)][1])
                return
            seen[id(x)] = (x, owner.setdefault(name, name))  # keep x alive so its id stays unique
            mask = current["mask"]
            flat = x[mask] if mask is not None and x.shape[:2] == mask.shape else x.reshape(-1, x.shape[-1])
            flat = flat.detach().float()
            if name not in groups:
                groups[name] = [[], flat.T @ flat, flat.shape[0]]
            else:
                groups[name][1].addmm_(flat.T, flat)
                groups[name][2] += flat.shape[0]

        return hook

    handles = [m.register_forward_hook(accumulate(name)) for name, m in linears]
    outputs = []
    try:
        for item in inputs:
            current["mask"], current["seen"] = item.token_mask, {}
            outputs.append(_next_input(item, block(*item.args, **item.kwargs)))
    finally:
        for handle in handles:
            handle.remove()
    for name, _ in linears:
        if name in owner:
            groups[owner[name]][0].append(name)
    return [(names, total, int(tokens)) for names, total, tokens in groups.values()], outputs


def _next_input(item: _BlockInput, out: Any) -> _BlockInput:
    """The next block's input: this block's hidden states in place of its own."""
    hidden = out[0] if isinstance(out, (tuple, list)) else out
    if item.args:
        return _BlockInput((hidden, *item.args[1:]), item.kwargs, item.token_mask)
    return _BlockInput((), {**item.kwargs, "hidden_states": hidden}, item.token_mask)  # passed by keyword
