"""``strategy="qlora_fsdp"``: fully sharded QLoRA through Lightning's own FSDP2 strategy."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_qlora.lightning.checkpoint_io import AtomicCheckpointIO, require_lightning_checkpoint
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.lightning.strategies.mixin import QLoRAStrategyMixin, max_batch_tokens
from lightning_qlora.modules import find_blocks
from lightning_qlora.sharding import QuantStorageMismatchError, shard_model, shard_unit


class QLoRAFSDPStrategy(QLoRAStrategyMixin, ModelParallelStrategy):
    """Fully sharded QLoRA through Lightning's own FSDP2 strategy: ``Trainer(strategy="qlora_fsdp", devices=N)``.

    Each rank builds the model (on the meta device for large ones) and converts it block by block on its device,
    with the packed 4-bit bytes stored in the compute dtype (``quant_storage``); each block is sharded with
    ``fully_shard`` over all ranks as soon as the recipe yields it, so a rank never holds more than its shards plus
    one whole block. Each GPU keeps ``1/N`` of the 4-bit base and of the adapters and their optimizer state. A
    packed weight stored in any other dtype is refused (:class:`~lightning_qlora.QuantStorageMismatchError`): FSDP
    would cast its bytes and destroy it.

    Checkpoints (``.ckpt``) hold the whole adapters and optimizer state gathered to rank zero, one file, never the
    base; :class:`~lightning_qlora.AdapterCheckpoint` writes a normal PEFT adapter. Launching is Lightning's.

    Args:
        shard_modules: class names of the modules sharded as units (default: the model's transformer blocks).
        reshard_after_forward: free gathered weights after each block's forward (less memory, one more all-gather
            in backward). ``False`` trades memory for speed.
        **kwargs: passed to Lightning's ``ModelParallelStrategy`` (``data_parallel_size``, ``process_group_backend``,
            ``timeout``).

    Raises:
        QuantStorageMismatchError: at set-up, for a ``quant_storage`` other than ``"auto"`` or the compute dtype.

    Example:
        >>> trainer = Trainer(strategy="qlora_fsdp", accelerator="gpu", devices=2)  # doctest: +SKIP
    """

    strategy_name = "qlora_fsdp"

    def __init__(
        self, shard_modules: list[str] | None = None, reshard_after_forward: bool = True, **kwargs: Any
    ) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)  # one adapter-only file, not a folder of shards
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)
        self.checkpoint_io = AtomicCheckpointIO()
        self.shard_modules = list(shard_modules) if shard_modules else None
        self.reshard_after_forward = reshard_after_forward
        self.sharded_units: list[str] = []

    @override
    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes  # pure FSDP: shard over every rank
        super().setup_environment()

    @override
    def setup(self, trainer: Trainer) -> None:
        # Lightning's ModelParallelStrategy.setup would materialize the whole (meta) model in full precision and
        # demands a configure_model hook that applies the parallelism; here the recipe's blocks are sharded as they
        # come, so the remaining steps of Lightning's set-up are taken one by one, through public hooks.
        plugin = self.qlora_plugin()
        resolve_quant_storage_for_fsdp(plugin)
        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.convert(trainer, plugin)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            # (A fresh optimizer has no state to move to the device; a resumed one is loaded onto it later.)
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self.log_conversion(trainer, plugin)

    @override
    def convert(self, trainer: Trainer, plugin: QLoRAPlugin) -> None:
        """Run the recipe on this rank's device and shard each block as it arrives, then the root."""
        from torch.distributed.fsdp import FSDPModule

        assert self.model is not None
        mesh = self.device_mesh["data_parallel"]
        calibration = self.calibration_data(trainer, plugin)  # (None: FSDP refused calibration in connect)
        sharded: list[str] = []
        blocks = plugin.iter_converted_blocks(
            self.model, self.root_device, block_classes=self.shard_modules, calibrate_on=calibration,
            batch_tokens=max_batch_tokens(trainer),
        )
        for block in blocks:
            if not block.is_root:
                if not isinstance(block.module, FSDPModule):
                    shard_unit(block.module, mesh, plugin.dtype, reshard_after_forward=self.reshard_after_forward)
                    sharded.append(block.name)
                continue
            # Whatever was not sharded yet (blocks without linears of their own), then the root: embeddings, final
            # norm, head.
            units = find_blocks(block.module, self.shard_modules)
            sharded += shard_model(
                block.module, mesh, plugin.dtype, units, reshard_after_forward=self.reshard_after_forward
            )
        self.sharded_units = sharded or self.sharded_units

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True  # through load_optimizer_state_dict below, after the adapters are loaded

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Adapter-only checkpoints are small: every rank reads the whole file and takes its shards from it.
        path = self.broadcast(checkpoint_path)
        return require_lightning_checkpoint(self.checkpoint_io.load_checkpoint(path, weights_only=weights_only), path)

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the user's optimizer
        if not hasattr(inner, "gathered_state_dict"):
            return super().optimizer_state(optimizer)
        # AdamW8bit: gathered one moment at a time (DCP's full-state path would dequantize every moment on the device
        # at once); the same on-disk format as Lightning's (parameter ids), written by rank zero.
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        assert self.model is not None
        state = inner.gathered_state_dict(self.model)  # a collective: every rank
        if self.global_rank != 0:
            return {}
        return FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        assert self.model is not None
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            if not state["state"]:  # a stateless optimizer (e.g. SGD without momentum): only hyperparameters
                for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
                    group.update({k: v for k, v in saved.items() if k != "params"})
                continue
            if isinstance(next(iter(state["state"])), int):  # saved by parameter id: keyed by name for loading
                state = FullyShardedDataParallel.rekey_optim_state_dict(
                    state, OptimStateKeyType.PARAM_NAME, self.model
                )
            inner = getattr(optimizer, "_optimizer", optimizer)
            if hasattr(inner, "load_gathered_state_dict"):  # AdamW8bit: each rank's shard, one tensor at a time
                inner.load_gathered_state_dict(self.model, state)
                continue
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
            )


def resolve_quant_storage_for_fsdp(plugin: QLoRAPlugin) -> None:
    """Under FSDP the packed bytes must be stored in the compute dtype: the plugin's ``"auto"`` becomes it, anything
    else is refused.

    Raises:
        QuantStorageMismatchError: for an explicit ``quant_storage`` other than the compute dtype.
    """
    quant = plugin.quant
    if not quant.quantized or quant.quant_storage == quant.compute_dtype:
        return
    if quant.quant_storage != "auto":
        raise QuantStorageMismatchError(
            f"strategy='qlora_fsdp' needs QuantConfig(quant_storage=...) equal to the compute dtype "
            f"{quant.compute_dtype!r}, but it is {quant.quant_storage!r}: FSDP gathers every parameter as "
            f"{quant.compute_dtype} and would cast the packed 4-bit bytes as numbers, destroying them. Use "
            f"quant_storage='auto' or {quant.compute_dtype!r}."
        )
    plugin.quant = replace(quant, quant_storage=quant.compute_dtype)
