"""What every QLoRA strategy adds to its Lightning base strategy.

The plugin check, calibration at set-up, conversion on the training device (the recipe, block by block) before
Lightning's own set-up runs, adapter-only checkpoints restored after set-up, refusals of what a strategy cannot do,
and explained CUDA out-of-memory errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_qlora.calibration import CalibrationData, CalibrationError
from lightning_qlora.kernels.compile import CompileChoice
from lightning_qlora.lightning.calibration_data import calibration_batches
from lightning_qlora.lightning.checkpoint_io import require_lightning_checkpoint
from lightning_qlora.lightning.compile_watch import CompileWatch
from lightning_qlora.lightning.interruption import GracefulInterrupt, is_graceful_stop, save_interrupted_run
from lightning_qlora.lightning.oom import explain_out_of_memory
from lightning_qlora.lightning.plugin import QLoRAPlugin
from lightning_qlora.lora.state import load_trainable_state_dict, trainable_state_dict
from lightning_qlora.modules import adapter_root
from lightning_qlora.optim.in_backward import OptimizerInBackward
from lightning_qlora.quant.weight import has_quantized_linears


def max_batch_tokens(trainer: Trainer) -> int | None:
    """The tokens of the largest training batch, when the datamodule says (``max_batch_tokens``): what
    ``QLoRAPlugin(memory_budget_gib=...)`` plans for.
    """
    value = getattr(getattr(trainer, "datamodule", None), "max_batch_tokens", None)
    return int(value) if value else None


class QLoRAStrategyMixin(Strategy):
    """Mixed into a Lightning strategy (before it in the bases, so its hooks wrap the strategy's): see the module
    docstring. A subclass sets ``strategy_name``; the FSDP strategy overrides :meth:`convert` to shard each block.
    """

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
    def connect(self, model: Any) -> None:
        # Before any process group exists: refuse what this strategy cannot do with the plugin's settings.
        plugin = self.precision_plugin
        if isinstance(plugin, QLoRAPlugin) and plugin.needs_calibration and not self.supports_calibration:
            raise CalibrationError(
                f"{plugin.describe_calibration()} calibrates on one device: strategy={self.strategy_name!r} is not "
                "supported yet. Use strategy='qlora', or calibration='none' and init_lora_weights='default'."
            )
        super().connect(model)

    @override
    def setup(self, trainer: Trainer) -> None:
        plugin = self.qlora_plugin()
        self.convert(trainer, plugin)
        # Lightning's own set-up order; the plugin's convert_module finds the model converted and leaves it.
        super().setup(trainer)
        self.log_conversion(trainer, plugin)

    def convert(self, trainer: Trainer, plugin: QLoRAPlugin) -> None:
        """Calibrate if asked, then run the recipe on this device, handing each finished block to
        :meth:`consume_block`.
        """
        data = self.calibration_data(trainer, plugin)
        assert self.model is not None
        compile = self.compile_choice(trainer, plugin)
        blocks = plugin.iter_converted_blocks(
            self.model, self.root_device, calibrate_on=data, compile=compile, batch_tokens=max_batch_tokens(trainer)
        )
        for _ in blocks:
            pass  # each block stays on this device

    def compile_choice(self, trainer: Trainer, plugin: QLoRAPlugin) -> CompileChoice:
        """The plugin's ``compile`` for this run; while blocks are compiled, a :class:`CompileWatch` reads the
        compile counters before each training step.
        """
        static = getattr(getattr(trainer, "datamodule", None), "static_batch_shapes", None)
        choice = plugin.resolve_compile(self.root_device, static, distributed=getattr(self, "world_size", 1) > 1)
        if choice.kwargs is not None and trainer.state.fn == TrainerFn.FITTING:
            self._compile_watch = CompileWatch(cuda_graphs=choice.kwargs.get("mode") == "reduce-overhead")
        return choice

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        watch = getattr(self, "_compile_watch", None)
        if watch is not None and self.lightning_module is not None:
            watch.check(self.lightning_module.trainer)

    def calibration_data(self, trainer: Trainer, plugin: QLoRAPlugin) -> CalibrationData | None:
        """The datamodule's first rows on this device, when the plugin's settings need calibration: the recipe
        calibrates each block on them just before quantizing it.
        """
        module = self.lightning_module
        if not plugin.needs_calibration or module is None or has_quantized_linears(adapter_root(module)):
            return None  # (a strategy that cannot calibrate refused already in connect)
        batches = calibration_batches(trainer, plugin.quant.calibration_samples, self.root_device)
        return plugin.calibration_data(module, batches)

    def qlora_plugin(self) -> QLoRAPlugin:
        """The QLoRAPlugin (the default one when no precision was given).

        Raises:
            ValueError: for another precision plugin, naming the fix.
        """
        plugin = self.precision_plugin
        if type(plugin) is Precision:
            # No precision flag was given: the strategy alone means QLoRA with the defaults.
            plugin = QLoRAPlugin()
            self.precision_plugin = plugin
        if not isinstance(plugin, QLoRAPlugin):
            raise ValueError(
                f"strategy={self.strategy_name!r} needs the QLoRAPlugin precision plugin, but got "
                f"{type(plugin).__name__} (precision={getattr(plugin, 'precision', '?')!r}). Remove the `precision=` "
                "flag and pass plugins=[QLoRAPlugin(quant=QuantConfig(compute_dtype='bf16'))] to choose the compute "
                "dtype."
            )
        if self.root_device.type == "cpu":
            _warn_cpu_once(plugin.quant.compute_dtype)
        return plugin

    def log_conversion(self, trainer: Trainer, plugin: QLoRAPlugin) -> None:
        if trainer.state.fn == TrainerFn.FITTING and plugin.summary is not None:
            metrics = plugin.summary.as_metrics()
            if plugin.memory_plan is not None:
                metrics.update(plugin.memory_plan.as_metrics())
            for logger in trainer.loggers:  # the conversion summary (and memory plan), once per fit, as metrics
                logger.log_metrics(metrics, step=trainer.global_step)

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
                "OptimizerInBackward steps the adapters inside the backward pass and frees their gradients at once, "
                "so: " + "; ".join(problems) + ". Or use a plain optimizer."
            )

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._interrupt.install()  # a first Ctrl-C stops after the batch and saves, as SIGTERM does

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and is_graceful_stop(exception):
            assert isinstance(exception, SIGTERMException)
            save_interrupted_run(trainer, exception, by_ctrl_c=self._interrupt.pressed)

    @property
    def _interrupt(self) -> GracefulInterrupt:
        if not hasattr(self, "_graceful_interrupt"):
            self._graceful_interrupt = GracefulInterrupt()
        return self._graceful_interrupt

    @override
    def teardown(self) -> None:
        self._interrupt.remove()
        # Lightning moves the model to the CPU when fit ends. For a 4-bit model that is a second copy of it in host
        # memory (8.8 GiB at 13B, measured on the H200), undone by the next validate() or fit(): it stays on the
        # device instead. Everything else of Lightning's teardown runs as usual.
        module = self.lightning_module
        if module is None:
            super().teardown()
            return
        # (shadowed on this instance, for this call only)
        module.cpu = lambda: module  # type: ignore[method-assign]
        try:
            super().teardown()
        finally:
            del module.cpu

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with explain_out_of_memory(self, "the forward pass"):
            return super().training_step(*args, **kwargs)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with explain_out_of_memory(self, "the backward pass"):
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return require_lightning_checkpoint(checkpoint, checkpoint_path)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        assert self.lightning_module is not None
        return trainable_state_dict(self.lightning_module)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        plugin = self.precision_plugin
        saved = (checkpoint.get(type(plugin).__qualname__) or {}).get("conversion")
        if isinstance(plugin, QLoRAPlugin) and saved:  # before its adapters replace the model's
            plugin.check_resume(saved)
        load_trainable_state_dict(self.lightning_module, checkpoint["state_dict"], strict=strict)


_warned_cpu = False


def _warn_cpu_once(compute_dtype: str) -> None:
    global _warned_cpu
    if _warned_cpu:
        return
    _warned_cpu = True
    from lightning_qlora.hardware import has_native_bf16, preferred_compute_dtype

    slow_bf16 = ""
    if compute_dtype == "bf16" and not has_native_bf16("cpu"):
        slow_bf16 = (f" Compute in {preferred_compute_dtype('cpu')[1]}: pass QuantConfig(compute_dtype='fp32') "
                     "(the app's quant.compute_dtype=auto does).")
    rank_zero_warn(
        "QLoRA is running on the CPU (no GPU requested or none found): bitsandbytes' CPU kernels work but are slow; "
        "fine for small models such as SmolLM2-135M. Pass accelerator='gpu' on a machine with CUDA." + slow_bf16
    )
