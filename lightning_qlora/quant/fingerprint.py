"""Which base model an adapter was trained on: architecture, linear shapes, and a hash of sampled base weights.

The weight hash samples 64 evenly spaced values of every base linear *before quantization*, rounded to bf16 so that
the same checkpoint loaded in fp32 or bf16 hashes the same. Quantization records it on the model (a quantized weight
cannot be hashed the same way), so a fingerprint taken after quantization still names the original weights. It lives
with the base it describes; the PEFT format (:mod:`lightning_qlora.lora.peft_format`) stores and checks it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_qlora.errors import QLoRAError
from lightning_qlora.quant.weight import quant_state_of

# Set on the model when its linears are quantized: the weight hash of the base before its linears were quantized.
WEIGHTS_HASH_ATTR = "_lightning_qlora_weights_sha256"
_SAMPLES_PER_LAYER = 64


class FingerprintMismatchError(QLoRAError, ValueError):
    """An adapter was trained on another base model than the one it is being loaded into."""


Sample = tuple[str, tuple[int, ...], "bytes | torch.Tensor"]


def weight_sample(name: str, weight: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """``(name, shape, bytes of 64 evenly spaced values rounded to bf16)``: what the weight hash is made of."""
    return name, tuple(weight.shape), _as_bytes(sample_values(weight))


def sample_values(weight: torch.Tensor) -> torch.Tensor:
    """The 64 evenly spaced values of ``weight`` the hash takes, rounded to bf16, where ``weight`` is (no device
    sync: a conversion can collect them and read them back once at the end).
    """
    flat = weight.detach().reshape(-1)
    count = min(_SAMPLES_PER_LAYER, flat.numel())
    # Integer spacing: a float linspace rounds past the last index for tensors of ~2**24 values and more.
    index = torch.arange(count, device=flat.device, dtype=torch.long) * (flat.numel() - 1) // max(1, count - 1)
    return flat[index].to(torch.bfloat16).float()


def digest_samples(samples: Iterable[Sample]) -> str:
    """sha256 over the samples of :func:`weight_sample` (or their :func:`sample_values`), in order."""
    digest = hashlib.sha256()
    for name, shape, values in samples:
        digest.update(f"{name}:{shape};".encode())
        digest.update(values if isinstance(values, bytes) else _as_bytes(values))
    return digest.hexdigest()


def weights_digest(named_weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over each weight's name, shape and 64 evenly spaced values (rounded to bf16)."""
    return digest_samples(weight_sample(name, weight) for name, weight in named_weights)


def base_fingerprint(model: nn.Module, linears: Sequence[tuple[str, nn.Linear]]) -> dict[str, Any]:
    """The fingerprint of ``model``'s base, given its base linears as ``(name, module)`` (adapters excluded).

    ``weights_sha256`` is the hash recorded at quantization time, the hash of the current weights when the model is
    not quantized, or ``None`` when it was quantized by something else (then only shapes can be compared).
    """
    shapes = [(name, (m.out_features, m.in_features)) for name, m in linears]
    shape_digest = hashlib.sha256(";".join(f"{n}:{s}" for n, s in shapes).encode()).hexdigest()
    weights_hash = getattr(model, WEIGHTS_HASH_ATTR, None)
    if weights_hash is None and not any(quant_state_of(m) is not None for _, m in linears):
        weights_hash = weights_digest((name, m.weight) for name, m in linears)
    config = getattr(model, "config", None)
    return {
        "architecture": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "num_linear": len(shapes),
        "shapes_sha256": shape_digest,
        "weights_sha256": weights_hash,
    }


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The differences that mean "another base model", as sentences; empty when they match."""
    problems = []
    for key, what in (("architecture", "architecture"), ("num_linear", "number of linear layers"),
                      ("shapes_sha256", "linear layer names/shapes")):
        if saved.get(key) != current.get(key):
            problems.append(f"{what} differ ({saved.get(key)} vs {current.get(key)})")
    saved_hash, current_hash = saved.get("weights_sha256"), current.get("weights_sha256")
    if saved_hash and current_hash and saved_hash != current_hash:
        problems.append(
            f"base weights differ (sample hash {saved['weights_sha256'][:12]} vs {current['weights_sha256'][:12]})"
        )
    return problems


def describe(fingerprint: dict[str, Any]) -> str:
    """``"<architecture> <name_or_path>"`` of a fingerprint, for messages."""
    return f"{fingerprint.get('architecture')} {fingerprint.get('name_or_path') or '(unnamed)'}"


def _as_bytes(values: torch.Tensor) -> bytes:
    return values.cpu().numpy().tobytes()
