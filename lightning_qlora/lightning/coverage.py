"""``QLoRAPlugin(strict=...)``: weights the recipe could not quantize are warned about, or refused past a share."""

from __future__ import annotations

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_qlora.convert import ConversionSummary
from lightning_qlora.errors import QLoRAError

#: ``QLoRAPlugin(strict=True)``: the largest share of matrix weights that may stay unquantized.
STRICT_SHARE = 0.05


class QuantizationCoverageError(QLoRAError, ValueError):
    """More of the model's matrix weights stayed in full precision than ``QLoRAPlugin(strict=...)`` allows."""


def check_quantization_coverage(summary: ConversionSummary, strict: float) -> None:
    """Warn about matrices left unquantized (MoE experts, ``Conv1D``, ...); refuse past the ``strict`` share.

    Raises:
        QuantizationCoverageError: naming the weights and the setting.
    """
    report = summary.full_precision
    if report is None or report.not_quantized_params == 0 or not summary.quant.quantized:
        return  # quant_type="none" keeps every weight in full precision by design
    share = report.not_quantized_share
    if share > strict:
        raise QuantizationCoverageError(
            f"{100 * share:.1f}% of the model's matrix weights stayed in full precision, more than "
            f"QLoRAPlugin(strict={strict:g}) allows: {report.as_text()}. Quantize them with a model the recipe "
            "covers, or pass a larger strict share (strict=False only reports them)."
        )
    kinds = "; ".join(f"{g.kind} {g.params:,} params" for g in report.groups if g.not_quantized)
    rank_zero_warn(
        f"{100 * share:.1f}% of the model's matrix weights are not quantized (full precision, no adapters): {kinds}. "
        "QLoRAPlugin(strict=True) refuses such a model."
    )
