"""The calibration batches a QLoRA strategy reads from the datamodule at set-up."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Trainer

from lightning_qlora.calibration import CalibrationError


def calibration_batches(trainer: Trainer, samples: int, device: torch.device) -> list[Any]:
    """The first ``samples`` rows of the datamodule's training set (a packed item counts as the rows it holds), in
    index order (so a resumed run calibrates on the same data whatever the shuffling), collated as its training loader
    does and moved to ``device``.

    Raises:
        CalibrationError: without a datamodule, or when its training loader cannot be built.
    """
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise CalibrationError(
            "calibration needs training data at set-up: pass a LightningDataModule (trainer.fit(model, datamodule=dm))."
        )
    try:
        loader = datamodule.train_dataloader()
        dataset = loader.dataset
        # A packed item holds several rows (``rows_per_item``): ``samples`` counts rows, so read that many fewer.
        per_item = float(getattr(dataset, "rows_per_item", 1.0)) or 1.0
        count = min(max(1, math.ceil(samples / per_item)), len(dataset))
    except Exception as err:  # a datamodule without a ready training set (e.g. set up for "validate" only)
        raise CalibrationError(
            f"calibration reads its sequences from {type(datamodule).__name__}.train_dataloader(), which failed: "
            f"{type(err).__name__}: {err}. Set up the training data before fit/validate, or turn calibration off "
            "(calibration='none' and init_lora_weights='default')."
        ) from err
    size = loader.batch_size or 8
    return [
        move_data_to_device(loader.collate_fn([dataset[i] for i in range(start, min(start + size, count))]), device)
        for start in range(0, count, size)
    ]
