"""DoRA on the 4-bit base: trains, saves in PEFT format with use_dora, loads in PEFT with the same logits, merges."""

import json

import torch
from helpers import CausalLMModule, assert_merge_round_trip, fast_trainer, llama, token_loader

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter, save_adapter
from lightning_qlora.lora import iter_lora_layers
from lightning_qlora.quant import dequantize_weight

FP32_NONE = QuantConfig(quant_type="none", compute_dtype="fp32")


def _dora(model, quant=FP32_NONE):
    QLoRAPlugin(quant=quant, lora=LoRAConfig(r=4, alpha=8, dropout=0.0, use_dora=True)).convert_module(model)
    return model


def _perturb(model):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
            layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude_vector.shape, generator=generator))


def test_fresh_dora_adapter_leaves_the_output_unchanged(tiny_llama_config):
    ids = torch.randint(0, 128, (2, 8))
    base = llama(tiny_llama_config)
    with torch.no_grad():
        expected = base(ids).logits
    model = _dora(llama(tiny_llama_config))
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_magnitude_vector, torch.linalg.norm(layer.base_layer.weight, dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_dora_trains_on_the_4bit_base(tiny_llama_config):
    module = CausalLMModule(tiny_llama_config)
    plugin = QLoRAPlugin(lora=LoRAConfig(r=8, alpha=16, dropout=0.0, use_dora=True))
    trainer = fast_trainer(plugins=[plugin], max_steps=24)
    trainer.fit(module, token_loader())
    layer = module.model.model.layers[0].self_attn.q_proj
    assert layer.use_dora and layer.lora_magnitude_vector.requires_grad
    initial = torch.linalg.norm(dequantize_weight(layer.base_layer).float(), dim=1)  # what the magnitude started at
    assert not torch.allclose(layer.lora_magnitude_vector.detach(), initial)  # the magnitude was trained
    assert sum(module.losses[-4:]) / 4 < sum(module.losses[:4]) / 4 - 0.3, module.losses


def test_dora_adapter_loads_in_peft_with_the_same_logits_and_back(tmp_path, tiny_llama_config):
    from peft import PeftModel

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model = _dora(llama(tiny_llama_config))
    _perturb(model)
    save_adapter(model, tmp_path / "dora")
    assert json.loads((tmp_path / "dora" / "adapter_config.json").read_text())["use_dora"] is True
    peft_model = PeftModel.from_pretrained(llama(tiny_llama_config), tmp_path / "dora").eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    peft_model.save_pretrained(tmp_path / "from_peft")
    reloaded = llama(tiny_llama_config)
    load_adapter(reloaded, tmp_path / "from_peft")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, theirs, atol=1e-4, rtol=0)


def test_dora_merge_matches_and_unmerges_exactly(tiny_llama_config):
    ids = torch.randint(0, 128, (2, 10))
    model = _dora(llama(tiny_llama_config))
    _perturb(model)
    assert_merge_round_trip(model, ids)
