"""``QLoRAPlugin``: the Lightning precision plugin that turns any LightningModule into a QLoRA fine-tune."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_qlora.adapters import adapter_root
from lightning_qlora.calibration import CalibrationError, CalibrationReport, calibrated_weights, default_forward
from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.kernels.compile import compile_blocks

#: ``torch.compile``'s modes, accepted as ``QLoRAPlugin(compile=...)`` (and the app's ``compile=...``).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
from lightning_qlora.lora import inject_lora, mark_only_lora_as_trainable
from lightning_qlora.lora_init import ErrorCorrectingInit
from lightning_qlora.quantize import (
    CALIBRATION_ATTR,
    QuantizationReport,
    has_quantized_linears,
    is_adapter_parameter,
    is_quantized_linear,
    quant_state_of,
    quantize_model,
)

log = logging.getLogger(__name__)


class _Default:
    """Marks an argument left at its default, so ``lora=None`` can mean "no adapters"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


@dataclass
class ConversionSummary:
    """What :class:`QLoRAPlugin` did to the model, logged once at fit start."""

    quantization: QuantizationReport
    adapted: list[str]
    trainable_params: int
    total_params: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def as_text(self, quant: QuantConfig) -> str:
        q = self.quantization
        return (
            f"QLoRA: {len(q.quantized)} linear layer(s) -> {quant.quant_type}"
            f"{' + double quant' if quant.double_quant and quant.quantized else ''} "
            f"(compute {quant.compute_dtype}, blocksize {quant.blocksize}), {len(q.skipped)} kept as they were; "
            f"linear weights {_mib(q.bytes_before)} -> {_mib(q.bytes_after)} "
            f"({q.bits_per_parameter:.3f} bits/param); LoRA on {len(self.adapted)} layer(s); "
            f"trainable params {self.trainable_params:,} / {self.total_params:,} ({self.trainable_percent:.3f}%)"
        )

    def as_metrics(self) -> dict[str, float]:
        q = self.quantization
        return {
            "qlora/layers_quantized": float(len(q.quantized)),
            "qlora/linear_bytes_before": float(q.bytes_before),
            "qlora/linear_bytes_after": float(q.bytes_after),
            "qlora/bits_per_param": q.bits_per_parameter,
            "qlora/trainable_params": float(self.trainable_params),
            "qlora/total_params": float(self.total_params),
            "qlora/trainable_percent": self.trainable_percent,
        }


class QLoRAPlugin(Precision):
    """Store linear layers in 4-bit (NF4 + double quantization by default), compute in bf16, train LoRA adapters.

    When the strategy sets the model up, every ``nn.Linear`` of the model (except ``quant.skip_modules``) is replaced
    by a bitsandbytes 4-bit linear, the whole model is frozen, and LoRA adapters are injected into the targeted
    linears. Only adapter parameters then require grad, so an optimizer built from ``self.parameters()`` trains the
    adapters only. Floating-point inputs are cast to the compute dtype, outputs back to fp32.

    Names in ``target_modules`` and ``skip_modules`` are relative to the LightningModule's ``model`` attribute when
    it has one (the common ``self.model = AutoModelForCausalLM...`` layout), otherwise to the LightningModule.

    Args:
        quant: quantization settings; ``QuantConfig()`` by default. ``QuantConfig(quant_type="none")`` keeps the
            base in ``compute_dtype`` unquantized (plain LoRA, same code path).
        lora: adapter settings; ``LoRAConfig()`` by default. ``None`` only quantizes and freezes.
        compile: ``torch.compile`` each transformer block after conversion (``True``, a ``torch.compile`` mode such
            as ``"reduce-overhead"``, or a dict of ``torch.compile`` arguments). Faster steps on CUDA; with
            ``"reduce-overhead"`` each block's forward and backward also run as CUDA graphs, the fastest setting
            measured on the H200 (numbers in ``benchmarks/README.md``). Activation checkpointing (transformers'
            ``gradient_checkpointing_enable``) then happens inside the compiled blocks
            (:mod:`lightning_qlora.kernels.compile`). The first steps pay the compile time. Off by default.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=8))], accelerator="cpu")  # doctest: +SKIP

    Logged once at fit start: ``qlora/layers_quantized``, ``qlora/linear_bytes_before`` and ``..._after`` (bytes),
    ``qlora/bits_per_param``, ``qlora/trainable_params``, ``qlora/total_params``, ``qlora/trainable_percent``.
    """

    precision = "bf16-true"

    def __init__(
        self,
        quant: QuantConfig | None = None,
        lora: LoRAConfig | None | _Default = DEFAULT,
        compile: bool | str | dict[str, Any] = False,
    ) -> None:
        if isinstance(lora, _Default):
            lora = LoRAConfig()
        if quant is not None and not isinstance(quant, QuantConfig):
            raise TypeError(f"QLoRAPlugin(quant={quant!r}) must be a QuantConfig, e.g. QuantConfig(quant_type='nf4').")
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise TypeError(f"QLoRAPlugin(lora={lora!r}) must be a LoRAConfig or None, e.g. LoRAConfig(r=16).")
        if isinstance(compile, str) and compile in COMPILE_MODES:
            compile = {"mode": compile}
        if not isinstance(compile, (bool, dict)):
            raise TypeError(
                f"QLoRAPlugin(compile={compile!r}) must be True, False, a torch.compile mode "
                f"({', '.join(COMPILE_MODES)}) or a dict of torch.compile arguments."
            )
        self.quant = quant or QuantConfig()
        self.lora = lora
        self.compile = compile
        self.precision = {"bf16": "bf16-true", "fp16": "16-true", "fp32": "32-true"}[self.quant.compute_dtype]
        self.dtype = self.quant.torch_compute_dtype
        # Where the 4-bit weights are built. QLoRAStrategy sets its root device here so that conversion happens on
        # the accelerator, layer by layer; otherwise layers are quantized where they are and moved afterwards.
        self.quantize_device: torch.device | None = None
        self.summary: ConversionSummary | None = None
        self._adapted_early: list[str] = []  # adapters injected block by block (prepare_block) during conversion
        self._rounded: dict[str, Tensor] | None = None  # calibrated codes waiting for convert_module (calibrate)
        self._adapter_init: ErrorCorrectingInit | None = None  # calibrated adapter factors (calibrate), likewise
        self._adapters_from_checkpoint = False  # set by restore_adapters_from_checkpoint: no init needs computing

    @property
    def needs_calibration(self) -> bool:
        """Whether conversion needs :meth:`calibrate` first: GPTQ-rounded codes (``QuantConfig.calibration``) or
        error-correcting adapters (``LoRAConfig.init_lora_weights="cloq"``) both come from calibration data."""
        return self.quant.calibration != "none" or self._computes_adapter_init()

    def restore_adapters_from_checkpoint(self) -> None:
        """Say that the next conversion's adapters will be overwritten from a checkpoint: call it before
        ``trainer.fit(..., ckpt_path=...)`` to skip computing their initial values (``init_lora_weights="cloq"``;
        Lightning restores a checkpoint only after the strategy's set-up, so the plugin cannot tell by itself).
        GPTQ calibration still runs: the base's codes are not in the checkpoint. Lasts one conversion."""
        self._adapters_from_checkpoint = True

    def _computes_adapter_init(self) -> bool:
        # A base kept in the compute dtype has no rounding error to correct: cloq is then the default init (B = 0).
        cloq = self.lora is not None and self.lora.init_lora_weights == "cloq" and self.quant.quantized
        return cloq and not self._adapters_from_checkpoint

    @override
    def convert_module(
        self, module: nn.Module, after_layer: Callable[[str, nn.Module], None] | None = None
    ) -> nn.Module:
        """Quantize, freeze and adapt ``module`` (see the class docstring).

        ``after_layer(name, layer)`` runs after each linear is quantized: a strategy can finish a block there with
        :meth:`prepare_block` (and shard it) before the next block is converted.
        """
        root = adapter_root(module)
        self._adapted_early: list[str] = []
        already_quantized = has_quantized_linears(root)
        needs_calibration = self.needs_calibration and not already_quantized
        if needs_calibration and self._rounded is None:
            raise CalibrationError(
                f"{self.describe_calibration()} comes from training data, but no calibration ran before conversion. "
                "Use strategy='qlora' with a LightningDataModule (it calibrates on the first calibration_samples "
                "training sequences), or call plugin.calibrate(module, batches) first."
            )
        rounded, self._rounded = (self._rounded if needs_calibration else None), None
        adapter_init, self._adapter_init = (self._adapter_init if needs_calibration else None), None
        init_impossible = self._computes_adapter_init() and already_quantized
        self._adapters_from_checkpoint = False  # (one conversion's worth, like the calibration results)
        report = quantize_model(
            root, self.quant, device=self.quantize_device, after_layer=after_layer, rounded=rounded
        )
        if rounded:
            setattr(root, CALIBRATION_ATTR, self.quant.calibration)
        del rounded
        _cast_floating(root, self.dtype)
        adapted = list(self._adapted_early)
        if self.lora is not None:
            # Quantize before injecting LoRA: the adapters must stay in full precision to get gradients.
            adapted += inject_lora(root, self.lora, skip_modules=self.quant.skip_modules)
            mark_only_lora_as_trainable(module)
            if adapter_init is not None:
                initialized = adapter_init.apply(root)
                rank_zero_info(
                    f"Initialized {len(initialized)} of {len(adapted)} adapters to correct the 4-bit rounding error "
                    "(init_lora_weights='cloq')."
                )
            elif init_impossible and adapted:
                rank_zero_warn(
                    "init_lora_weights='cloq' needs the full-precision weights, but this model's linears were already "
                    f"4-bit: its {len(adapted)} new adapters start at zero (the default init). Give the plugin the "
                    "full-precision model to get the error-correcting init."
                )
        if self.compile:
            compile_blocks(root, **(self.compile if isinstance(self.compile, dict) else {}))
        converted_before = not adapted and (not report.quantized or not self.quant.quantized)
        if converted_before and self.summary is not None:
            # e.g. validate() after fit(): keep the first summary (a bf16 base is re-cast in place, a no-op)
            return module
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = _logical_param_count(module)
        self.summary = ConversionSummary(report, adapted, trainable, total)
        rank_zero_info(self.summary.as_text(self.quant))
        return module

    def calibrate(
        self, module: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None
    ) -> CalibrationReport:
        """Run ``module`` on ``batches`` for what :attr:`needs_calibration`: the 4-bit codes of its base
        (``QuantConfig(calibration="gptq")``) and the error-correcting adapter factors
        (``LoRAConfig(init_lora_weights="cloq")``); the next :meth:`convert_module` uses them. ``module`` (a
        LightningModule or a model) must still be in full precision; ``forward(batch)`` runs it (default:
        ``module(**batch)`` for a mapping, else ``module(batch)``)."""
        root = adapter_root(module)
        self._adapter_init = ErrorCorrectingInit(self.quant, self.lora) if self._computes_adapter_init() else None
        rounding = "gptq" if self.quant.calibration == "gptq" else "nearest"
        self._rounded, report = calibrated_weights(
            root, batches, forward or default_forward(module), self.quant, progress=None, rounding=rounding,
            on_layer=self._adapter_init,
        )
        rank_zero_info(
            f"Calibrated {self.describe_calibration()} on {report.tokens:,} tokens per layer in {report.seconds:.0f} s"
            + (f" (GPTQ codes for {report.layers} linears, {report.nearest} rounded to nearest)." if report.layers else ".")
        )
        return report

    def describe_calibration(self) -> str:
        """What calibration chooses, as the settings that ask for it (for messages)."""
        settings = []
        if self.quant.calibration != "none":
            settings.append(f"QuantConfig(calibration={self.quant.calibration!r})")
        if self._computes_adapter_init():
            settings.append("LoRAConfig(init_lora_weights='cloq')")
        return " and ".join(settings)

    def prepare_block(self, root: nn.Module, block: nn.Module, linear_names: set[str]) -> list[str]:
        """Finish one already quantized block of ``root`` now: cast its other weights to the compute dtype, inject
        the adapters among ``linear_names`` (qualified names relative to ``root``) and freeze its base. The rest of
        the model is finished by :meth:`convert_module` as usual. Returns the adapted names."""
        _cast_floating(block, self.dtype)
        if self.lora is None:
            return []
        names = inject_lora(root, self.lora, skip_modules=self.quant.skip_modules, only=linear_names)
        mark_only_lora_as_trainable(block)
        self._adapted_early.extend(names)
        return names

    @override
    def state_dict(self) -> dict[str, Any]:
        # Saved in every Lightning checkpoint: the random state (LoRA dropout, sampling) at the moment of saving, so a
        # resumed run draws the same numbers an uninterrupted one would.
        return {"rng": capture_rng_state()}

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


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), Python and NumPy random states."""
    import random

    import numpy as np

    # Only tensors and plain Python values: Lightning loads checkpoints with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` captured."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    # Frozen non-linear weights (embeddings, norms, a skipped head) are stored in the compute dtype: keeping them
    # in fp32 would cost as much memory as the whole 4-bit base of a small model.
    for name, param in model.named_parameters():
        if is_adapter_parameter(name) or param.is_meta or not param.is_floating_point() or param.dtype == dtype:
            continue
        if getattr(param, "quant_state", None) is not None:
            continue  # packed 4-bit bytes stored as a float dtype (quant_storage): a cast would destroy them
        param.data = param.data.to(dtype)


def _logical_param_count(module: nn.Module) -> int:
    """Parameters as the model has them: a packed 4-bit weight (two values per byte, possibly sharded by FSDP)
    counts as its logical ``out x in`` shape."""
    total, seen = 0, set()
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # tied weights (e.g. lm_head and the embeddings) count once
            seen.add(id(param))
            state = quant_state_of(sub) if name == "weight" and is_quantized_linear(sub) else None
            shape = getattr(state, "shape", None)
            total += int(torch.Size(shape).numel()) if shape is not None else param.numel()
    return total


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


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"
