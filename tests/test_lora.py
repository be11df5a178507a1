import math

import pytest
import torch
from torch import nn

from lightning_qlora import (
    LoRAConfig,
    LoRALinear,
    QuantConfig,
    inject_lora,
    mark_only_lora_as_trainable,
    quantize_model,
)
from lightning_qlora.lora import lora_state_dict


def _toy():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(32, 64))
    model.add_module("act", nn.ReLU())
    model.add_module("down", nn.Linear(64, 32))
    model.add_module("lm_head", nn.Linear(32, 10))
    return model


def _llama_linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_all_linear_targets_every_linear_but_skipped(tiny_llama):
    names = [n for n in _llama_linear_names(tiny_llama) if n != "lm_head"]
    adapted = inject_lora(tiny_llama, LoRAConfig(r=2), skip_modules=("lm_head",))
    assert adapted == names
    assert len(adapted) == 2 * 7  # q k v o gate up down in 2 layers


def test_list_targets_match_name_suffixes(tiny_llama):
    adapted = inject_lora(tiny_llama, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert adapted == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_regex_targets_are_full_match(tiny_llama):
    adapted = inject_lora(tiny_llama, LoRAConfig(r=2, target_modules=r".*layers\.1\.mlp\.(gate|up)_proj"))
    assert adapted == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    # A partial match is not enough: "q_proj" as a regex names no module fully.
    with pytest.raises(ValueError, match=r"matched no nn.Linear"):
        inject_lora(tiny_llama, LoRAConfig(r=2, target_modules=r"q_pro"))


def test_no_match_error_names_real_layers(tiny_llama):
    with pytest.raises(
        ValueError,
        match=r"LoRAConfig\(target_modules=\['qproj'\]\) matched no nn.Linear in the model. Linear layers look like: "
        r"'model.layers.0.self_attn.q_proj'.*Use 'all-linear' or names such as \['q_proj'",
    ):
        inject_lora(tiny_llama, LoRAConfig(target_modules=["qproj"]))


def test_partial_match_error_lists_unmatched_names(tiny_llama):
    with pytest.raises(ValueError, match=r"\['vproj'\] matched no nn.Linear, while the rest matched 2 layer"):
        inject_lora(tiny_llama, LoRAConfig(target_modules=["q_proj", "vproj"]))


def test_injection_is_idempotent():
    model = _toy()
    assert inject_lora(model, LoRAConfig(r=4), skip_modules=("lm_head",)) == ["up", "down"]
    assert inject_lora(model, LoRAConfig(r=4), skip_modules=("lm_head",)) == []
    assert isinstance(model.up.base_layer, nn.Linear)


def test_only_adapters_are_trainable_with_exact_count():
    model = _toy()
    quantize_model(model, QuantConfig())
    inject_lora(model, LoRAConfig(r=4), skip_modules=("lm_head",))
    trainable = mark_only_lora_as_trainable(model)
    # up: A 4x32 + B 64x4; down: A 4x64 + B 32x4
    assert trainable == 4 * 32 + 64 * 4 + 4 * 64 + 32 * 4 == 768
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["down.lora_A.weight", "down.lora_B.weight", "up.lora_A.weight", "up.lora_B.weight"]
    assert sorted(lora_state_dict(model)) == names


def test_initialization_matches_peft_default():
    layer = LoRALinear(nn.Linear(256, 128), r=8, lora_alpha=16)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert layer.lora_A.weight.abs().max() <= bound + 1e-6
    assert layer.lora_A.weight.std() > bound / 4
    assert layer.scaling == pytest.approx(2.0)
    assert LoRALinear(nn.Linear(8, 8), r=4, lora_alpha=8, use_rslora=True).scaling == pytest.approx(4.0)


def test_first_forward_equals_4bit_base():
    model = _toy()
    quantize_model(model, QuantConfig())
    x = torch.randn(8, 32)
    base_out = model(x)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0), skip_modules=("lm_head",))
    assert torch.equal(model(x), base_out)


def test_adapter_forward_equals_lora_over_dequantized_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 96))
    quantize_model(model, QuantConfig(skip_modules=()))
    inject_lora(model, LoRAConfig(r=8, dropout=0.0))
    layer = model[0]
    nn.init.normal_(layer.lora_B.weight, std=0.05)  # a trained-looking, non-zero adapter
    x = torch.randn(16, 128)
    out = layer(x).float()
    ref = layer.reference_forward(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-2  # bf16 compute vs fp32 reference


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64), r=4, lora_alpha=8, dropout=0.5)
    layer.train()
    x = torch.randn(32, 64)
    # With B = 0 the adapter adds nothing, so dropout must leave the base output untouched.
    assert torch.equal(layer(x), layer.base_layer(x))


def test_bf16_adapter_gradients_match_the_fp32_reference():
    """The bf16 compute path (fp32 master weights) against the same LoRA over the dequantized weight in fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    quantize_model(model, QuantConfig(skip_modules=()))
    inject_lora(model, LoRAConfig(r=8, dropout=0.0))
    layer = model[0]
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    x = torch.randn(32, 256)
    target = torch.randn(32, 128)

    grads = {}
    for name, forward in (("bf16", lambda: layer(x.to(torch.bfloat16)).float()), ("fp32", lambda: layer.reference_forward(x))):
        layer.zero_grad(set_to_none=True)
        ((forward() - target) ** 2).mean().backward()
        grads[name] = (layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    assert layer.lora_A.weight.dtype == torch.float32  # master weights stay fp32
    for fast, ref in zip(grads["bf16"], grads["fp32"]):
        assert (fast - ref).norm() / ref.norm() < 2e-2  # bf16 operands
