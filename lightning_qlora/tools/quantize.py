"""``lightning-qlora-quantize``: write a model's NF4 + double-quant base in transformers' 4-bit format.

    lightning-qlora-quantize /models/llama-2-7b --out llama-2-7b-nf4
    lightning-qlora-quantize smollm2-135m-instruct --out smollm2-nf4 --device cpu

The full-precision checkpoint is streamed layer by layer (never whole in memory), each linear quantized on the
device; the result loads in ``AutoModelForCausalLM.from_pretrained`` (transformers + bitsandbytes), in PEFT, and in
our runs (``model.name_or_path=DIR``), which then start without the full-precision checkpoint. Adapters trained on it
keep the original base's fingerprint.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from lightning_qlora._imports import require
from lightning_qlora.config import COMPUTE_DTYPES, QUANT_TYPES, SUPPORTED_BLOCKSIZES, QuantConfig

# Files of a model directory that are not weights and travel with the quantized copy (tokenizer, chat template...).
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
_NOT_COPIED = {"config.json", "generation_config.json", "model.safetensors.index.json"}


def quantize_checkpoint(
    source: str | Path, out: str | Path, quant: QuantConfig, device: torch.device
) -> dict[str, float]:
    """Stream ``source`` into 4-bit on ``device`` and save it to ``out``; returns what it measured.

    Raises:
        CheckpointError: for a damaged or incomplete source checkpoint.
    """
    from lightning_qlora.convert import convert_model
    from lightning_qlora.pretrained import stream_pretrained
    from lightning_qlora.quant.save import save_quantized

    started = time.perf_counter()
    model = stream_pretrained(source)
    summary = convert_model(model, quant, None, device=device)
    target = save_quantized(model, out)
    for file in Path(source).iterdir():
        if file.is_file() and file.suffix in _COPIED_SUFFIXES and file.name not in _NOT_COPIED:
            shutil.copy2(file, target / file.name)
    report = summary.quantization
    return {
        "layers": float(len(report.quantized)),
        "bytes_before": float(report.bytes_before),
        "bytes_after": float(report.bytes_after),
        "bits_per_param": report.bits_per_parameter,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    """``lightning-qlora-quantize MODEL --out DIR``."""
    parser = argparse.ArgumentParser(prog="lightning-qlora-quantize", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("model", help="a model directory (config.json + safetensors), or an alias such as "
                                      "smollm2-135m-instruct")
    parser.add_argument("--out", required=True, help="where to write the 4-bit checkpoint")
    parser.add_argument("--quant-type", default="nf4", choices=[q for q in QUANT_TYPES if q != "none"])
    parser.add_argument("--no-double-quant", action="store_true", help="keep the absmax constants in fp32")
    parser.add_argument("--blocksize", type=int, default=64, choices=SUPPORTED_BLOCKSIZES)
    parser.add_argument("--compute-dtype", default="bf16", choices=sorted(COMPUTE_DTYPES))
    parser.add_argument("--device", default="auto", help="where to quantize: auto (a GPU when present), cpu, cuda:0")
    args = parser.parse_args(argv)
    require("rich", "lightning-qlora-quantize")
    from rich.console import Console
    from rich.table import Table

    from lightning_qlora.app.models.pretrained import resolve_pretrained

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    quant = QuantConfig(quant_type=args.quant_type, double_quant=not args.no_double_quant, blocksize=args.blocksize,
                        compute_dtype=args.compute_dtype)
    facts = quantize_checkpoint(resolve_pretrained(args.model), args.out, quant, device)
    table = Table(title=f"Quantized {args.model} -> {args.out}", show_header=False)
    table.add_row("format", f"{quant.quant_type}{' + double quant' if quant.double_quant else ''}, "
                            f"blocksize {quant.blocksize}, on {device}")
    table.add_row("linear layers", f"{facts['layers']:.0f}")
    before, after = facts["bytes_before"] / 2**20, facts["bytes_after"] / 2**20
    table.add_row("linear weights", f"{before:.1f} MiB -> {after:.1f} MiB ({facts['bits_per_param']:.3f} bits/param)")
    table.add_row("time", f"{facts['seconds']:.1f} s")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
