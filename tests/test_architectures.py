"""The architecture matrix: every popular family trains under Trainer(strategy="qlora"), its weights quantized as
expected, adapters where PEFT's all-linear puts them, and PEFT loads the adapter with equal logits.

``python tests/test_architectures.py`` prints the README's table of supported architectures from the same facts;
``test_the_readme_table_is_the_generated_one`` keeps the two equal.
"""

import sys
from pathlib import Path

import pytest
import torch
from arch_configs import ARCHS, VOCAB, build
from lightning.pytorch import LightningModule, Trainer

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter, save_adapter
from lightning_qlora.lora import iter_lora_layers
from lightning_qlora.lora.experts import expert_factors
from lightning_qlora.modules import linears_read_by_weight
from lightning_qlora.quant.experts import iter_experts

README = Path(__file__).resolve().parents[1] / "README.md"
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
# PEFT 0.21 reads DeepSeek-V3's dense/shared-expert gate/up/down_proj targets as its experts' transformers-4 names.
PEFT_CANNOT_LOAD = {
    "deepseek_v3": "its dense and shared-expert MLP adapters (PEFT remaps their names to the experts)",
    "qwen2_moe": "its shared-expert MLP adapters with PEFT 0.22 (remapped to the experts; 0.21 loads them)",
    "mamba": "PEFT refuses adapters on Mamba's out_proj (its fused CUDA kernel reads the weight)",
}
TASK_TYPES = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "seq_cls": "SEQ_CLS"}


def _inputs(arch):
    kind = ARCHS[arch][2]
    if kind == "seq2seq":
        return {"input_ids": IDS, "decoder_input_ids": IDS}
    return {"input_ids": IDS}


def _loss(arch, model):
    kind = ARCHS[arch][2]
    if kind == "seq_cls":
        return model(input_ids=IDS, labels=torch.tensor([0, 2])).loss
    if kind == "seq2seq":
        return model(input_ids=IDS, labels=IDS).loss
    return model(input_ids=IDS, labels=IDS).loss


class _Fit(LightningModule):
    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        self.model = build(arch)
        self.losses = []

    def training_step(self, batch, batch_idx):
        loss = _loss(self.arch, self.model)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=5e-3)


def facts(arch):
    """What converting ``arch`` with the defaults (r 8) does: the README table's row."""
    model = build(arch)
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=8))
    plugin.convert_module(model)
    summary = plugin.summary
    kept = [g for g in summary.full_precision.groups if g.kind not in ("embeddings", "norms", "biases")]
    return {
        "arch": arch,
        "linears": len(summary.quantization.quantized),
        "experts": len(summary.experts.quantized),
        "adapted": len(summary.adapted) + len(summary.adapted_experts),
        "kept": "; ".join(f"{g.kind}: {len(g.names)}" for g in kept) or "-",
        "not_quantized": summary.full_precision.not_quantized_params,
        "peft": "yes" if arch not in PEFT_CANNOT_LOAD else f"no: {PEFT_CANNOT_LOAD[arch]}",
    }


def table() -> str:
    lines = ["| architecture | 4-bit linears | 4-bit expert weights | adapters | kept in full precision | PEFT loads |",
             "|---|---|---|---|---|---|"]
    for arch in ARCHS:
        f = facts(arch)
        lines.append(f"| {arch} | {f['linears']} | {f['experts']} | {f['adapted']} | {f['kept']} | {f['peft']} |")
    return "\n".join(lines)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_it_trains_under_the_qlora_strategy(arch):
    module = _Fit(arch)
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=8, dropout=0.0))
    trainer = Trainer(strategy="qlora", plugins=[plugin], accelerator="cpu", max_steps=4, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    batches = torch.utils.data.DataLoader([0] * 4, batch_size=1)
    trainer.fit(module, batches)
    assert len(module.losses) == 4
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert module.losses[-1] < module.losses[0], module.losses
    summary = plugin.summary
    # Every matrix the recipe can quantize is 4-bit: nothing left in full precision but what is listed as kept.
    assert summary.full_precision.not_quantized_params == 0, summary.full_precision.as_text()
    assert summary.quantization.quantized


@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapters_sit_where_peft_all_linear_puts_them_and_peft_loads_them(arch, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build(arch)
    QLoRAPlugin(quant=QuantConfig(quant_type="none", compute_dtype="fp32"),
                lora=LoRAConfig(r=8, dropout=0.0)).convert_module(model)
    ours = {name for name, _ in iter_lora_layers(model)}
    # Where the model reads a linear's weight directly (Mamba's dt_proj) PEFT's adapter would never be applied: we keep
    # such linears out, and say so.
    read_directly = set(linears_read_by_weight(build(arch)))
    if arch in PEFT_CANNOT_LOAD and arch != "qwen2_moe":  # PEFT refuses or remaps these: every linear but the head
        theirs = {name for name, module in build(arch).named_modules()
                  if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    else:
        reference = get_peft_model(build(arch), LoraConfig(r=8, target_modules="all-linear",
                                                           task_type=TASK_TYPES[ARCHS[arch][2]]))
        theirs = {name.removeprefix("base_model.model.") for name, module in reference.named_modules()
                  if hasattr(module, "lora_A") and type(module).__name__ != "ParamWrapper"
                  and not name.endswith("base_layer")}
    assert ours == theirs - read_directly, (sorted(ours - theirs)[:4], sorted(theirs - ours)[:4])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
        for _, experts in iter_experts(model):
            for b in expert_factors(experts)[1].values():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
    save_adapter(model, tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(**_inputs(arch)).logits
        reloaded = build(arch)
        load_adapter(reloaded, tmp_path / "adapter")
        torch.testing.assert_close(reloaded(**_inputs(arch)).logits, expected, atol=2e-5, rtol=0)
        try:
            peft_model = PeftModel.from_pretrained(build(arch), tmp_path / "adapter").eval()
        except (RuntimeError, ValueError):
            if arch in PEFT_CANNOT_LOAD:  # the documented limitation (PEFT's version decides)
                return
            raise
        torch.testing.assert_close(peft_model(**_inputs(arch)).logits, expected, atol=2e-5, rtol=0)


def test_the_readme_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert table() in text, "README's architecture table is stale: paste `python tests/test_architectures.py`"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(table())


def test_t5_keeps_its_fp32_modules_in_fp32_and_adapts_them():
    model = build("t5")
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="bf16"), lora=LoRAConfig(r=8))
    plugin.convert_module(model)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert type(wo).__name__ == "LoRALinear"
    assert wo.base_layer.weight.dtype == torch.float32
    assert "encoder.block.0.layer.1.DenseReluDense.wo" in plugin.summary.quantization.skipped
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert wo.lora_B.weight.grad is not None


def test_modules_the_quantization_config_skips_stay_unquantized_but_adapted():
    model = build("llama")
    model.config.quantization_config = {"llm_int8_skip_modules": ["lm_head", "mlp.down_proj"]}
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=8))
    plugin.convert_module(model)
    skipped = plugin.summary.quantization.skipped
    assert {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} <= set(skipped)
    assert type(model.model.layers[0].mlp.down_proj.base_layer) is torch.nn.Linear
    assert "model.layers.0.mlp.down_proj" in plugin.summary.adapted
    assert "model.layers.0.mlp.up_proj" in plugin.summary.quantization.quantized


def test_a_converted_model_reads_no_base_weight_directly():
    # Converting again (validate() after fit()) must not take the adapters' own factors for such linears.
    model = build("llama")
    QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=8)).convert_module(model)
    assert linears_read_by_weight(model) == []
    assert linears_read_by_weight(build("mamba"))  # while Mamba's are found
