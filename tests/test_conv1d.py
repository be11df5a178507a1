"""GPT-2-style Conv1D layers ([in, out] weights) are quantized and adapted like nn.Linear, and PEFT reads the adapter."""

import torch

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter, save_adapter
from lightning_qlora.lora import iter_lora_layers
from lightning_qlora.quant import is_quantized_linear
from lightning_qlora.tools.export import export_merged

FP32_NONE = QuantConfig(quant_type="none", compute_dtype="fp32")


def _gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _perturb(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in iter_lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))


def test_every_conv1d_is_quantized_and_adapted_and_the_conversion_is_exact():
    reference = _gpt2()
    plain = _gpt2()
    QLoRAPlugin(quant=FP32_NONE, lora=LoRAConfig(r=4)).convert_module(plain)
    with torch.no_grad():  # B = 0 and no quantization: the converted layers compute what Conv1D computes
        torch.testing.assert_close(plain(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-5, rtol=0)
    model = _gpt2()
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4))
    plugin.convert_module(model)
    layers = dict(iter_lora_layers(model))
    assert sorted({name.rpartition(".")[2] for name in layers}) == ["c_attn", "c_fc", "c_proj"]
    assert len(layers) == 8 and all(is_quantized_linear(layer.base_layer) for layer in layers.values())
    assert "Conv1D" not in plugin.summary.as_text()  # nothing left unquantized
    assert plugin.summary.full_precision.not_quantized_params == 0


def test_our_gpt2_adapter_loads_in_peft_and_back_with_the_same_logits(tmp_path):
    from peft import PeftModel

    model = _gpt2()
    QLoRAPlugin(quant=FP32_NONE, lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(_gpt2(), tmp_path / "adapter").eval()
    ours = _gpt2()
    load_adapter(ours, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_a_peft_gpt2_adapter_loads_into_ours(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                    fan_in_fan_out=True))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = _gpt2()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, peft_model(input_ids=IDS).logits, atol=1e-5, rtol=0)


def test_the_merged_export_loads_as_a_plain_gpt2(tmp_path):
    from transformers import GPT2LMHeadModel

    model = _gpt2()
    QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4, dropout=0.0)).convert_module(model)
    _perturb(model)
    report = export_merged(model, tmp_path / "merged", dtype=torch.float32, check_input_ids=IDS, progress=False)
    assert report.rel_logit_error < 1e-4
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged")
    assert type(reloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
