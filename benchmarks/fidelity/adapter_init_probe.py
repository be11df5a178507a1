"""Held-out perplexity of SmolLM2 on a 4-bit base with LoRA adapters injected, before any training: default init
(B = 0) vs the error-correcting init (``init_lora_weights="cloq"``), with round-to-nearest and GPTQ-rounded codes.

    python benchmarks/fidelity/adapter_init_probe.py [rank]      # default rank 16 (the default job's)

Calibration data: the first 256 rows of the Jargon training split, in order (what ``strategy="qlora"`` uses);
evaluation: the held-out rows, as ``lightning-qlora-report`` measures perplexity. Everything goes through the library's
own path: calibrated_weights -> quantize_model -> inject_lora -> ErrorCorrectingInit.apply.
"""

import sys
import time

from lightning_qlora.app.data import InstructionDataModule
from lightning_qlora.app.models.pretrained import load_causal_lm, resolve_pretrained
from lightning_qlora.calibration import calibrated_weights
from lightning_qlora.calibration.cloq import ErrorCorrectingInit
from lightning_qlora.config import LoRAConfig, QuantConfig
from lightning_qlora.lora import inject_lora
from lightning_qlora.quant import quantize_model
from lightning_qlora.tools.report import _perplexity


def main() -> None:
    rank = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    path = resolve_pretrained("smollm2-135m-instruct")
    data = InstructionDataModule(path, max_length=128, batch_size=8, val_size=64, packing=False)
    data.setup("fit")
    loader = data.train_dataloader()
    held_out = list(data.val_dataloader())
    rows = [loader.dataset[i] for i in range(256)]
    batches = [loader.collate_fn(rows[i : i + 8]) for i in range(0, 256, 8)]
    quant, lora = QuantConfig(), LoRAConfig(r=rank, alpha=2 * rank)
    print(f"bf16: held-out perplexity {_perplexity(load_causal_lm(path).eval(), held_out):.2f}", flush=True)
    for rounding in ("nearest", "gptq"):
        model = load_causal_lm(path).eval()
        init = ErrorCorrectingInit(quant, lora)
        started = time.perf_counter()
        rounded, _ = calibrated_weights(model, batches, config=quant, rounding=rounding, on_layer=init, progress=False)
        seconds = time.perf_counter() - started
        quantize_model(model, quant, rounded=rounded, progress=False)
        inject_lora(model, lora, skip_modules=quant.skip_modules)
        model.eval()
        print(f"{rounding}, default init: {_perplexity(model, held_out):.2f}", flush=True)
        applied = init.apply(model)
        print(f"{rounding}, cloq init r{rank} ({len(applied)} adapters; calibration {seconds:.0f} s): "
              f"{_perplexity(model, held_out):.2f}", flush=True)


if __name__ == "__main__":
    main()
