"""GPTQ rounding for NF4/FP4: the same stored format, codes chosen to minimize each layer's output error.

Round-to-nearest quantization (what bitsandbytes does, and PEFT with it) picks, for every weight, the 4-bit level
closest to it. GPTQ (Frantar et al., 2022) instead picks the levels one input column at a time and moves the error of
each choice onto the columns not yet quantized, weighted by the inverse Hessian ``H = 2 X^T X`` of the layer's
calibration inputs ``X``: the layer's *output* error on real activations is minimized, not the weight error.

Here the levels are NF4's (or FP4's) and each block of ``blocksize`` consecutive weights of a row keeps its absmax
scale. So every rounded weight is exactly ``level * absmax`` and bitsandbytes' own ``quantize_4bit`` packs it into the
very codes chosen here: the result is an ordinary NF4 (+ double quant) layer that bitsandbytes' kernels run unchanged.
Plain torch.
"""

from __future__ import annotations

import torch

from lightning_qlora._imports import import_bitsandbytes
from lightning_qlora.errors import QLoRAError

# Added to the Hessian's diagonal, as a fraction of its mean, to keep it invertible; an ill-conditioned layer gets
# more automatically. Smaller than GPTQ's usual 1%, which measured worse here (benchmarks/NOTES.md).
GPTQ_DAMPING = 0.001
# Columns updated together before the rest of the matrix is touched (GPTQ's "lazy batch" update).
_COLUMN_BATCH = 128


class CalibrationError(QLoRAError, ValueError):
    """Calibration cannot run on this model or data (the message says why and what to do)."""


def levels(quant_type: str) -> torch.Tensor:
    """The 16 normalized levels of a bitsandbytes 4-bit type (``"nf4"`` or ``"fp4"``), sorted, on the CPU."""
    bnb = import_bitsandbytes()
    return bnb.functional.get_4bit_type(quant_type, device="cpu").float().sort().values


def gptq_round(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    damping: float = GPTQ_DAMPING,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ-round ``weight`` (``out x in``) onto ``quant_type`` levels with one absmax per ``blocksize`` weights.

    Args:
        weight: the full-precision weight; not modified.
        hessian: ``in x in`` second moment of the layer's inputs (``X^T X / n``); a diagonal of zeros (an input never
            active in the calibration data) is handled.
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: weights per absmax block, along a row (``in_features`` must be a multiple of it).
        damping: added to the diagonal, as a fraction of its mean.
        act_order: round the columns with the largest input energy first (else left to right).

    Returns:
        The rounded weight in fp32, each value exactly ``level * block absmax``: ``bitsandbytes.functional.
        quantize_4bit`` of it yields these very values (with ``hessian = identity`` it equals round-to-nearest).
    """
    rows, cols = weight.shape
    if cols % blocksize:
        raise CalibrationError(f"in_features={cols} is not a multiple of blocksize={blocksize}.")
    device = weight.device
    grid = levels(quant_type).to(device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    work = weight.detach().float().clone()
    # Static blocks: each block's absmax comes from the original weights, and each row's largest weight of the block
    # is pinned to +-absmax, so the rounded block's absmax is exactly the scale its codes were chosen for and
    # bitsandbytes re-derives the same codes.
    blocks = work.view(rows, cols // blocksize, blocksize)
    peak = blocks.abs().argmax(dim=2, keepdim=True)
    scales = blocks.abs().gather(2, peak).clamp_min(torch.finfo(torch.float32).tiny).squeeze(2)
    peak_values = blocks.gather(2, peak).sign().squeeze(2) * scales
    peak_columns = peak.squeeze(2) + torch.arange(0, cols, blocksize, device=device)
    h = hessian.detach().float().to(device).clone()
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0  # never-active inputs: decoupled, rounded to nearest
    # Columns with the largest input energy first (GPTQ's act-order): their errors get the most columns to absorb them.
    order = torch.argsort(diagonal, descending=True) if act_order else torch.arange(cols, device=device)
    work = work[:, order]
    inverse = _upper_inverse_factor(h[order][:, order], damping)
    rounded = torch.empty_like(work)
    for start in range(0, cols, _COLUMN_BATCH):
        end = min(start + _COLUMN_BATCH, cols)
        errors = torch.empty(rows, end - start, device=device)
        for i in range(start, end):
            original = int(order[i])
            block = original // blocksize
            scale = scales[:, block : block + 1]
            column = work[:, i : i + 1]
            codes = torch.bucketize((column / scale).clamp(-1, 1), midpoints)
            pinned = (peak_columns[:, block : block + 1] == original)
            rounded[:, i : i + 1] = torch.where(pinned, peak_values[:, block : block + 1], grid[codes] * scale)
            error = (column - rounded[:, i : i + 1]) / inverse[i, i]
            work[:, i + 1 : end] -= error * inverse[i, i + 1 : end]
            errors[:, i - start] = error[:, 0]
        work[:, end:] -= errors @ inverse[start:end, end:]
    result = torch.empty_like(rounded)
    result[:, order] = rounded
    return result


def _upper_inverse_factor(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damping * mean(diag H) * I)^-1``: row i says how the error of column i spreads
    over the later columns. A Hessian too ill-conditioned for ``damping`` gets ten times more, up to three times.
    """
    mean = h.diagonal().mean()
    for attempt in range(4):
        damped = h.clone()
        damped.diagonal().add_(damping * 10**attempt * mean)
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise CalibrationError(
        f"the calibration statistics stay singular even with damping {damping * 1000:g}x the mean diagonal: too few "
        "calibration tokens for this layer? Give more calibration_samples."
    )
