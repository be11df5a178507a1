"""``QLoRAPlugin``: the Lightning precision plugin that turns any LightningModule into a QLoRA fine-tune.

It sets the dtypes and runs the conversion recipe (:mod:`lightning_qlora.convert`) with its settings; the strategies
decide where (the device) and with what calibration result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_qlora.calibration import (
    CalibrationData,
    CalibrationError,
    CalibrationResult,
    calibrate,
    default_forward,
)
from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.convert import ConversionSummary, ConvertedBlock, iter_converted_blocks
from lightning_qlora.errors import QLoRAError
from lightning_qlora.kernels.compile import CompileChoice, choose_compile, compile_blocks
from lightning_qlora.lightning.coverage import STRICT_SHARE, check_quantization_coverage
from lightning_qlora.lightning.memory import eager_for_memory_measures, plan_and_apply
from lightning_qlora.lightning.rng import capture_rng_state, restore_rng_state
from lightning_qlora.lora.inject import mark_only_lora_as_trainable
from lightning_qlora.memory_plan import MemoryPlan
from lightning_qlora.modules import adapter_root
from lightning_qlora.quant.weight import has_quantized_linears

log = logging.getLogger(__name__)

#: ``torch.compile``'s modes, accepted as ``QLoRAPlugin(compile=...)`` (and the app's ``compile=...``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_PRECISION_OF = {"bf16": "bf16-true", "fp16": "16-true", "fp32": "32-true"}


class _Default:
    """Marks an argument left at its default, so ``lora=None`` can mean "no adapters"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


class ResumeMismatchError(QLoRAError, ValueError):
    """A checkpoint was saved with another base model or with settings that change what the model computes."""


class QLoRAPlugin(Precision):
    """Store linear layers in 4-bit (NF4 + double quantization by default), compute in bf16, train LoRA adapters.

    When the strategy sets the model up, every ``nn.Linear`` of the model (except ``quant.skip_modules``) is replaced
    by a bitsandbytes 4-bit linear, the base is frozen, and LoRA adapters are injected into the targeted linears.
    Only adapter parameters then require grad, so an optimizer built from ``self.parameters()`` trains the
    adapters only. Floating-point inputs are cast to the compute dtype, outputs back to fp32.

    Names in ``target_modules`` and ``skip_modules`` are relative to the LightningModule's ``model`` attribute when
    it has one (the common ``self.model = AutoModelForCausalLM...`` layout), otherwise to the LightningModule.

    Args:
        quant: quantization settings; ``QuantConfig()`` by default. ``QuantConfig(quant_type="none")`` keeps the
            base in ``compute_dtype`` unquantized (plain LoRA, same code path).
        lora: adapter settings; ``LoRAConfig()`` by default. ``None`` only quantizes and freezes.
        compile: ``torch.compile`` each transformer block after conversion (``True``, a ``torch.compile`` mode such
            as ``"reduce-overhead"``, or a dict of ``torch.compile`` arguments). Faster steps on CUDA; with
            ``"reduce-overhead"`` each block's forward and backward also run as CUDA graphs. Activation
            checkpointing (transformers' ``gradient_checkpointing_enable``) then happens inside the compiled blocks
            (:mod:`lightning_qlora.kernels.compile`). The first steps pay the compile time. ``"auto"`` (the default)
            compiles on CUDA under ``strategy="qlora"``, with CUDA graphs when the datamodule says every batch has
            one shape (``static_batch_shapes = True``, as packed data does), and stays eager on the CPU and under
            DDP/FSDP; one log line says what it chose and why. ``False`` is eager everywhere. While compiled, graph
            breaks, recompiles after warm-up and CUDA-graph skips are warned about and logged (``compile/*``).
        strict: refuse to train when more than this share of the model's matrix weights stayed in full precision
            because the recipe could not quantize them (MoE experts, ``Conv1D``, other matrices; the summary line
            names them): ``True`` is 5%, a float sets the share, ``False`` (the default) only reports them.
        memory_budget_gib: fit each training step into this much device memory (peak allocated, GiB): before the
            first step the cheapest of checkpointing, MLP tiles and offloading blocks' inputs to host memory that fits
            is chosen from the model's shapes and logged (:mod:`lightning_qlora.memory_plan`; tiles and offloading
            turn compile off). ``None`` (the default): memory is the user's settings.
        max_batch_tokens: tokens of the largest training batch, for the plan (default: the datamodule's).
        resume_mismatch: resuming a checkpoint saved with another base (its weights' fingerprint) or with settings
            that change what the model computes (quant type, double quant, blocksize, compute dtype, calibration,
            rank, alpha, rsLoRA, DoRA) is refused (``"error"``), or only warned about (``"warn"``, on purpose).

    Raises:
        TypeError: for a ``quant``, ``lora`` or ``compile`` of the wrong kind, naming the accepted ones.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=8))], accelerator="cpu")  # doctest: +SKIP

    Logged once at fit start: ``qlora/layers_quantized``, ``qlora/linear_bytes_before`` and ``..._after`` (bytes),
    ``qlora/bits_per_param``, ``qlora/trainable_params``, ``qlora/total_params``, ``qlora/trainable_percent``.

    Attributes:
        summary: what the last conversion did (:class:`~lightning_qlora.convert.ConversionSummary`).
        adapters_from_checkpoint: set by :meth:`restore_adapters_from_checkpoint`.
    """

    precision = "bf16-true"

    def __init__(
        self,
        quant: QuantConfig | None = None,
        lora: LoRAConfig | _Default | None = DEFAULT,
        compile: bool | str | dict[str, Any] = "auto",
        resume_mismatch: Literal["error", "warn"] = "error",
        strict: bool | float = False,
        memory_budget_gib: float | None = None,
        max_batch_tokens: int | None = None,
    ) -> None:
        if isinstance(lora, _Default):
            lora = LoRAConfig()
        if quant is not None and not isinstance(quant, QuantConfig):
            raise TypeError(f"QLoRAPlugin(quant={quant!r}) must be a QuantConfig, e.g. QuantConfig(quant_type='nf4').")
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise TypeError(f"QLoRAPlugin(lora={lora!r}) must be a LoRAConfig or None, e.g. LoRAConfig(r=16).")
        if isinstance(compile, str) and compile in COMPILE_MODES:
            compile = {"mode": compile}
        if not isinstance(compile, (bool, dict)) and compile != "auto":
            raise TypeError(
                f"QLoRAPlugin(compile={compile!r}) must be 'auto', True, False, a torch.compile mode "
                f"({', '.join(COMPILE_MODES)}) or a dict of torch.compile arguments."
            )
        self.quant = quant or QuantConfig()
        self.lora = lora
        self.compile = compile
        self.precision = _PRECISION_OF[self.quant.compute_dtype]  # type: ignore[assignment]
        self.dtype = self.quant.torch_compute_dtype
        if resume_mismatch not in ("error", "warn"):
            raise ValueError(f"QLoRAPlugin(resume_mismatch={resume_mismatch!r}) must be 'error' or 'warn'.")
        self.resume_mismatch = resume_mismatch
        if isinstance(strict, bool):
            strict = STRICT_SHARE if strict else 1.0
        if not isinstance(strict, (int, float)) or not 0.0 <= strict <= 1.0:
            raise ValueError(f"QLoRAPlugin(strict={strict!r}) must be True, False or a share in [0, 1], e.g. 0.05.")
        self.strict = float(strict)
        if memory_budget_gib is not None and not memory_budget_gib > 0:
            raise ValueError(f"QLoRAPlugin(memory_budget_gib={memory_budget_gib!r}) must be a positive number of GiB.")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"QLoRAPlugin(max_batch_tokens={max_batch_tokens!r}) must be a positive token count.")
        self.memory_budget_gib = memory_budget_gib
        self.max_batch_tokens = max_batch_tokens
        self.memory_plan: MemoryPlan | None = None
        self.summary: ConversionSummary | None = None
        self.adapters_from_checkpoint = False

    @property
    def needs_calibration(self) -> bool:
        """Whether conversion needs :meth:`calibrate` first: GPTQ-rounded codes (``QuantConfig.calibration``) or
        error-correcting adapters (``LoRAConfig.init_lora_weights="cloq"``) both come from calibration data.
        """
        return self.quant.calibration != "none" or self._computes_adapter_init()

    def restore_adapters_from_checkpoint(self) -> None:
        """Say that the next conversion's adapters will be overwritten from a checkpoint: call it before
        ``trainer.fit(..., ckpt_path=...)`` to skip computing their initial values (``init_lora_weights="cloq"``;
        Lightning restores a checkpoint only after the strategy's set-up, so the plugin cannot tell by itself).
        GPTQ calibration still runs: the base's codes are not in the checkpoint. Lasts one conversion.
        """
        self.adapters_from_checkpoint = True

    def _computes_adapter_init(self) -> bool:
        # A base kept in the compute dtype has no rounding error to correct: cloq is then the default init (B = 0).
        cloq = self.lora is not None and self.lora.init_lora_weights == "cloq" and self.quant.quantized
        return cloq and not self.adapters_from_checkpoint

    def resolve_compile(
        self, device: torch.device, static_shapes: bool | None = None, distributed: bool = False
    ) -> CompileChoice:
        """What :attr:`compile` means for a run on ``device`` (see the ``compile`` argument): the strategy asks
        before converting and passes the answer to :meth:`iter_converted_blocks`.
        """
        return choose_compile(self.compile, device, static_shapes, distributed)

    def describe_calibration(self) -> str:
        """What calibration chooses, as the settings that ask for it (for messages)."""
        settings = []
        if self.quant.calibration != "none":
            settings.append(f"QuantConfig(calibration={self.quant.calibration!r})")
        if self._computes_adapter_init():
            settings.append("LoRAConfig(init_lora_weights='cloq')")
        return " and ".join(settings)

    def calibrate(
        self, module: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None
    ) -> CalibrationResult:
        """Run ``module`` on ``batches`` for what :attr:`needs_calibration`: the 4-bit codes of its base
        (``QuantConfig(calibration="gptq")``) and the error-correcting adapter factors
        (``LoRAConfig(init_lora_weights="cloq")``). Pass the result to :meth:`iter_converted_blocks`. ``module`` (a
        LightningModule or a model) must still be in full precision; ``forward(batch)`` runs it (default:
        ``module(**batch)`` for a mapping, else ``module(batch)``).
        """
        lora = self.lora if self._computes_adapter_init() else None
        result = calibrate(adapter_root(module), batches, self.quant, lora, forward or default_forward(module))
        rank_zero_info(f"Calibrated {self.describe_calibration()} {result.report.as_text()}.")
        return result

    def calibration_data(
        self, module: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None
    ) -> CalibrationData:
        """``batches`` as what :attr:`needs_calibration` asks the recipe to calibrate on while converting ``module``
        (a LightningModule or a model); ``forward(batch)`` runs it (default: ``module(**batch)`` or ``module(batch)``).
        """
        return CalibrationData(
            list(batches), forward or default_forward(module), gptq=self.quant.calibration == "gptq",
            adapter_init=self._computes_adapter_init(),
        )

    @override
    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize, freeze and adapt ``module`` in place where it is (see the class docstring).

        Lightning's own strategies call this; the QLoRA strategies convert on the device first (this then finds the
        model converted and leaves it as it is).
        """
        for _ in self.iter_converted_blocks(module):
            pass
        return module

    def iter_converted_blocks(
        self,
        module: nn.Module,
        device: torch.device | None = None,
        calibration: CalibrationResult | None = None,
        block_classes: list[str] | None = None,
        calibrate_on: CalibrationData | None = None,
        compile: CompileChoice | None = None,
        batch_tokens: int | None = None,
    ) -> Iterator[ConvertedBlock]:
        """The recipe (:func:`~lightning_qlora.convert.iter_converted_blocks`) with this plugin's settings, on
        ``module``'s model: each transformer block as it is finished, then the root. Before the root is yielded the
        whole LightningModule is frozen but for its adapters, the blocks are compiled if asked, and :attr:`summary`
        is set and logged, and with ``memory_budget_gib`` the memory plan is made for batches of ``batch_tokens``
        tokens (the plugin's ``max_batch_tokens`` first) and applied. Calibration comes as a result
        (``calibration``, e.g. from :meth:`calibrate`) or as batches to calibrate on block by block while converting
        (``calibrate_on``, from :meth:`calibration_data`).

        Raises:
            CalibrationError: when :attr:`needs_calibration` and no ``calibration`` is given for a full-precision
                model.
        """
        root = adapter_root(module)
        already_quantized = has_quantized_linears(root)
        needs_calibration = self.needs_calibration and not already_quantized
        if needs_calibration and calibration is None and calibrate_on is None:
            raise CalibrationError(
                f"{self.describe_calibration()} comes from training data, but no calibration ran before conversion. "
                "Use strategy='qlora' with a LightningDataModule (it calibrates on the first calibration_samples "
                "training sequences), or convert the model yourself first: lightning_qlora.convert_model(model, "
                "quant, lora, calibration=lightning_qlora.calibrate(model, batches, quant, lora))."
            )
        wanted_init = self._computes_adapter_init()
        self.adapters_from_checkpoint = False  # (one conversion's worth)
        for piece in iter_converted_blocks(
            root, self.quant, self.lora, device=device, calibration=calibration if needs_calibration else None,
            calibrate_on=calibrate_on if needs_calibration else None, block_classes=block_classes,
        ):
            if piece.is_root:
                assert piece.summary is not None
                if compile is None:  # Lightning's own strategies: decided here, from where the model is
                    compile = self.resolve_compile(
                        _device_of(root), None, torch.distributed.is_available() and torch.distributed.is_initialized()
                    )
                if self.memory_budget_gib is not None:
                    self.memory_plan = plan_and_apply(
                        module, root, self.memory_budget_gib, self.max_batch_tokens or batch_tokens, self.dtype,
                        _device_of(root),
                    )
                compile = eager_for_memory_measures(root, compile)
                self._finish(module, root, piece.summary, wanted_init and already_quantized, compile)
            yield piece

    def _finish(
        self, module: nn.Module, root: nn.Module, summary: ConversionSummary, init_impossible: bool,
        compile: CompileChoice,
    ) -> None:
        if summary.calibration is not None:
            rank_zero_info(f"Calibrated {self.describe_calibration()} block by block {summary.calibration.as_text()}.")
        if self.lora is not None:
            mark_only_lora_as_trainable(module)  # parameters the LightningModule holds beside its model, too
            if summary.initialized:
                rank_zero_info(
                    f"Initialized {len(summary.initialized)} of {len(summary.adapted)} adapters to correct the 4-bit "
                    "rounding error (init_lora_weights='cloq')."
                )
            elif init_impossible and summary.adapted:
                rank_zero_warn(
                    "init_lora_weights='cloq' needs the full-precision weights, but this model's linears were already "
                    f"4-bit: its {len(summary.adapted)} new adapters start at zero (the default init). Give the plugin "
                    "the full-precision model to get the error-correcting init."
                )
        if compile.kwargs is not None and not _is_compiled(root):
            compile_blocks(root, **compile.kwargs)
        if summary.changed_anything:
            rank_zero_info(f"QLoRA fast path: {compile.reason}; LoRA {_lora_path(root)}.")
        check_quantization_coverage(summary, self.strict)
        if not summary.changed_anything and self.summary is not None:
            return  # e.g. validate() after fit(): keep the first summary (a bf16 base is re-cast in place, a no-op)
        self.summary = summary
        rank_zero_info(summary.as_text())

    @override
    def state_dict(self) -> dict[str, Any]:
        # Saved in every Lightning checkpoint: the random state (LoRA dropout, sampling) at the moment of saving, so a
        # resumed run draws the same numbers an uninterrupted one would.
        return {"rng": capture_rng_state(), "conversion": self.conversion_facts()}

    def conversion_facts(self) -> dict[str, Any]:
        """What a checkpoint records of the model its adapters belong to: the base weights' fingerprint and the
        settings that change what the model computes.
        """
        quant = self.quant
        facts: dict[str, Any] = {
            "base_weights_sha256": self.summary.quantization.weights_sha256 if self.summary else None,
            "quant_type": quant.quant_type, "double_quant": quant.double_quant if quant.quantized else None,
            "blocksize": quant.blocksize if quant.quantized else None, "compute_dtype": quant.compute_dtype,
            "calibration": quant.calibration,
        }
        if self.lora is not None:
            facts.update(r=self.lora.r, alpha=float(self.lora.alpha), use_rslora=self.lora.use_rslora,
                         use_dora=self.lora.use_dora)
        return facts

    def check_resume(self, saved: dict[str, Any], checkpoint: str = "the checkpoint") -> None:
        """Compare a checkpoint's :meth:`conversion_facts` with this run's.

        Raises:
            ResumeMismatchError: naming every difference, unless ``resume_mismatch="warn"``.
        """
        current = self.conversion_facts()
        problems = [
            f"{key}: {saved[key]!r} in {checkpoint}, {current[key]!r} now"
            for key in sorted(saved)
            if key in current and saved[key] is not None and current[key] is not None and saved[key] != current[key]
        ]
        if not problems:
            return
        message = (
            "Resuming onto another model than the checkpoint's adapters were trained with would continue a different "
            f"function without a word: {'; '.join(problems)}. Use the same base and settings, or pass "
            "QLoRAPlugin(resume_mismatch='warn') to resume anyway."
        )
        if self.resume_mismatch == "warn":
            rank_zero_warn(message)
            return
        raise ResumeMismatchError(message)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" in state_dict:
            restore_rng_state(state_dict["rng"])

    @override
    def tensor_init_context(self) -> Any:
        return _default_dtype(self.dtype)

    @override
    def module_init_context(self) -> Any:
        return _default_dtype(self.dtype)

    @override
    def forward_context(self) -> Any:
        return _default_dtype(self.dtype)

    @override
    def convert_input(self, data: Any) -> Any:
        return apply_to_collection(data, function=_to_dtype, dtype=Tensor, dst_type=self.dtype)

    @override
    def convert_output(self, data: Any) -> Any:
        return apply_to_collection(data, function=_to_dtype, dtype=Tensor, dst_type=torch.get_default_dtype())


def _to_dtype(tensor: Tensor, dst_type: torch.dtype) -> Tensor:
    return tensor.to(dst_type) if torch.is_floating_point(tensor) else tensor


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Generator[None, None, None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _is_compiled(model: nn.Module) -> bool:
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _lora_path(model: nn.Module) -> str:
    from lightning_qlora.lora.inject import iter_lora_layers

    layer = next((layer for _, layer in iter_lora_layers(model)), None)
    if layer is None:
        return "none"
    on_cuda = layer.lora_A.weight.is_cuda
    fused = layer.fused if layer.fused is not None else on_cuda
    return "fused (one autograd node per layer)" if fused else "plain path (the CPU reference)"
