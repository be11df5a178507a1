"""How the start is chosen: calibration statistics, GPTQ codes and the error-correcting (CLoQ) adapter init.

:func:`calibrate` runs the model once over calibration batches and returns a :class:`CalibrationResult`, a plain
value that the conversion recipe (:func:`lightning_qlora.convert.iter_converted_blocks`) takes as an argument.
Plain torch; importing it never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_qlora.calibration.cloq import CLOQ_DAMPING, ErrorCorrectingInit, error_correcting_factors
from lightning_qlora.calibration.gptq import GPTQ_DAMPING, CalibrationError, gptq_round, levels
from lightning_qlora.calibration.statistics import (
    BlockCalibration,
    CalibrationReport,
    calibrated_weights,
    default_forward,
    eval_mode,
    require_blocks,
)
from lightning_qlora.config import LoRAConfig, QuantConfig


@dataclass(frozen=True)
class CalibrationResult:
    """What calibration chose, handed to the conversion recipe as a value.

    Attributes:
        method: ``"gptq"`` when ``rounded`` holds GPTQ codes, else ``"none"`` (round to nearest).
        rounded: ``{linear name: weight}`` to pack instead of each layer's own weight.
        adapter_init: ``{linear name: (lora_A, lora_B)}`` to start the adapters from.
        report: what the calibration pass measured.
    """

    method: str = "none"
    rounded: Mapping[str, torch.Tensor] = field(default_factory=dict)
    adapter_init: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    report: CalibrationReport = field(default_factory=CalibrationReport)


@dataclass(frozen=True)
class CalibrationData:
    """Calibration batches for the recipe to calibrate on block by block while it converts (what a streamed model,
    which never exists whole in full precision, needs).

    Attributes:
        batches: the calibration batches, on the device the model is converted on.
        forward: runs the model on one batch.
        gptq: choose GPTQ codes (``QuantConfig.calibration="gptq"``).
        adapter_init: compute the error-correcting adapter factors (``init_lora_weights="cloq"``).
    """

    batches: Sequence[Any]
    forward: Callable[[Any], Any]
    gptq: bool = False
    adapter_init: bool = False


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    quant: QuantConfig,
    lora: LoRAConfig | None = None,
    forward: Callable[[Any], Any] | None = None,
    progress: bool | None = None,
) -> CalibrationResult:
    """One pass over ``batches`` for what ``quant`` and ``lora`` ask of calibration: GPTQ codes
    (``quant.calibration="gptq"``) and the error-correcting adapter factors (``lora.init_lora_weights="cloq"``).

    Args:
        model: the full-precision model (not on the meta device); left unchanged.
        batches: calibration batches on the model's device.
        quant: the quantization the base will get.
        lora: the adapters' settings; ``None`` (or another init) computes no adapter factors.
        forward: runs the model on one batch (default: ``model(**batch)`` for a mapping, else ``model(batch)``).
        progress: a progress bar over the blocks; ``None``: when there are many.

    Raises:
        CalibrationError: no batches, a meta model, or no transformer blocks.
    """
    wants_factors = lora is not None and lora.init_lora_weights == "cloq" and quant.quantized
    collector = ErrorCorrectingInit(quant, lora) if wants_factors and lora is not None else None
    rounding = "gptq" if quant.calibration == "gptq" else "nearest"
    rounded, report = calibrated_weights(
        model, batches, forward, quant, progress=progress, rounding=rounding, on_layer=collector
    )
    return CalibrationResult(
        method=quant.calibration,
        rounded=rounded,
        adapter_init=dict(collector.factors) if collector is not None else {},
        report=report,
    )


__all__ = [
    "CLOQ_DAMPING",
    "GPTQ_DAMPING",
    "BlockCalibration",
    "CalibrationData",
    "CalibrationError",
    "CalibrationReport",
    "CalibrationResult",
    "ErrorCorrectingInit",
    "calibrate",
    "calibrated_weights",
    "default_forward",
    "error_correcting_factors",
    "eval_mode",
    "gptq_round",
    "levels",
    "require_blocks",
]
