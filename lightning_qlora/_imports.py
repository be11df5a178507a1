"""The one place optional and version-checked packages are imported: lazily, with the install command on failure."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from lightning_qlora.errors import QLoRAError

MIN_BITSANDBYTES = (0, 45, 0)
BITSANDBYTES_INSTALL = "pip install 'bitsandbytes>=0.45'"
APP_INSTALL = "pip install 'lightning-qlora[app]'"


class BitsandbytesUnavailableError(QLoRAError, ImportError):
    """bitsandbytes is missing or too old for 4-bit quantization."""


class MissingDependencyError(QLoRAError, ImportError):
    """An optional package a feature needs is not installed; the message has the install command."""


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
            f"Install it with: {BITSANDBYTES_INSTALL}  (or use QuantConfig(quant_type='none') for plain bf16 LoRA)."
        ) from err
    version = _parse_version(getattr(bitsandbytes, "__version__", "0"))
    if version < MIN_BITSANDBYTES:
        raise BitsandbytesUnavailableError(
            f"bitsandbytes {bitsandbytes.__version__} is too old: 4-bit training on CPU and CUDA needs >= "
            f"{'.'.join(map(str, MIN_BITSANDBYTES))}. Upgrade with: {BITSANDBYTES_INSTALL}"
        )
    return bitsandbytes


def require(module: str, feature: str, install: str = APP_INSTALL) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingDependencyError` saying how to install it.

    Raises:
        MissingDependencyError: naming the feature, the package and ``install``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{feature} needs the package {module.split('.')[0]!r}, which could not be imported ({err}). "
            f"Install it with: {install}"
        ) from err


def _parse_version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)
