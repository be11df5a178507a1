"""Where the library keeps what it downloads or converts once."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LIGHTNING_QLORA_CACHE``, else ``$XDG_CACHE_HOME/lightning_qlora``, else ``~/.cache/lightning_qlora``."""
    explicit = os.environ.get("LIGHTNING_QLORA_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lightning_qlora"
