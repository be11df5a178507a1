"""``AtomicCheckpointIO``: Lightning checkpoints that are never half-written and fail to load with a clear reason."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_qlora.errors import QLoRAError


class CheckpointLoadError(QLoRAError, RuntimeError):
    """A Lightning checkpoint is missing, truncated or corrupted."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write ``.ckpt`` files to a temporary file in the same directory, fsync, then rename over the target.

    A process killed while saving, or a full disk, leaves the previous checkpoint intact. Loading a damaged file
    raises :class:`CheckpointLoadError` naming the file and the reason instead of an unpickling traceback.
    ``strategy="qlora"`` uses it by default.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
            raise OSError(
                err.errno, f"Could not write checkpoint {target}: {reason}. The previous checkpoint there is intact; "
                "free space or point the checkpoint dirpath elsewhere."
            ) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load a ``.ckpt`` with ``weights_only=True`` unless the caller passes ``False`` for a file it trusts: no
        pickle runs, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.

        Raises:
            CheckpointLoadError: a missing file, a directory, a truncated or corrupted file, a file that is not a
                Lightning checkpoint, or one holding objects the weights-only loader refuses (the message says how to
                load a trusted one).
        """
        target = Path(path)
        if target.is_dir():
            raise CheckpointLoadError(
                f"Checkpoint {target} is a directory, not a .ckpt file: point at a file in it, e.g. {target}/last.ckpt."
            )
        if not target.is_file():
            raise CheckpointLoadError(f"Checkpoint {target} does not exist.")
        safe = True if weights_only is None else weights_only
        try:
            loaded = super().load_checkpoint(path, map_location=map_location, weights_only=safe)
        except (RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
            raise CheckpointLoadError(
                f"Checkpoint {target} cannot be loaded: truncated or corrupted ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}). Resume from an earlier checkpoint in {target.parent}."
            ) from None
        except Exception as err:  # pickle.UnpicklingError and friends
            if safe and "Unsupported global" in str(err):  # an object the weights-only loader will not build
                raise CheckpointLoadError(
                    f"Checkpoint {target} holds Python objects beyond tensors and plain values, which the weights-only "
                    f"loader refuses (so no code in the file runs): {str(err).splitlines()[-1][:200]}. If you trust "
                    "the file, load it with trainer.fit(..., weights_only=False)."
                ) from None
            raise CheckpointLoadError(
                f"Checkpoint {target} cannot be loaded: not a valid checkpoint ({type(err).__name__})."
            ) from None
        if not isinstance(loaded, dict):
            raise CheckpointLoadError(not_a_lightning_checkpoint(target, type(loaded).__name__))
        return loaded


def require_lightning_checkpoint(checkpoint: dict[str, Any], path: Any) -> dict[str, Any]:
    """``checkpoint`` if it is what Lightning resumes from (its version and a state dict), else a named refusal.

    Raises:
        CheckpointLoadError: for a dict that Lightning did not write (a plain state dict, ...).
    """
    if "state_dict" not in checkpoint or "pytorch-lightning_version" not in checkpoint:
        raise CheckpointLoadError(not_a_lightning_checkpoint(Path(path), "a plain dict, no Lightning state"))
    return checkpoint


def not_a_lightning_checkpoint(path: Path, kind: str) -> str:
    return (
        f"Checkpoint {path} is not a Lightning checkpoint (it holds {kind}): resume from a .ckpt that Trainer / "
        "ModelCheckpoint wrote."
    )
