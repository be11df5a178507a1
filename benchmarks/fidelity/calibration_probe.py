"""Held-out perplexity of SmolLM2 quantized to NF4 + double quant with GPTQ-calibrated codes, for a few settings.

    python benchmarks/fidelity/calibration_probe.py 256:0.01:1 512:0.01:1 256:0.1:1 256:0.01:0   # samples:damping:act_order

Calibration data: the first ``samples`` rows of the Jargon training split, in order (what ``strategy="qlora"``
uses); evaluation: the held-out rows, as ``lightning-qlora-report`` measures perplexity.
"""

import functools
import sys
import time

import lightning_qlora.calibration.statistics as calibration
from lightning_qlora.app.data import InstructionDataModule
from lightning_qlora.app.models.pretrained import load_causal_lm, resolve_pretrained
from lightning_qlora.config import QuantConfig
from lightning_qlora.quant import quantize_model
from lightning_qlora.tools.report import _perplexity


def main() -> None:
    path = resolve_pretrained("smollm2-135m-instruct")
    data = InstructionDataModule(path, max_length=128, batch_size=8, val_size=64, packing=False)
    data.setup("fit")
    loader = data.train_dataloader()
    held_out = list(data.val_dataloader())
    original = calibration.gptq_round
    for spec in sys.argv[1:] or ["256:0.01:1"]:
        samples, damping, act_order = spec.split(":")
        samples = int(samples)
        rows = [loader.dataset[i] for i in range(samples)]
        batches = [loader.collate_fn(rows[i : i + 8]) for i in range(0, samples, 8)]
        calibration.gptq_round = functools.partial(original, act_order=act_order == "1")
        model = load_causal_lm(path).eval()
        started = time.perf_counter()
        rounded, report = calibration.calibrated_weights(model, batches, damping=float(damping), progress=False)
        quantize_model(model, QuantConfig(), rounded=rounded, progress=False)
        print(f"samples {samples} damping {damping} act_order {act_order}: held-out perplexity "
              f"{_perplexity(model, held_out):.2f} (calibration {report.seconds:.0f} s, {report.tokens} tokens)",
              flush=True)


if __name__ == "__main__":
    main()
