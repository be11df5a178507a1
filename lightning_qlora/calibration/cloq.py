"""Adapters that start by cancelling the 4-bit rounding error on real activations (CLoQ initialization).

QLoRA starts every adapter at zero (``B = 0``): training begins from the rounded base ``W_q`` and spends its first
steps learning back what rounding lost. Given calibration inputs ``X`` of a layer (their second moment
``H = X^T X / n``), the rank-``r`` update that best restores the layer's *outputs*,
``argmin_{rank(M) <= r} ||(W - W_q - M) X||``, has a closed form (Deng et al., 2025, "CLoQ: Enhancing Fine-Tuning of
Quantized LLMs via Calibrated LoRA Initialization"): with ``H = L L^T`` (its Cholesky factor; any square root gives
the same ``M``), ``M = SVD_r((W - W_q) L) L^-1``. The adapters start at ``scaling * B @ A = M``, the singular values
split evenly between ``B`` and ``A``, so both get gradients from the first step.

The base is untouched (the same packed 4-bit layer as without it), so an adapter trained this way loads on any base
quantized the same way; merging folds it into that base, as for any adapter.

Plain torch. (Measurements: ``benchmarks/NOTES.md``.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.lora.inject import iter_lora_layers
from lightning_qlora.quant.weight import stored_weight

# Added to the diagonal of H, as a fraction of its mean: inputs that are (almost) never active would otherwise get
# huge entries in L^-1, hence in A. (Larger than GPTQ's damping: here it bounds A, there it only keeps H invertible.)
CLOQ_DAMPING = 0.01


def error_correcting_factors(
    weight: torch.Tensor,
    stored: torch.Tensor,
    hessian: torch.Tensor,
    rank: int,
    scaling: float,
    damping: float = CLOQ_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A, lora_B)`` (``rank x in`` and ``out x rank``, fp32) with ``scaling * lora_B @ lora_A`` the
    rank-``rank`` matrix ``M`` that minimizes ``tr((W - W_q - M) H (W - W_q - M)^T)``, the output error on inputs
    with second moment ``hessian``.

    Args:
        weight: the full-precision weight ``W`` (``out x in``).
        stored: what the quantized layer computes with, ``W_q``
            (e.g. :func:`lightning_qlora.quant.weight.stored_weight`).
        hessian: ``in x in`` second moment of the layer's inputs; all zeros means "no information": plain SVD.
        rank: the adapter rank. Ranks beyond ``min(out, in)`` get zero ``B`` columns (and Kaiming ``A`` rows).
        scaling: the adapter's output scale (``alpha / r``).
        damping: added to the diagonal of ``hessian``, as a fraction of its mean.
    """
    return _factors(weight, stored, statistics_factor(hessian.to(weight.device), damping), rank, scaling)


def _factors(
    weight: torch.Tensor,
    stored: torch.Tensor,
    factor: torch.Tensor,
    rank: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    error = weight.detach().double() - stored.detach().double().to(weight.device)
    # ||(E - M) X^T||^2 = ||(E - M) L||^2 for H = L L^T: the best rank-r M is SVD_r(E L) L^-1. Only the top r
    # singular triplets are needed: a randomized range finder gets them for a fraction of a full SVD's cost.
    left, singular, right = top_singular_triplets((error @ factor).float(), rank)
    kept = min(rank, singular.numel())
    half = singular[:kept].sqrt() / math.sqrt(scaling)
    lora_b = torch.zeros(weight.shape[0], rank, dtype=torch.float32, device=weight.device)
    lora_a = torch.empty(rank, weight.shape[1], dtype=torch.float32, device=weight.device)
    lora_b[:, :kept] = left[:, :kept] * half
    scaled_right = (half[:, None] * right[:kept]).double()
    lora_a[:kept] = torch.linalg.solve_triangular(factor, scaled_right, upper=False, left=False).float()
    if kept < rank:
        nn.init.kaiming_uniform_(lora_a[kept:], a=math.sqrt(5))
    return lora_a, lora_b


def top_singular_triplets(
    matrix: torch.Tensor, rank: int, oversample: int = 10, power_iterations: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` holding at least the top ``rank`` singular triplets of ``matrix`` (descending), by a randomized
    range finder with power iterations (Halko et al., 2011) on a fixed seed: deterministic, and a full SVD when the
    matrix is barely larger than the rank.
    """
    rows, cols = matrix.shape
    width = rank + oversample
    if min(rows, cols) <= 2 * width:
        return torch.linalg.svd(matrix, full_matrices=False)
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    probe = torch.randn(cols, width, generator=generator, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(power_iterations):  # sharpen the spectrum: (A A^T)^q A
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    small_left, singular, right = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_left, singular, right


def statistics_factor(hessian: torch.Tensor, damping: float = CLOQ_DAMPING) -> torch.Tensor:
    """The lower Cholesky factor ``L`` (fp64) of the damped ``hessian`` (``H + damping * mean(diag H) * I = L L^T``;
    the identity for an all-zero one). A factor that fails gets ten times more damping, up to three times.
    """
    h = hessian.detach().double()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = h.diagonal().mean()
    if not torch.isfinite(mean) or mean <= 0:
        return eye
    for attempt in range(4):
        factor, info = torch.linalg.cholesky_ex(h + damping * 10**attempt * mean * eye)
        if int(info) == 0:
            return factor
        damping = max(damping, 1e-6)
    return eye  # statistics beyond repair: the plain SVD of the error


class ErrorCorrectingInit:
    """Collects the factors of every calibrated linear (pass it as ``on_layer`` to
    :func:`lightning_qlora.calibration.calibrated_weights`), then sets them into the injected adapters
    (:meth:`apply`).

    Args:
        quant: the quantization the base will get (the factors correct exactly that rounding).
        lora: the adapters' settings (rank and scaling).
        damping: see :func:`error_correcting_factors`.
    """

    def __init__(self, quant: QuantConfig, lora: LoRAConfig, damping: float = CLOQ_DAMPING) -> None:
        self.quant = quant
        self.lora = lora
        self.damping = damping
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last_factor: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, name: str, weight: torch.Tensor, packed: torch.Tensor, hessian: torch.Tensor) -> None:
        if self._last_factor is None or self._last_factor[0] is not hessian:  # q/k/v (gate/up) share one statistic
            self._last_factor = (hessian, statistics_factor(hessian, self.damping))
        self.factors[name] = _factors(
            weight, stored_weight(packed, self.quant), self._last_factor[1], self.lora.r, self.lora.scaling
        )

    def apply(self, model: nn.Module) -> list[str]:
        """Set the collected factors into ``model``'s adapters (names relative to the model calibrated); returns the
        names set. Adapters without factors (linears outside the calibrated blocks) keep the default init.
        """
        applied = []
        for name, layer in iter_lora_layers(model):
            if name in self.factors:
                layer.initialize_adapter(*self.factors[name])
                applied.append(name)
        return applied
