"""The one place bitsandbytes is imported: lazily, with the version checked and an install hint on failure."""

from __future__ import annotations

import functools
from types import ModuleType

MIN_BITSANDBYTES = (0, 45, 0)
INSTALL_HINT = "pip install 'bitsandbytes>=0.45'"


class BitsandbytesUnavailableError(ImportError):
    """bitsandbytes is missing or too old for 4-bit quantization."""


@functools.cache
def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or raise :class:`BitsandbytesUnavailableError` naming the install command.

    Raises:
        BitsandbytesUnavailableError: when the package cannot be imported or is older than 0.45.
    """
    try:
        import bitsandbytes
    except ImportError as err:
        raise BitsandbytesUnavailableError(
            f"4-bit quantization needs bitsandbytes, which could not be imported ({err}). "
            f"Install it with: {INSTALL_HINT}  (or use QuantConfig(quant_type='none') for plain bf16 LoRA)."
        ) from err
    version = _parse_version(getattr(bitsandbytes, "__version__", "0"))
    if version < MIN_BITSANDBYTES:
        raise BitsandbytesUnavailableError(
            f"bitsandbytes {bitsandbytes.__version__} is too old: 4-bit training on CPU and CUDA needs >= "
            f"{'.'.join(map(str, MIN_BITSANDBYTES))}. Upgrade with: {INSTALL_HINT}"
        )
    return bitsandbytes


def _parse_version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)
