"""Calibration block by block while the recipe converts: what a model that never exists whole in full precision
(a streamed checkpoint) needs, with the same statistics as calibrating first. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_qlora.calibration import (
    BlockCalibration,
    CalibrationData,
    CalibrationError,
    CalibrationReport,
    ErrorCorrectingInit,
    eval_mode,
    require_blocks,
)
from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.quant.streaming import StreamedWeights

# The dtype a block is calibrated in: the statistics and GPTQ codes of the full-precision model.
CALIBRATION_DTYPE = torch.float32


class CalibrationDuringConversion:
    """Calibrates each block just before the recipe quantizes it (``iter_converted_blocks(calibrate_on=...)``).

    Created before the first block is converted: everything outside the blocks (embeddings, rotary tables) is made
    full precision where the batches are, and the batches are run up to the first block. Then :meth:`block` reads one
    block in full precision (from the checkpoint, for a streamed model), takes its statistics, GPTQ codes and adapter
    factors, and moves the inputs on to its outputs, before the recipe quantizes it.

    Raises:
        CalibrationError: for a model on the meta device without a checkpoint (random weights), or without blocks.
    """

    def __init__(
        self,
        model: nn.Module,
        quant: QuantConfig,
        lora: LoRAConfig | None,
        data: CalibrationData,
        streamed: StreamedWeights | None,
        target: torch.device | None,
        block_of: Callable[[str], str],
    ) -> None:
        if streamed is None and any(p.is_meta for p in model.parameters()):
            raise CalibrationError(
                "calibration needs the pretrained weights, but this model was built on the meta device without a "
                "checkpoint (its weights would be random). Build it with lightning_qlora.stream_pretrained(path), or "
                "use calibration='none' and init_lora_weights='default'."
            )
        blocks = require_blocks(model)
        self.model, self.streamed, self.target = model, streamed, target
        self.collector = ErrorCorrectingInit(quant, lora) if data.adapter_init and lora is not None else None
        rounding = "gptq" if data.gptq else "nearest"
        self.calibration = BlockCalibration(quant, rounding, on_layer=self.collector)
        self.rounded: dict[str, torch.Tensor] = {}
        # What runs before the first block (embeddings, rotary tables) in full precision, where the batches are.
        block_names = {name for name, _ in blocks}
        for name, module in model.named_modules():
            if name in block_names or block_of(name):
                continue  # a block or inside one: it comes in its turn
            if streamed is not None:
                streamed.materialize(name, module, target or torch.device("cpu"), CALIBRATION_DTYPE, recurse=False)
            if target is not None:
                _move_own_tensors(module, target)
        with eval_mode(model):
            self.calibration.begin(blocks[0][1], data.batches, data.forward)

    def block(self, name: str, block: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The block's GPTQ codes and adapter factors, from the block in full precision."""
        if self.streamed is not None:
            self.streamed.materialize(name, block, self.target or torch.device("cpu"), CALIBRATION_DTYPE)
        if self.target is not None:
            block.to(self.target)
        rounded = self.calibration.block(name, block)
        self.rounded.update(rounded)
        factors = {}
        if self.collector is not None:
            factors, self.collector.factors = self.collector.factors, {}
        return rounded, factors

    def finish(self) -> CalibrationReport:
        return self.calibration.finish(self.model, self.rounded)


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    # Only the module's own tensors: its children may be blocks, converted one at a time later.
    for param in module.parameters(recurse=False):
        if not param.is_meta:
            param.data = param.data.to(device)
    for key, buffer in module.named_buffers(recurse=False):
        if buffer is not None and not buffer.is_meta:
            module._buffers[key] = buffer.to(device)
