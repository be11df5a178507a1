"""Experiment tracking: a W&B logger that runs offline by itself when there is no API key or no network."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Literal

from lightning_qlora._imports import require

log = logging.getLogger(__name__)

WANDB_HOST = "api.wandb.ai"


def wandb_mode(requested: Literal["auto", "online", "offline", "disabled"] = "auto") -> str:
    """The W&B mode to use: ``WANDB_MODE`` wins; ``auto`` is online only with an API key and a reachable server."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if requested != "auto":
        return requested
    if not _has_api_key():
        return "offline"
    if not _reachable(os.environ.get("WANDB_BASE_URL", WANDB_HOST)):
        log.warning("W&B API key found but %s is unreachable: logging offline.", WANDB_HOST)
        return "offline"
    return "online"


def wandb_logger(
    project: str = "lightning-qlora",
    name: str | None = None,
    save_dir: str = ".",
    mode: Literal["auto", "online", "offline", "disabled"] = "auto",
    log_model: bool = False,
    tags: list[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger`` that never hangs or prompts.

    Args:
        project: W&B project name.
        name: run name (W&B picks one when ``None``).
        save_dir: where the ``wandb/`` run directory goes (the Hydra run directory by default).
        mode: ``auto`` (online with an API key and network, else offline), ``online``, ``offline`` or ``disabled``.
        log_model: passed to ``WandbLogger`` (the CLI logs the adapter as an artifact itself).
        tags: run tags.
        **kwargs: passed to Lightning's ``WandbLogger``.

    Raises:
        MissingDependencyError: when wandb is not installed, with the install command.
    """
    wandb = require("wandb", "The W&B logger (logger=wandb; logger=csv needs nothing more)")
    from lightning.pytorch.loggers import WandbLogger

    resolved = wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(init_timeout=60, silent=True, console="off")
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=resolved == "offline",
        mode=resolved,
        log_model=log_model,
        tags=list(tags) if tags else None,
        settings=settings,
        **kwargs,
    )


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(WANDB_HOST)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _reachable(host: str, timeout: float = 3.0) -> bool:
    host = host.split("://")[-1].split("/")[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
