"""Validated configuration for quantization and LoRA adapters.

Both classes are plain dataclasses so that Hydra can instantiate them (``_target_: lightning_qlora.QuantConfig``) and
so that they can be used without Lightning. Every problem in a config is collected and raised once, in
``__post_init__``, before any memory is allocated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from lightning_qlora.errors import QLoRAError

QuantType = Literal["nf4", "fp4", "none"]
ComputeDtype = Literal["bf16", "fp16", "fp32"]
QuantStorage = Literal["auto", "uint8", "bf16", "fp16", "fp32"]
Calibration = Literal["none", "gptq"]
LoRAInit = Literal["default", "cloq"]

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "none")
COMPUTE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The tensor dtypes packed 4-bit bytes can be stored as ("auto": uint8, or the compute dtype under FSDP).
QUANT_STORAGES: dict[str, torch.dtype | None] = {
    "auto": None, "uint8": torch.uint8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32
}
CALIBRATIONS: tuple[str, ...] = ("none", "gptq")
LORA_INITS: tuple[str, ...] = ("default", "cloq")
# The blocksizes bitsandbytes' 4-bit kernels accept (bitsandbytes.functional.quantize_4bit).
SUPPORTED_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ALL_LINEAR = "all-linear"
# The heads fine-tuning adds to a pretrained model: trained whole and saved with the adapter (PEFT's modules_to_save).
DEFAULT_MODULES_TO_SAVE: tuple[str, ...] = ("classifier", "score", "qa_outputs")


class ConfigError(QLoRAError, ValueError):
    """Raised when a config holds one or more invalid values; the message lists every problem."""

    def __init__(self, owner: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{owner} has {len(self.problems)} invalid value(s):\n{lines}")


@dataclass
class QuantConfig:
    """How the frozen base weights are stored and computed with.

    Args:
        quant_type: ``"nf4"`` (4-bit NormalFloat, the QLoRA default), ``"fp4"``, or ``"none"`` for a plain
            (unquantized) frozen base in ``compute_dtype``: the bf16-LoRA baseline on the same code path.
        double_quant: quantize the per-block absmax constants a second time (8-bit, blocks of 256), which cuts them
            from 0.5 to about 0.127 bits per parameter.
        compute_dtype: dtype the dequantized weights are multiplied in: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        blocksize: number of weights that share one absmax constant. Smaller is more precise and costs more bits.
        skip_modules: linear layers whose qualified name ends with one of these stay unquantized and get no adapter.
        quant_storage: the dtype the packed 4-bit bytes are stored as: ``"uint8"``, ``"bf16"``, ``"fp16"``,
            ``"fp32"``, or ``"auto"`` (uint8 on one device and under DDP; the compute dtype under FSDP, which shards
            and casts every parameter of a block as one dtype). The bytes are the same; only the tensor's dtype
            differs.
        calibration: how the 4-bit codes are chosen. ``"none"``: each weight rounds to its nearest level (what
            bitsandbytes and PEFT do). ``"gptq"``: GPTQ picks the codes that minimize each layer's output error on
            ``calibration_samples`` training sequences (:mod:`lightning_qlora.calibration.gptq`); same format, same
            kernels, same memory, a closer base (held-out perplexity in the README). Needs the training data at
            set-up and the full-precision model in memory.
        calibration_samples: training sequences the calibration statistics are taken from (the first ones of the
            training set, in order, so a resumed run calibrates identically).

    Raises:
        ConfigError: listing every invalid value at once.

    Example:
        >>> QuantConfig(quant_type="nf4", double_quant=True, compute_dtype="bf16").bits_per_parameter_estimate()
        4.127
    """

    quant_type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "bf16"
    blocksize: int = 64
    skip_modules: Sequence[str] = ("lm_head",)
    quant_storage: QuantStorage = "auto"
    calibration: Calibration = "none"
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        problems: list[str] = []
        skip = _as_str_tuple(self.skip_modules)
        if skip is None:
            problems.append(
                f"skip_modules={self.skip_modules!r} must be a list of module names such as ['lm_head'] "
                "(use [] to skip nothing)."
            )
        else:
            self.skip_modules = skip
        if not _is_one_of(self.quant_type, QUANT_TYPES):
            problems.append(
                f"quant_type={self.quant_type!r} is not supported. Use one of {list(QUANT_TYPES)} "
                "('none' keeps the base unquantized)."
            )
        if not isinstance(self.double_quant, bool):
            problems.append(f"double_quant={self.double_quant!r} must be a bool (True or False).")
        if not _is_one_of(self.compute_dtype, COMPUTE_DTYPES):
            problems.append(
                f"compute_dtype={self.compute_dtype!r} is not supported. Use one of {list(COMPUTE_DTYPES)}."
            )
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int):
            problems.append(f"blocksize={self.blocksize!r} must be an int, one of {list(SUPPORTED_BLOCKSIZES)}.")
        elif self.blocksize not in SUPPORTED_BLOCKSIZES:
            problems.append(
                f"blocksize={self.blocksize} is not supported by bitsandbytes' 4-bit kernels. "
                f"Use one of {list(SUPPORTED_BLOCKSIZES)} (64 is the QLoRA default)."
            )
        if not _is_one_of(self.quant_storage, QUANT_STORAGES):
            problems.append(
                f"quant_storage={self.quant_storage!r} is not supported. Use one of {list(QUANT_STORAGES)} "
                "('auto' picks uint8, or the compute dtype under FSDP)."
            )
        if not _is_one_of(self.calibration, CALIBRATIONS):
            problems.append(
                f"calibration={self.calibration!r} is not supported. Use one of {list(CALIBRATIONS)} "
                "('gptq' chooses the 4-bit codes on training data)."
            )
        elif self.calibration != "none" and not self.quantized:
            problems.append(f"calibration={self.calibration!r} needs a 4-bit quant_type, not {self.quant_type!r}.")
        samples = self.calibration_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            problems.append(f"calibration_samples={samples!r} must be a positive int (256 is a good start).")
        if problems:
            raise ConfigError("QuantConfig", problems)

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def torch_quant_storage(self) -> torch.dtype:
        """The packed weights' tensor dtype (``"auto"`` means uint8 here; the FSDP strategy resolves it first)."""
        return QUANT_STORAGES.get(self.quant_storage) or torch.uint8

    @property
    def quantized(self) -> bool:
        return self.quant_type != "none"

    def bits_per_parameter_estimate(self) -> float:
        """Storage bits per weight, from the format alone: 4 bits plus the scaling constants.

        Without double quantization each block of ``blocksize`` weights has one fp32 absmax (32 / blocksize bits per
        weight). With it, absmax is stored in 8 bits plus one fp32 constant per 256 absmax values.
        """
        if not self.quantized:
            return float(torch.finfo(self.torch_compute_dtype).bits)
        constants = 8 / self.blocksize + 32 / (self.blocksize * 256) if self.double_quant else 32 / self.blocksize
        return round(4 + constants, 3)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["skip_modules"] = list(self.skip_modules)
        return data


@dataclass
class LoRAConfig:
    """Where LoRA adapters go and how large they are.

    Args:
        r: adapter rank (> 0). Trainable parameters grow linearly with it.
        alpha: the adapter output is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); > 0.
        dropout: dropout probability on the adapter input only, in [0, 1).
        target_modules: ``"all-linear"`` (every ``nn.Linear`` not in ``QuantConfig.skip_modules``), a list of names
            (a name matches a module whose qualified name ends with it, as in PEFT), or any other string, taken as a
            regular expression that must match the whole qualified name.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        use_dora: DoRA (weight-decomposed LoRA): a trainable per-output magnitude vector times the normalized
            direction ``W + scaling * B @ A``, as in the DoRA paper and PEFT. Costs a dequantize per forward.
        init_lora_weights: ``"default"`` (PEFT's: Kaiming-uniform ``A``, zero ``B``: training starts from the
            quantized base) or ``"cloq"``: ``B @ A`` starts as the rank-``r`` correction of the 4-bit rounding error
            that best restores each layer's outputs on ``QuantConfig.calibration_samples`` training sequences
            (:mod:`lightning_qlora.calibration.cloq`). Needs calibration data (``strategy="qlora"`` with a datamodule);
            with ``quant_type="none"`` there is no rounding error and it is the default init.
        modules_to_save: modules trained whole, in full precision, and saved in the adapter (PEFT's
            ``modules_to_save``): new task heads. A name matches a module whose qualified name ends with it; names
            the model does not have are ignored. By default the usual heads (``classifier``, ``score``,
            ``qa_outputs``), so a sequence-classification head trains instead of being quantized and frozen.
            ``()`` trains none.
        target_experts: adapters on mixture-of-experts weights too (the fused 3-D ``experts.gate_up_proj`` /
            ``experts.down_proj`` of transformers 5; one adapter per expert, PEFT's ``target_parameters``), without
            dropout or DoRA there. A model without experts is unaffected. Their 4-bit quantization does not depend on
            it.
        target_router: an adapter on each MoE router's ``[experts, hidden]`` weight too (it stays in full precision
            either way; PEFT's ``target_parameters`` ``mlp.gate.weight``). Off by default, as PEFT's ``all-linear``:
            a router that learns changes which experts each token reaches.

    Raises:
        ConfigError: listing every invalid value at once.

    Example:
        >>> LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]).scaling
        2.0
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | Sequence[str] = ALL_LINEAR
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: LoRAInit = "default"
    modules_to_save: Sequence[str] = DEFAULT_MODULES_TO_SAVE
    target_experts: bool = True
    target_router: bool = False

    def __post_init__(self) -> None:
        problems: list[str] = []
        for flag in ("target_experts", "target_router"):
            if not isinstance(getattr(self, flag), bool):
                problems.append(f"{flag}={getattr(self, flag)!r} must be a bool (True or False).")
        heads = _as_str_tuple(self.modules_to_save) if self.modules_to_save is not None else ()
        if heads is None or any(not name for name in heads):
            problems.append(
                f"modules_to_save={self.modules_to_save!r} must be a list of module names such as ['classifier'] "
                "(use [] for none)."
            )
        else:
            self.modules_to_save = heads
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            problems.append(f"r={self.r!r} must be a positive int, e.g. 8, 16 or 64.")
        elif self.r <= 0:
            problems.append(f"r={self.r} must be > 0 (the adapter rank), e.g. 8, 16 or 64.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            problems.append(f"alpha={self.alpha!r} must be a positive number, e.g. 16 or 32.")
        elif not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(
                f"alpha={self.alpha} must be a finite number > 0 (the scaling is alpha / r), e.g. 16 or 32."
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            problems.append(f"dropout={self.dropout!r} must be a number in [0, 1), e.g. 0.05.")
        elif not (0.0 <= self.dropout < 1.0):
            problems.append(f"dropout={self.dropout} must be in [0, 1): 0 disables it, 0.05-0.1 is typical.")
        if not isinstance(self.use_rslora, bool):
            problems.append(f"use_rslora={self.use_rslora!r} must be a bool (True or False).")
        if not isinstance(self.use_dora, bool):
            problems.append(f"use_dora={self.use_dora!r} must be a bool (True or False).")
        if not _is_one_of(self.init_lora_weights, LORA_INITS):
            problems.append(
                f"init_lora_weights={self.init_lora_weights!r} must be one of {list(LORA_INITS)}: 'default' (zero B) "
                "or 'cloq' (B @ A corrects the 4-bit rounding error on calibration data)."
            )
        problems.extend(self._normalize_target_modules())
        if problems:
            raise ConfigError("LoRAConfig", problems)

    def _normalize_target_modules(self) -> list[str]:
        target = self.target_modules
        if isinstance(target, str):
            if target == ALL_LINEAR:
                return []
            try:
                re.compile(target)
            except re.error as err:
                return [
                    (f"target_modules={target!r} is not a valid regular expression ({err}). Use 'all-linear', "
                    "a list of names such as ['q_proj', 'v_proj'], or a valid full-match regex.")
                ]
            return []
        if isinstance(target, Sequence) or _is_listlike(target):
            names = list(target)
            bad = [n for n in names if not isinstance(n, str) or not n]
            if bad or not names:
                return [
                    (f"target_modules={names!r} must be 'all-linear', a regex string, or a non-empty list of "
                    "non-empty module names such as ['q_proj', 'v_proj'].")
                ]
            self.target_modules = tuple(names)
            return []
        return [
            (f"target_modules={target!r} has type {type(target).__name__}; use 'all-linear', a regex string, "
            "or a list of module names such as ['q_proj', 'v_proj'].")
        ]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not isinstance(self.target_modules, str):
            data["target_modules"] = list(self.target_modules)
        data["modules_to_save"] = list(self.modules_to_save)
        return data


def _is_listlike(value: Any) -> bool:
    # Hydra passes ListConfig, which is not a collections.abc.Sequence subclass.
    return hasattr(value, "__iter__") and hasattr(value, "__len__") and not isinstance(value, (str, bytes, dict))


def _is_one_of(value: Any, options: Any) -> bool:
    return isinstance(value, str) and value in options


def _as_str_tuple(value: Any) -> tuple[str, ...] | None:
    """A tuple of names from a name or a list of names; ``None`` for anything else."""
    if isinstance(value, str):
        return (value,)
    if _is_listlike(value) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


__all__ = ["ALL_LINEAR", "SUPPORTED_BLOCKSIZES", "ConfigError", "LoRAConfig", "QuantConfig"]
