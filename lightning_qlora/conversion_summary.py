"""What a conversion did, for the log line, the metrics and the checks: :class:`ConversionSummary`. Plain torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_qlora.calibration import CalibrationReport
from lightning_qlora.config import QuantConfig
from lightning_qlora.modules import is_inside
from lightning_qlora.quant.experts import ExpertsReport
from lightning_qlora.quant.full_precision import FullPrecisionReport
from lightning_qlora.quant.quantize import QuantizationReport


@dataclass
class ConversionSummary:
    """What the recipe did to a model: logged once at fit start by the plugin.

    Attributes:
        quantization: the linears quantized and skipped, with their bytes before and after.
        adapted: qualified names of the linears that got adapters.
        initialized: of those, the ones started from calibration (error-correcting init).
        trainable_params: parameters that require grad (the adapters).
        total_params: all parameters, a packed 4-bit weight counted by its logical ``out x in`` shape.
        quant: the settings it was converted with.
        calibration: what calibrating during the conversion measured (``calibrate_on``), if it ran.
        trained_whole: the modules trained whole in full precision and saved with the adapter (``modules_to_save``).
        full_precision: every weight left in full precision, by kind (MoE experts and other matrices not quantized
            are flagged).
        experts: the 3-D MoE expert weights quantized (and their bytes), if the model has any.
        adapted_experts: the expert weights given per-expert adapters (``module.weight`` names).
        adapted_routers: the MoE routers given an adapter (``LoRAConfig(target_router=True)``; ``module.weight``).
    """

    quantization: QuantizationReport
    adapted: list[str]
    initialized: list[str]
    trainable_params: int
    total_params: int
    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationReport | None = None
    trained_whole: list[str] = field(default_factory=list)
    full_precision: FullPrecisionReport | None = None
    experts: ExpertsReport = field(default_factory=ExpertsReport)
    adapted_experts: list[str] = field(default_factory=list)
    adapted_routers: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def changed_anything(self) -> bool:
        """False for a model that was converted before (e.g. ``validate()`` after ``fit()``)."""
        quantized = bool(self.quantization.quantized) or bool(self.experts.quantized)
        adapted = bool(self.adapted) or bool(self.adapted_experts) or bool(self.adapted_routers)
        return adapted or (quantized and self.quant.quantized)

    def as_text(self) -> str:
        q, quant = self.quantization, self.quant
        return (
            f"QLoRA: {len(q.quantized)} linear layer(s) -> {quant.quant_type}"
            f"{' + double quant' if quant.double_quant and quant.quantized else ''} "
            f"(compute {quant.compute_dtype}, blocksize {quant.blocksize}), {len(q.skipped)} kept in full precision"
            f"{_named(self._kept_names())}; "
            f"linear weights {_mib(q.bytes_before)} -> {_mib(q.bytes_after)} "
            f"({q.bits_per_parameter:.3f} bits/param); LoRA on {len(self.adapted)} layer(s); "
            f"trainable params {self.trainable_params:,} / {self.total_params:,} ({self.trainable_percent:.3f}%)"
            + self._experts_text()
            + (f"; {self.full_precision.as_text()}" if self.full_precision is not None else "")
        )

    def _experts_text(self) -> str:
        e = self.experts
        routers = f", LoRA on {len(self.adapted_routers)} router(s)" if self.adapted_routers else ""
        if not e.quantized and not self.adapted_experts:
            return f"; MoE{routers.removeprefix(',')}" if routers else ""
        kind = self.quant.quant_type if self.quant.quantized else "cast"
        return (f"; MoE experts: {len(e.quantized)} weight(s), {e.num_params:,} params -> {kind}, "
                f"{_mib(e.bytes_before)} -> {_mib(e.bytes_after)}, per-expert LoRA on {len(self.adapted_experts)}"
                + routers)

    def _kept_names(self) -> list[str]:
        # A head trained whole is kept too, but it trains: say so, or the line reads as a frozen full-precision head.
        return [
            f"{name}: trained, saved with the adapter" if is_inside(name, self.trained_whole) else name
            for name in self.quantization.skipped
        ]

    def as_metrics(self) -> dict[str, float]:
        q = self.quantization
        return {
            "qlora/layers_quantized": float(len(q.quantized)),
            "qlora/linear_bytes_before": float(q.bytes_before),
            "qlora/linear_bytes_after": float(q.bytes_after),
            "qlora/bits_per_param": q.bits_per_parameter,
            "qlora/expert_weights_quantized": float(len(self.experts.quantized)),
            "qlora/trainable_params": float(self.trainable_params),
            "qlora/total_params": float(self.total_params),
            "qlora/trainable_percent": self.trainable_percent,
            "qlora/not_quantized_share": self.full_precision.not_quantized_share if self.full_precision else 0.0,
        }


def _named(names: Sequence[str], limit: int = 6) -> str:
    """``" (a, b, c)"`` for a short list of module names, the first ``limit`` and a count for a long one."""
    if not names:
        return ""
    shown = ", ".join(names[:limit])
    return f" ({shown}{f', ... {len(names) - limit} more' if len(names) > limit else ''})"


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"
