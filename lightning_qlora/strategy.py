"""QLoRA strategies: ``"qlora"`` (one device), ``"qlora_ddp"`` (Lightning's DDP), ``"qlora_fsdp"`` (Lightning's FSDP2)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_qlora.adapters import adapter_root
from lightning_qlora.calibration import CalibrationError
from lightning_qlora.checkpoint_io import AtomicCheckpointIO
from lightning_qlora.optim_in_backward import OptimizerInBackward
from lightning_qlora.precision import QLoRAPlugin
from lightning_qlora.quantize import has_quantized_linears, is_skipped, iter_linears
from lightning_qlora.sharding import (
    QuantStorageMismatchError,
    copy_full_into,
    full_tensor,
    is_sharded,
    shard_model,
    shard_unit,
    shard_units,
)

log = logging.getLogger(__name__)


class _QLoRAStrategyMixin:
    """What every QLoRA strategy adds to its Lightning base strategy: the plugin check, on-device conversion,
    adapter-only checkpoints restored after setup, and explained CUDA out-of-memory errors."""

    strategy_name: str
    # Calibrating the 4-bit codes needs the whole full-precision model in one process (one device only, for now).
    supports_calibration = False
    # A step inside backward sees a rank's own gradient, before DDP/FSDP reduce it: one device only.
    supports_optimizer_in_backward = False

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # The checkpoint holds adapter weights, which only exist once setup has quantized and injected the model.
        return True

    @override
    def setup(self, trainer: Trainer) -> None:
        plugin = self._qlora_plugin()
        self._calibrate_if_asked(trainer, plugin)
        super().setup(trainer)
        self._log_conversion(trainer, plugin)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        super().setup_optimizers(trainer)
        if any(isinstance(o, OptimizerInBackward) for o in self.optimizers):
            self._check_optimizer_in_backward(trainer)

    def _check_optimizer_in_backward(self, trainer: Trainer) -> None:
        problems = []
        if trainer.gradient_clip_val:
            problems.append(
                f"gradient_clip_val={trainer.gradient_clip_val} needs every gradient at once; set it to None"
            )
        if trainer.accumulate_grad_batches > 1:
            problems.append(
                f"accumulate_grad_batches={trainer.accumulate_grad_batches} needs the gradients kept across batches; "
                "use a larger batch instead"
            )
        if not self.supports_optimizer_in_backward:
            problems.append(
                f"strategy={self.strategy_name!r} reduces gradients across ranks after backward, too late for a step "
                "taken inside it; use strategy='qlora'"
            )
        if problems:
            raise ValueError(
                "OptimizerInBackward steps the adapters inside the backward pass and frees their gradients at once, so: "
                + "; ".join(problems) + ". Or use a plain optimizer."
            )

    @override
    def connect(self, model: Any) -> None:
        # Before any process group exists: refuse what this strategy cannot do with the plugin's settings.
        if isinstance(self.precision_plugin, QLoRAPlugin):
            self._refuse_unsupported_calibration(self.precision_plugin)
        super().connect(model)

    def _refuse_unsupported_calibration(self, plugin: QLoRAPlugin) -> None:
        if plugin.needs_calibration and not self.supports_calibration:
            raise CalibrationError(
                f"{plugin.describe_calibration()} calibrates on one device: strategy={self.strategy_name!r} is not "
                "supported yet. Use strategy='qlora', or calibration='none' and init_lora_weights='default'."
            )

    def _calibrate_if_asked(self, trainer: Trainer, plugin: QLoRAPlugin) -> None:
        module = self.lightning_module
        if not plugin.needs_calibration or module is None or has_quantized_linears(adapter_root(module)):
            return  # (a strategy that cannot calibrate refused already in connect)
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        batches = _calibration_batches(trainer, plugin.quant.calibration_samples, device)
        plugin.calibrate(module, batches)

    def _qlora_plugin(self) -> QLoRAPlugin:
        """The QLoRAPlugin (the default one when no precision was given), set to quantize on this device."""
        plugin = self.precision_plugin
        if type(plugin) is Precision:
            # No precision flag was given: the strategy alone means QLoRA with the defaults.
            plugin = QLoRAPlugin()
            self.precision_plugin = plugin
        if not isinstance(plugin, QLoRAPlugin):
            raise ValueError(
                f"strategy={self.strategy_name!r} needs the QLoRAPlugin precision plugin, but got "
                f"{type(plugin).__name__} (precision={getattr(plugin, 'precision', '?')!r}). Remove the `precision=` "
                "flag and pass plugins=[QLoRAPlugin(quant=QuantConfig(compute_dtype='bf16'))] to choose the compute dtype."
            )
        plugin.quantize_device = self.root_device
        if self.root_device.type == "cpu" and not _warned_cpu:
            _warn_cpu_once()
        return plugin

    def _log_conversion(self, trainer: Trainer, plugin: QLoRAPlugin) -> None:
        if trainer.state.fn == TrainerFn.FITTING and plugin.summary is not None:
            for logger in trainer.loggers:  # the conversion summary, once per fit, as metrics
                logger.log_metrics(plugin.summary.as_metrics(), step=trainer.global_step)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with _explain_out_of_memory(self, "the forward pass"):
            return super().training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with _explain_out_of_memory(self, "the backward pass"):
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        _materialize_meta(self.model, self.root_device)
        self.model.to(self.root_device)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return trainable_state_dict(self.lightning_module)

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        load_trainable_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)


def _calibration_batches(trainer: Trainer, samples: int, device: torch.device) -> list[Any]:
    """The first ``samples`` rows of the datamodule's training set, in index order (so a resumed run calibrates on
    the same data whatever the shuffling), collated as its training loader does and moved to ``device``."""
    datamodule = trainer.datamodule
    if datamodule is None:
        raise CalibrationError(
            "calibration needs training data at set-up: pass a LightningDataModule (trainer.fit(model, datamodule=dm))."
        )
    try:
        loader = datamodule.train_dataloader()
        dataset = loader.dataset
        count = min(samples, len(dataset))
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


class QLoRAStrategy(_QLoRAStrategyMixin, SingleDeviceStrategy):
    """Single-device strategy that converts the model on the accelerator and checkpoints adapters only.

    - Quantization runs on the training device, one linear at a time, so on CUDA conversion never holds more than the
      4-bit model plus one full-precision layer there. Layers built on the meta device (e.g. in ``configure_model``)
      are materialized one at a time on the device and quantized right away.
    - Without a :class:`QLoRAPlugin` in ``plugins`` it uses ``QLoRAPlugin()`` (NF4, double quant, bf16, LoRA r=16).
    - Lightning checkpoints (``.ckpt``) hold the trainable (adapter) weights, optimizer, schedulers, loops and RNG
      state, never the frozen base, which is rebuilt from the pretrained weights on resume. They are written
      atomically (:class:`AtomicCheckpointIO`).
    - CUDA out-of-memory errors are re-raised as :class:`QLoRAOutOfMemoryError` with the peak and the remedies.

    For several devices use :class:`QLoRADDPStrategy` (``strategy="qlora_ddp"``).

    Example:
        >>> trainer = Trainer(strategy="qlora", accelerator="cpu", max_steps=10)  # doctest: +SKIP
    """

    strategy_name = "qlora"
    supports_calibration = True
    supports_optimizer_in_backward = True

    def __init__(self, device: torch.device | str | int | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(device=device if device is not None else "cpu", **kwargs)
        # Filled in by the Trainer from `accelerator=`/`devices=` when the strategy is chosen by name.
        self.parallel_devices: list[torch.device] | None = None if device is None else [self._root_device]

    @property
    @override
    def root_device(self) -> torch.device:
        if self.parallel_devices:
            return self.parallel_devices[0]
        return self._root_device

    @override
    def setup(self, trainer: Trainer) -> None:
        if self.parallel_devices and len(self.parallel_devices) > 1:
            raise ValueError(
                f"strategy='qlora' trains on one device, but devices={len(self.parallel_devices)} were requested. "
                "Use strategy='qlora_ddp' for several devices (each rank quantizes its own copy; only adapter "
                "gradients are all-reduced)."
            )
        super().setup(trainer)


class QLoRADDPStrategy(_QLoRAStrategyMixin, DDPStrategy):
    """Data-parallel QLoRA through Lightning's own DDP: ``Trainer(strategy="qlora_ddp", devices=N)``.

    Each rank quantizes its own copy of the base on its device (layer by layer); DDP all-reduces only the gradients
    of parameters that require grad, i.e. the adapters. Checkpoints are adapter-only and written by rank zero;
    launching is Lightning's (its subprocess launcher, ``torchrun`` or SLURM), never ours.

    Example:
        >>> trainer = Trainer(strategy="qlora_ddp", accelerator="gpu", devices=2)  # doctest: +SKIP
    """

    strategy_name = "qlora_ddp"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("checkpoint_io", AtomicCheckpointIO())
        super().__init__(**kwargs)


class QLoRAFSDPStrategy(_QLoRAStrategyMixin, ModelParallelStrategy):
    """Fully sharded QLoRA through Lightning's own FSDP2 strategy: ``Trainer(strategy="qlora_fsdp", devices=N)``.

    Each rank builds the model (on the meta device for large ones) and quantizes it layer by layer on its device,
    with the packed 4-bit bytes stored in the compute dtype (``quant_storage``); as soon as a transformer block's
    last linear is quantized, the block gets its adapters and is sharded with ``fully_shard`` over all ranks, so a
    rank never holds more than its shards plus one whole block. Each GPU keeps ``1/N`` of the 4-bit base and of the
    adapters and their optimizer state. A packed weight stored in any other dtype is refused
    (:class:`~lightning_qlora.sharding.QuantStorageMismatchError`): FSDP would cast its bytes and destroy it.

    Checkpoints (``.ckpt``) hold the whole adapters and optimizer state gathered to rank zero, one file, never the
    base; :class:`~lightning_qlora.AdapterCheckpoint` writes a normal PEFT adapter. Launching is Lightning's.

    Args:
        shard_modules: class names of the modules sharded as units (default: the model's transformer blocks).
        reshard_after_forward: free gathered weights after each block's forward (less memory, one more all-gather
            in backward). ``False`` trades memory for speed.
        **kwargs: passed to Lightning's ``ModelParallelStrategy`` (``data_parallel_size``, ``process_group_backend``,
            ``timeout``).

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
        plugin = self._qlora_plugin()
        _resolve_quant_storage_for_fsdp(plugin)
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        root = adapter_root(self.model)
        units = shard_units(root, self.shard_modules)
        mesh = self.device_mesh["data_parallel"]
        sharded_now: list[str] = []

        def shard(name: str, unit: nn.Module) -> None:
            shard_unit(unit, mesh, plugin.dtype, reshard_after_forward=self.reshard_after_forward)
            sharded_now.append(name)

        # Quantize layer by layer on this rank's device; as soon as a block's last linear is done, adapt and shard
        # that block, so a rank never holds more than the sharded model plus one whole block.
        finish = _block_finisher(root, units, plugin, self.root_device, shard)
        self.model = plugin.convert_module(self.model, after_layer=finish)
        _materialize_meta(self.model, self.root_device)
        self.model.to(self.root_device)
        # Whatever was not sharded while converting (a model quantized beforehand, blocks without quantized
        # linears), then the root: embeddings, final norm, head.
        sharded_now += shard_model(root, mesh, plugin.dtype, units, reshard_after_forward=self.reshard_after_forward)
        self.sharded_units = sharded_now or self.sharded_units
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
        self._log_conversion(trainer, plugin)

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return True  # through load_optimizer_state_dict below, after the adapters are loaded

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Adapter-only checkpoints are small: every rank reads the whole file and takes its shards from it.
        path = self.broadcast(checkpoint_path)
        return self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)

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
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        assert self.model is not None
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            if not state["state"]:  # a stateless optimizer (e.g. SGD without momentum): only hyperparameters
                for group, saved in zip(optimizer.param_groups, state["param_groups"]):
                    group.update({k: v for k, v in saved.items() if k != "params"})
                continue
            state = _rekey_optimizer_state_if_needed(state, self.model)
            inner = getattr(optimizer, "_optimizer", optimizer)
            if hasattr(inner, "load_gathered_state_dict"):  # AdamW8bit: each rank's shard, one tensor at a time
                inner.load_gathered_state_dict(self.model, state)
                continue
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
            )


def _block_finisher(
    root: nn.Module,
    units: list[tuple[str, nn.Module]],
    plugin: QLoRAPlugin,
    device: torch.device,
    shard: Callable[[str, nn.Module], Any],
) -> Callable[[str, nn.Module], None]:
    """An ``after_layer`` hook for :func:`quantize_model`: when the last quantized linear of a block is done, the
    block is materialized, cast and adapted (:meth:`QLoRAPlugin.prepare_block`) and handed to ``shard``."""
    to_quantize = [name for name, _ in iter_linears(root) if not is_skipped(name, plugin.quant.skip_modules)]
    last_of: dict[str, tuple[str, nn.Module, set[str]]] = {}
    for unit_name, unit in units:
        inside = [name for name in to_quantize if name.startswith(unit_name + ".")]
        if inside:
            last_of[inside[-1]] = (unit_name, unit, set(inside))

    def finish(name: str, _: nn.Module) -> None:
        if name not in last_of:
            return
        unit_name, unit, linear_names = last_of[name]
        _materialize_meta(unit, device)
        unit.to(device)
        plugin.prepare_block(root, unit, linear_names)
        shard(unit_name, unit)

    return finish


def _resolve_quant_storage_for_fsdp(plugin: QLoRAPlugin) -> None:
    """Under FSDP the packed bytes must be stored in the compute dtype: pick it for "auto", refuse anything else."""
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


class QLoRAOutOfMemoryError(torch.cuda.OutOfMemoryError):
    """CUDA ran out of memory; the message has the measured peak and the settings that lower it."""


@contextmanager
def _explain_out_of_memory(strategy: Any, phase: str) -> Iterator[None]:
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:
        if isinstance(err, QLoRAOutOfMemoryError):
            raise
        device = strategy.root_device
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        module = strategy.lightning_module
        step = module.trainer.global_step if module is not None and module._trainer is not None else "?"
        raise QLoRAOutOfMemoryError(
            f"CUDA ran out of memory in {phase} at step {step} on {torch.cuda.get_device_name(device)}: peak allocated "
            f"{peak:.2f} GiB of {total:.1f} GiB. To lower it: a smaller batch (data.batch_size), shorter sequences "
            "(data.max_length), activation checkpointing (model.gradient_checkpointing=true), a smaller LoRA rank "
            f"(lora.r), or an 8-bit optimizer. (torch: {str(err).splitlines()[0][:200]})"
        ) from err


_warned_cpu = False


def _warn_cpu_once() -> None:
    global _warned_cpu
    _warned_cpu = True
    rank_zero_warn(
        "QLoRA is running on the CPU (no GPU requested or none found): bitsandbytes' CPU kernels work but are slow; "
        "fine for small models such as SmolLM2-135M. Pass accelerator='gpu' on a machine with CUDA."
    )


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad (the adapters), detached and whole, keyed by qualified name.

    Sharded (FSDP) parameters are all-gathered one at a time and moved to the CPU, so a rank never holds all the
    whole adapters on its GPU (65B at r 64: 3 GiB); under FSDP every rank must call this.
    """
    return {
        name: full_tensor(p.detach()).cpu() if is_sharded(p) else p.detach()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load adapter weights saved by :func:`trainable_state_dict` into ``module``.

    Raises:
        KeyError: with ``strict``, when the checkpoint lacks a trainable weight of the model or has unknown keys.
        ValueError: when a weight's shape differs.
    """
    params = dict(module.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    unknown = sorted(set(state) - set(params))
    missing = sorted(expected - set(state))
    if strict and (unknown or missing):
        raise KeyError(
            f"The checkpoint does not match the model's trainable weights: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unknown[:5]} ({len(unknown)} in all). Was it saved with the same "
            "LoRAConfig (r, target_modules) and model? Pass strict=False to load what matches."
        )
    with torch.no_grad():
        for name, value in state.items():
            if name not in params:
                continue
            target = params[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"Checkpoint weight {name!r} has shape {tuple(value.shape)} but the model's has "
                    f"{tuple(target.shape)}: the checkpoint was saved with another rank or model."
                )
            copy_full_into(target, value)


def _materialize_meta(model: nn.Module, device: torch.device) -> None:
    # Parameters the quantizer did not touch (embeddings, norms) may still be on the meta device when the model was
    # built there; give them their own initialization on the target device.
    for name, module in model.named_modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.is_meta for t in tensors):
            module.to_empty(device=device, recurse=False)
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
            else:
                log.warning(
                    "%s (%s) was built on the meta device and has no reset_parameters(): its tensors are "
                    "uninitialized. Load real weights into it before training.",
                    name or "<root>",
                    type(module).__name__,
                )


def _register() -> None:
    descriptions = {
        QLoRAStrategy: "QLoRA on one device: 4-bit base converted on the device, adapter-only checkpoints",
        QLoRADDPStrategy: "QLoRA data-parallel through Lightning's DDP: each rank quantizes, adapters all-reduced",
        QLoRAFSDPStrategy: "QLoRA fully sharded through Lightning's FSDP2: 4-bit base and adapters sharded over ranks",
    }
    for cls, description in descriptions.items():
        if cls.strategy_name not in StrategyRegistry:
            StrategyRegistry.register(cls.strategy_name, cls, description=description)


_register()
