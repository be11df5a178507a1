"""The QLoRA conversion recipe: quantize, cast, inject adapters, freeze, initialise, one transformer block at a time.

Everything QLoRA does to a model happens here, in plain torch. For each transformer block (:func:`find_blocks`) the
recipe quantizes its linears on the target device (one full-precision weight at a time), materializes and casts the
block's other tensors to the compute dtype, wraps the targeted linears in LoRA adapters, freezes the base and starts
the adapters from the calibration result, if any; then it yields the finished block. The rest of the model
(embeddings, final norm, head, linears outside the blocks) is finished last and yielded as the root, with the
summary. Callers decide only *when* and *where*: the Lightning plugin and strategies consume the blocks, the FSDP
strategy shards each one as it arrives, so a rank never holds more than its shards plus one whole block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_qlora._progress import progress_bar
from lightning_qlora.calibration import CalibrationData, CalibrationResult
from lightning_qlora.calibration.during_conversion import CalibrationDuringConversion
from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.conversion_summary import ConversionSummary
from lightning_qlora.lora.experts import adapt_experts, use_grouped_forward
from lightning_qlora.lora.heads import find_modules_to_save, modules_to_save_of, train_whole
from lightning_qlora.lora.inject import target_names, wrap_linears
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.lora.router import adapt_router, iter_routers
from lightning_qlora.modules import (
    find_blocks,
    is_adapter_parameter,
    is_inside,
    linears_from_conv1d,
    linears_read_by_weight,
    matches_any,
    replace_submodule,
)
from lightning_qlora.quant.experts import ExpertsReport, iter_experts, quantize_experts
from lightning_qlora.quant.fingerprint import WEIGHTS_HASH_ATTR
from lightning_qlora.quant.full_precision import full_precision_report
from lightning_qlora.quant.quantize import CALIBRATION_ATTR, LinearQuantizer, QuantizationReport, require_linears
from lightning_qlora.quant.streaming import StreamedWeights, checkpoint_of
from lightning_qlora.quant.weight import is_packed, is_quantized_linear, quant_state_of

log = logging.getLogger(__name__)


@dataclass
class ConvertedBlock:
    """One finished piece of the model, as :func:`iter_converted_blocks` yields it.

    Attributes:
        name: the block's qualified name in the model; ``""`` for the root (everything outside the blocks), which
            comes last.
        module: the block (or the root model).
        quantized: linears quantized in this piece.
        adapted: linears given adapters in this piece.
        summary: on the root only: the whole conversion's summary.
    """

    name: str
    module: nn.Module
    quantized: list[str]
    adapted: list[str]
    summary: ConversionSummary | None = None

    @property
    def is_root(self) -> bool:
        return self.name == ""


def iter_converted_blocks(
    model: nn.Module,
    quant: QuantConfig,
    lora: LoRAConfig | None,
    *,
    device: torch.device | str | None = None,
    calibration: CalibrationResult | None = None,
    calibrate_on: CalibrationData | None = None,
    block_classes: Sequence[str] | None = None,
) -> Iterator[ConvertedBlock]:
    """Convert ``model`` in place, block by block, yielding each block as soon as it is finished, then the root.

    Args:
        model: the full-precision model (on the meta device, the CPU or the accelerator). A model whose linears are
            already 4-bit is not quantized again (adapters are still injected where missing).
        quant: the quantization settings.
        lora: the adapters' settings; ``None`` only quantizes, casts and freezes.
        device: where the converted model lives; ``None`` keeps each tensor's device (meta ones go to the CPU).
        calibration: GPTQ codes and adapter factors from :func:`lightning_qlora.calibration.calibrate`.
        calibrate_on: calibration batches instead: each block is calibrated in full precision (read from the
            checkpoint for a streamed model) just before it is quantized, so the whole full-precision model is never
            needed. The same statistics as :func:`~lightning_qlora.calibration.calibrate`.
        block_classes: class names of the blocks (default: :func:`~lightning_qlora.modules.find_blocks`'s).

    Yields:
        :class:`ConvertedBlock` for each transformer block in order, then the root (``name == ""``) with the
        :class:`ConversionSummary`.

    Raises:
        ValueError: the model has no linear layer, or ``lora.target_modules`` match none (before anything changes).
        CalibrationError: ``calibrate_on`` for a model on the meta device with no checkpoint, or without blocks.
    """
    linears_from_conv1d(model)  # GPT-2-style Conv1D layers become linears (weight transposed) first
    linears = require_linears(model)
    dtype = quant.torch_compute_dtype
    target = torch.device(device) if device is not None else None
    # Quantized here before (a fingerprint was recorded: e.g. validate() then fit()) or elsewhere (4-bit layers).
    converted_before = hasattr(model, WEIGHTS_HASH_ATTR) or any(is_quantized_linear(m) for _, m in linears)
    # Task heads train whole (modules_to_save): they stay out of 4-bit, get no adapter, and do not count in the base's
    # fingerprint (the adapter carries their weights).
    wanted_heads = find_modules_to_save(model, lora.modules_to_save) if lora is not None else []
    heads = sorted(set(modules_to_save_of(model)) | set(wanted_heads))
    if heads:  # every linear inside a head too (RoBERTa's classifier holds dense and out_proj)
        inside_heads = [name for name, _ in linears if is_inside(name, heads)]
        quant = replace(quant, skip_modules=(*quant.skip_modules, *heads, *inside_heads))
    read_directly = [n for n in linears_read_by_weight(model) if not matches_any(n, quant.skip_modules)]
    if read_directly:
        quant = replace(quant, skip_modules=(*quant.skip_modules, *read_directly))
        log.info("%s reads the weight of %d linear(s) directly in its forward, e.g. %s: kept in full precision "
                 "without adapters", type(model).__name__, len(read_directly), read_directly[0])
    # Targets are chosen and checked over the whole model before anything is converted.
    targets = target_names(model, lora, quant.skip_modules) if lora is not None else []
    # Linears the model keeps in fp32 (T5's feed-forward output, ...) stay out of 4-bit and in fp32, adapted like the
    # others, as transformers' own 4-bit loading keeps them.
    fp32_kept = _kept_in_fp32(model, [name for name, _ in linears], quant.skip_modules)
    if fp32_kept:
        quant = replace(quant, skip_modules=(*quant.skip_modules, *fp32_kept))
        log.info("%s keeps %d linear(s) in fp32 (_keep_in_fp32_modules), e.g. %s: not quantized", type(model).__name__,
                 len(fp32_kept), fp32_kept[0])
    # The model's own quantization settings name modules never to convert (llm_int8_skip_modules): kept in the compute
    # dtype, adapted, as transformers + PEFT treat them.
    not_converted = _not_converted(model, [name for name, _ in linears], quant.skip_modules)
    if not_converted:
        quant = replace(quant, skip_modules=(*quant.skip_modules, *not_converted))
        log.info("%s: its quantization_config keeps %d linear(s) unquantized (llm_int8_skip_modules), e.g. %s",
                 type(model).__name__, len(not_converted), not_converted[0])
    rounded = calibration.rounded if calibration is not None else {}
    adapter_init = calibration.adapter_init if calibration is not None else {}
    checkpoint = checkpoint_of(model)
    streamed = StreamedWeights(model, checkpoint) if checkpoint is not None and not converted_before else None
    quantizer = LinearQuantizer(quant, linears, target, rounded, streamed)
    blocks = find_blocks(model, block_classes)
    prefixes = [(name, name + ".") for name, _ in blocks]

    def block_of(name: str) -> str:
        return next((block for block, prefix in prefixes if name.startswith(prefix)), "")

    owner = {name: block_of(name) for name, _ in linears}
    adapted_all: list[str] = []
    adapted_experts: list[str] = []
    adapted_routers: list[str] = []
    experts_report = ExpertsReport()
    initialized: list[str] = []
    during = None
    if calibrate_on is not None and not converted_before:
        during = CalibrationDuringConversion(model, quant, lora, calibrate_on, streamed, target, block_of)

    if streamed is not None and target is not None and during is None and quant.quantized:
        # The order finish() reads them in: block by block, then the root's.
        order = [b for b, _ in blocks] + [""]
        streamed.prefetch(
            [n for block in order for n, m in linears if owner[n] == block and m.weight.is_meta
             and not quantizer.skips(n) and not streamed.is_prequantized(n)],
            target,
        )
    # Each original linear is dropped as soon as it is replaced: its full-precision weight must not outlive it.
    pending = dict(linears)
    del linears

    def finish(piece_name: str, piece: nn.Module) -> ConvertedBlock:
        quantized = []
        block_rounded, block_factors = during.block(piece_name, piece) if during and piece_name else ({}, {})
        for name in [n for n in pending if owner[n] == piece_name]:
            linear = pending.pop(name)
            if converted_before:
                continue  # converted (and fingerprinted) by an earlier call, or quantized elsewhere
            if quantizer.skips(name):
                quantizer.keep(name, linear, fingerprint=not is_inside(name, heads))
            else:
                replace_submodule(model, name, quantizer.convert(name, linear, block_rounded.get(name)))
                quantized.append(name)
        if streamed is not None:
            streamed.materialize(piece_name, piece, target or torch.device("cpu"), dtype)
        experts = [(n, m) for n, m in iter_experts(piece) if not is_inside(_qualified(piece_name, n), heads)]
        if quant.quantized and not converted_before:
            for name, module in experts:  # before the meta tensors get their init: the experts get theirs here
                quantize_experts(module, _qualified(piece_name, name), quant, target, experts_report)
                use_grouped_forward(module)
        _materialize_meta(piece, target)
        if target is not None:
            piece.to(target)
        head_parameters = {id(p) for head in heads for p in model.get_submodule(head).parameters()}
        fp32_parameters = {id(p) for name in fp32_kept for p in model.get_submodule(name).parameters()}
        cast_floating(piece, dtype, keep=head_parameters | fp32_parameters)
        for name in fp32_kept:
            model.get_submodule(name).float()
        names = [n for n in targets if block_of(n) == piece_name]
        adapted = wrap_linears(model, names, lora) if lora is not None else []
        adapted_all.extend(adapted)
        if lora is not None and lora.target_experts:
            for name, module in experts:
                adapted_experts.extend(f"{_qualified(piece_name, name)}.{w}" for w in adapt_experts(module, lora))
        if lora is not None and lora.target_router:
            for name, module in iter_routers(piece):
                if not is_inside(_qualified(piece_name, name), heads) and adapt_router(module, lora):
                    adapted_routers.append(f"{_qualified(piece_name, name)}.weight")
        _freeze_base(piece, head_parameters)
        initialized.extend(_initialize(model, adapted, {**adapter_init, **block_factors}))
        return ConvertedBlock(piece_name, piece, quantized, adapted)

    # No bar over a model converted before (the app's evaluation passes it through again): nothing is converted.
    bar = progress_bar(None, False if converted_before else None, f"Converting to {quant.quant_type}", unit="block",
                       total=len(blocks) + 1)
    for block_name, block in blocks:
        piece = finish(block_name, block)
        _advance(bar, streamed)
        yield piece
    root = finish("", model)
    _train_without_kv_cache(model)
    if heads:
        train_whole(model, heads, dtype)
    _advance(bar, streamed)
    if bar is not None:
        bar.close()
    if streamed is not None:
        streamed.close()  # every tensor is read: let go of the memory maps
    report = quantizer.finish(model) if not converted_before else QuantizationReport()
    if rounded and not converted_before:
        setattr(model, CALIBRATION_ATTR, calibration.method if calibration is not None else "none")
    calibrated = during.finish() if during is not None else None
    if calibrated is not None and calibrated.layers:
        setattr(model, CALIBRATION_ATTR, "gptq")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trained_whole = modules_to_save_of(model)
    root.summary = ConversionSummary(
        report, adapted_all, initialized, trainable, logical_param_count(model), quant, calibrated,
        trained_whole=trained_whole, full_precision=full_precision_report(model, trained_whole),
        experts=experts_report, adapted_experts=adapted_experts, adapted_routers=adapted_routers,
    )
    yield root


def convert_model(
    model: nn.Module,
    quant: QuantConfig | None = None,
    lora: LoRAConfig | None = None,
    *,
    device: torch.device | str | None = None,
    calibration: CalibrationResult | None = None,
) -> ConversionSummary:
    """Run the whole recipe on ``model`` in place (see :func:`iter_converted_blocks`) and return its summary.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> summary = convert_model(model, QuantConfig(skip_modules=()), LoRAConfig(r=4))
        >>> len(summary.adapted)
        2
    """
    summary = None
    for piece in iter_converted_blocks(model, quant or QuantConfig(), lora, device=device, calibration=calibration):
        summary = piece.summary
    assert summary is not None  # the root always comes last, with the summary
    return summary


def cast_floating(model: nn.Module, dtype: torch.dtype, keep: set[int] | None = None) -> None:
    """Store the frozen non-linear weights (embeddings, norms, a skipped head) in the compute dtype: kept in fp32
    they would cost as much memory as the whole 4-bit base of a small model. Adapters, packed bytes and the
    parameters in ``keep`` (``id``s: modules trained whole) are kept as they are.
    """
    for name, param in model.named_parameters():
        if is_adapter_parameter(name) or param.is_meta or not param.is_floating_point() or param.dtype == dtype:
            continue
        if keep and id(param) in keep:
            continue
        if is_packed(param):
            continue  # packed 4-bit bytes stored as a float dtype (quant_storage): a cast would destroy them
        param.data = param.data.to(dtype)


def logical_param_count(module: nn.Module) -> int:
    """Parameters as the model has them: a packed 4-bit weight (two values per byte, possibly sharded by FSDP)
    counts as its logical ``out x in`` shape; tied weights count once.
    """
    total, seen = 0, set()
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            state = quant_state_of(sub) if name == "weight" and is_quantized_linear(sub) else None
            if state is None and is_packed(param):  # a packed 3-D expert weight
                state = getattr(param, "quant_state", None)
            shape = getattr(state, "shape", None)
            total += int(torch.Size(shape).numel()) if shape is not None else param.numel()
    return total


def _train_without_kv_cache(model: nn.Module) -> None:
    # transformers builds a KV cache in every forward of a model whose config says use_cache (the default), training
    # included. Training never reads it, and while one exists transformers ignores packed rows (position_ids that
    # restart, no attention_mask): attention then crosses rows, silently (per-row losses off by 1-4% on tiny models,
    # tests/test_packing.py). generate() still caches: it passes use_cache from its generation config.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
        log.info("%s: config.use_cache = False for training (generate() still uses a cache)", type(model).__name__)


def _advance(bar: Any, streamed: StreamedWeights | None) -> None:
    if bar is None:
        return
    if streamed is not None:
        bar.set_postfix_str(f"{streamed.bytes_read / 2**30:.2f} GiB read")
    bar.update(1)


def _freeze_base(piece: nn.Module, heads: set[int]) -> None:
    # Only the adapters (and the modules trained whole, ``heads``: parameter ids) train; the rest is frozen base.
    for name, param in piece.named_parameters():
        param.requires_grad_(is_adapter_parameter(name) or id(param) in heads)


def _initialize(
    model: nn.Module, adapted: list[str], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> list[str]:
    """Start the adapters just injected from their calibrated factors (the others keep the default init)."""
    done = []
    for name in adapted:
        if name in factors:
            layer = model.get_submodule(name)
            assert isinstance(layer, LoRALinear)
            layer.initialize_adapter(*factors[name])
            done.append(name)
    return done


def _not_converted(model: nn.Module, linears: list[str], skipped: Sequence[str]) -> list[str]:
    """The linears the model's ``config.quantization_config`` says not to convert (``llm_int8_skip_modules``), matched
    as transformers matches them: the name itself, or a qualified name containing ``entry + "."`` or ending with it.
    """
    settings: Any = getattr(getattr(model, "config", None), "quantization_config", None)
    entries = settings.get("llm_int8_skip_modules") if isinstance(settings, dict) else getattr(
        settings, "llm_int8_skip_modules", None)
    entries = [e for e in (entries or []) if isinstance(e, str) and e]
    return [n for n in linears if not matches_any(n, skipped) and any(
        n == e or f"{e}." in f"{n}." or n.endswith("." + e) for e in entries)]


def _kept_in_fp32(model: nn.Module, linears: list[str], skipped: Sequence[str]) -> list[str]:
    """The linears named by the model's ``_keep_in_fp32_modules`` (and ``_strict``): a name part equal to an entry,
    as transformers matches them.
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return [n for n in linears if keep & set(n.split(".")) and not matches_any(n, skipped)]


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _materialize_meta(piece: nn.Module, device: torch.device | None) -> None:
    # Tensors the quantizer did not touch (norms, embeddings, rotary buffers) may still be on the meta device when
    # the model was built there: give them their own initialization on the target device, one module at a time.
    where = device if device is not None else torch.device("cpu")
    for name, module in piece.named_modules():
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not any(t.is_meta for t in tensors):
            continue
        module.to_empty(device=where, recurse=False)
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
