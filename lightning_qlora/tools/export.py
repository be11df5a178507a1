"""Merge LoRA adapters into a bf16 copy of the base and save a standard transformers model directory.

    lightning-qlora-export --adapter outputs/.../adapter/last --out merged/
    lightning-qlora-export --adapter DIR --base /path/to/base --out merged/ --dtype fp32

The 4-bit base is dequantized, ``scaling * B @ A`` added, and the result written with ``save_pretrained`` (each file
renamed into place once complete; other files in the directory stay), so ``AutoModelForCausalLM.from_pretrained(out)``
loads it with no PEFT and no bitsandbytes. The drift check reloads the export and compares its logits with the
unmerged QLoRA model's.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora._atomic import files_into, output_directory, writer_lock
from lightning_qlora._imports import require
from lightning_qlora._progress import progress_bar
from lightning_qlora.config import COMPUTE_DTYPES, QuantConfig
from lightning_qlora.lora.experts import merged_expert_weight
from lightning_qlora.lora.inject import iter_lora_layers
from lightning_qlora.lora.layer import LoRALinear
from lightning_qlora.lora.peft_format import (
    ADAPTER_CONFIG,
    AdapterFormatError,
    load_adapter,
    read_adapter_config,
    read_adapter_metadata,
)
from lightning_qlora.lora.router import iter_routers, merged_router_weight
from lightning_qlora.modules import FAN_IN_FAN_OUT, adapter_root, base_linears, is_adapter_parameter
from lightning_qlora.quant.experts import expert_weight_names, iter_experts
from lightning_qlora.quant.fingerprint import FingerprintMismatchError
from lightning_qlora.quant.weight import dequantize_weight


@dataclass
class ExportReport:
    """What :func:`export_merged` wrote and how far the merged model drifts from base + adapter."""

    out_dir: str
    dtype: str
    merged_layers: int
    size_mib: float
    max_abs_logit_diff: float | None = None
    rel_logit_error: float | None = None
    rel_logit_error_fp32_compute: float | None = None
    weight_rounding_rel_error: float | None = None

    def drift_explained(self) -> str:
        """The drift in words, with its scale: what storing the weights in the export's dtype alone costs."""
        if self.rel_logit_error is None or self.rel_logit_error_fp32_compute is None:
            return "drift not checked"
        floor = self.weight_rounding_rel_error or 0.0
        text = (
            f"Export vs base + adapter, relative logit error: {self.rel_logit_error:.2g} run in {self.dtype} "
            f"(largest difference {self.max_abs_logit_diff:.3g}), {self.rel_logit_error_fp32_compute:.2g} with its "
            f"weights run in fp32. Rounding the merged weights to {self.dtype} moves them by {floor:.2g} (relative)"
        )
        if self.rel_logit_error_fp32_compute <= max(_EXPECTED_LOGIT_TO_WEIGHT_DRIFT * floor, 1e-5):
            return text + "; the fp32 figure is within what that rounding explains: the merge is faithful."
        return (
            text + f"; the fp32 figure is over {_EXPECTED_LOGIT_TO_WEIGHT_DRIFT}x that, more than rounding explains. "
            "Check that --base is the model the adapter was trained on (and --quant how it was stored)."
        )


# Rounding every weight by a relative e moves the logits by a few e (the layers' errors add up): measured on
# SmolLM2-135M, see benchmarks/NOTES.md.
_EXPECTED_LOGIT_TO_WEIGHT_DRIFT = 10


def merged_state_dict(
    module: nn.Module, dtype: torch.dtype = torch.bfloat16, progress: bool = False,
    rounding: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in, keyed as the original (un-adapted) model.

    ``rounding``, when given, receives two sums over the merged linear weights: ``||rounded - exact||^2`` and
    ``||exact||^2`` (what storing them in ``dtype`` costs).
    """
    root = adapter_root(module)
    if rounding is not None:
        rounding[:] = [0.0, 0.0]
    linears = base_linears(root)
    state: dict[str, torch.Tensor] = {}
    for name, layer in progress_bar(linears, progress, "Merging adapters into the base"):
        wrapper = root.get_submodule(name)
        weight = dequantize_weight(layer).float()
        if isinstance(wrapper, LoRALinear) and not wrapper.merged:
            weight = wrapper.merged_weight(weight)
        if getattr(layer, FAN_IN_FAN_OUT, False):  # back to the Conv1D's [in, out]: the model class expects it
            weight = weight.t()
        state[f"{name}.weight"] = weight.to(dtype).cpu()
        if rounding is not None:
            rounding[0] += float((weight.to(dtype).float() - weight).square().sum())
            rounding[1] += float(weight.float().square().sum())
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach().to(dtype).cpu()
    linear_names = {name for name, _ in linears}
    expert_weights = set()
    for experts_name, experts in iter_experts(root):  # 3-D expert weights: dequantized, their adapters folded in
        for weight_name in expert_weight_names(experts):
            key = f"{experts_name}.{weight_name}"
            merged = merged_expert_weight(experts, weight_name)
            state[key] = merged.to(dtype).cpu()
            expert_weights.add(key)
            if rounding is not None:
                rounding[0] += float((merged.to(dtype).float() - merged).square().sum())
                rounding[1] += float(merged.square().sum())
    for router_name, router in iter_routers(root):  # router weights with their adapters folded in
        key = f"{router_name}.weight"
        state[key] = merged_router_weight(router).to(dtype).cpu()
        expert_weights.add(key)
    for name, param in root.named_parameters():
        owner = name.rpartition(".")[0].removesuffix(".base_layer")
        if owner in linear_names or is_adapter_parameter(name) or name in expert_weights:
            continue
        state[name] = param.detach().to(dtype).cpu()
    return state


def export_merged(
    module: nn.Module,
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    tokenizer: Any = None,
    check_input_ids: torch.Tensor | None = None,
    progress: bool = True,
) -> ExportReport:
    """Save ``module``'s base with its adapters merged as a transformers model directory in ``dtype``.

    Args:
        module: a transformers model (or a LightningModule holding one in ``.model``) with LoRA adapters.
        out_dir: the directory to write into (created if needed); each file written replaces its namesake there
            atomically, other files stay.
        dtype: dtype of the exported weights (bf16 by default).
        tokenizer: saved alongside when given.
        check_input_ids: token ids for the drift check (merged export vs the unmerged model); ``None`` skips it.
        progress: show a progress bar while merging.

    Raises:
        TypeError: when the model is not a transformers ``PreTrainedModel`` (nothing to ``save_pretrained``).
    """
    root: Any = adapter_root(module)  # a transformers PreTrainedModel, checked below
    if not hasattr(root, "config") or not hasattr(root, "save_pretrained"):
        raise TypeError(
            f"export_merged needs a transformers PreTrainedModel, got {type(root).__name__}. For other models use "
            "lightning_qlora.tools.export.merged_state_dict(model) and save it yourself."
        )
    rounding: list[float] = []
    state = merged_state_dict(root, dtype, progress=progress, rounding=rounding)
    merged_layers = sum(1 for _, layer in iter_lora_layers(root) if not layer.merged)
    fresh = type(root)(root.config).to(dtype)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied heads and non-persistent buffers are expected to be absent from the state dict.
    real_missing = [k for k in missing if not k.endswith("lm_head.weight") or not root.config.tie_word_embeddings]
    if real_missing or unexpected:
        raise RuntimeError(
            f"Merged weights do not fit {type(root).__name__}: missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.tie_weights()

    target = output_directory(out_dir)
    with writer_lock(target), files_into(target) as staging:  # our files replace their namesakes, others stay
        fresh.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        written = [file.name for file in staging.iterdir() if file.is_file()]
    del fresh
    size = sum((target / name).stat().st_size for name in written) / 2**20
    report = ExportReport(str(target), str(dtype).replace("torch.", ""), merged_layers, round(size, 2))
    report.weight_rounding_rel_error = (rounding[0] / rounding[1]) ** 0.5 if rounding[1] > 0 else 0.0
    if check_input_ids is not None:
        report.max_abs_logit_diff, report.rel_logit_error, report.rel_logit_error_fp32_compute = merge_drift(
            root, target, check_input_ids
        )
    return report


@torch.no_grad()
def merge_drift(model: nn.Module, merged_dir: str | Path, input_ids: torch.Tensor) -> tuple[float, float, float]:
    """How far the merged export's logits are from the unmerged model's: ``(max |a - b|, ||a - b|| / ||b||)`` with
    the export run as saved, then ``||a - b|| / ||b||`` with its weights run in fp32 (rounding of the weights only,
    none of the activations: where a wrong merge would show).
    """
    from transformers import AutoModelForCausalLM

    model = adapter_root(model)
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    reference = model(input_ids=input_ids.to(device)).logits.float().cpu()
    model.train(was_training)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    diff = merged(input_ids=input_ids).logits.float() - reference
    fp32_diff = merged.float()(input_ids=input_ids).logits.float() - reference
    return float(diff.abs().max()), float(diff.norm() / reference.norm()), float(fp32_diff.norm() / reference.norm())


def main(argv: list[str] | None = None) -> int:
    """``lightning-qlora-export``: merge an adapter into its base and save a standard transformers directory."""
    parser = argparse.ArgumentParser(prog="lightning-qlora-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)"
    )
    parser.add_argument("--out", required=True, help="where to write the merged model directory")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(COMPUTE_DTYPES), help="dtype of the exported weights")
    parser.add_argument(
        "--quant", default=None, choices=["nf4", "fp4", "none"],
        help="how the base was stored in training (default: as recorded in the adapter); the merge uses that base",
    )
    parser.add_argument("--no-strict", action="store_true", help="load even if the base fingerprint differs")
    args = parser.parse_args(argv)

    require("rich", "lightning-qlora-export")
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from lightning_qlora.app.models.pretrained import load_causal_lm, resolve_pretrained

    console = Console()
    adapter = Path(args.adapter)
    try:  # a broken adapter is named with the file and the reason, not a traceback
        config = read_adapter_config(adapter)
        recorded = read_adapter_metadata(adapter).get("quantization", {})
    except AdapterFormatError as err:
        parser.error(str(err))
    base = args.base or config.get("base_model_name_or_path")
    if not base:
        parser.error(f"{adapter / ADAPTER_CONFIG} names no base_model_name_or_path: pass --base")
    quant_type = args.quant or recorded.get("quant_type", "none")
    quant = QuantConfig(
        quant_type=quant_type,
        blocksize=int(recorded.get("blocksize", 64)),
        double_quant=bool(recorded.get("double_quant", True)) if quant_type != "none" else False,
        compute_dtype="fp32",
    )
    path = resolve_pretrained(base)
    with console.status(f"Loading {base} and the adapter (base stored as {quant_type})"):
        model = load_causal_lm(path)
        try:
            load_adapter(model, adapter, strict=not args.no_strict, quant=quant)
        except (AdapterFormatError, FingerprintMismatchError) as err:
            parser.error(str(err))
        tokenizer = AutoTokenizer.from_pretrained(path)
    sample = tokenizer("The Jargon File is a glossary of hacker slang.", return_tensors="pt")["input_ids"]
    report = export_merged(model, args.out, COMPUTE_DTYPES[args.dtype], tokenizer=tokenizer, check_input_ids=sample)
    table = Table(title="Merged export", show_header=False)
    for key, value in asdict(report).items():
        table.add_row(key, f"{value:.3g}" if isinstance(value, float) and key != "size_mib" else str(value))
    console.print(table)
    console.print(report.drift_explained(), soft_wrap=True, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
