"""LoRA on MoE routers (``LoRAConfig(target_router=True)``): the adapted weight routes, PEFT loads it, export folds it."""

import pytest
import torch
from moe_configs import MOE_ARCHS, VOCAB, moe_model

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter, save_adapter
from lightning_qlora.lora.router import is_adapted_router, iter_routers, router_factors

FP32_NONE = QuantConfig(quant_type="none", compute_dtype="fp32")
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _convert(model, quant=FP32_NONE, **lora):
    plugin = QLoRAPlugin(quant=quant, lora=LoRAConfig(r=4, dropout=0.0, target_router=True, **lora))
    plugin.convert_module(model)
    return plugin.summary


def _perturb_routers(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router in iter_routers(model):
            _, factor_b = router_factors(router)
            factor_b.copy_(torch.randn(factor_b.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_an_adapted_router_routes_with_its_weight_plus_the_adapter(arch):
    model = moe_model(arch)
    summary = _convert(model, target_experts=False)
    routers = list(iter_routers(model))
    assert routers
    assert all(is_adapted_router(r) for _, r in routers)
    assert summary.adapted_routers == [f"{name}.weight" for name, _ in routers]
    assert f"LoRA on {len(routers)} router(s)" in summary.as_text()
    _perturb_routers(model)
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
    # The reference: a plain model whose router weights are W + scaling * B @ A.
    reference = moe_model(arch)
    with torch.no_grad():
        for name, router in routers:
            factor_a, factor_b = router_factors(router)
            scaling = 32.0 / 4  # LoRAConfig's alpha over r
            target = reference.get_submodule(name).weight
            target.add_((factor_b @ factor_a * scaling).to(target.dtype))
        expected = reference(input_ids=IDS).logits
    torch.testing.assert_close(adapted, expected, atol=2e-5, rtol=0)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for _, router in routers:  # the gradient reaches the factors through the routing weights
        factor_a, factor_b = router_factors(router)
        assert factor_a.requires_grad and factor_b.grad is not None and float(factor_b.grad.abs().sum()) > 0
        assert not router._parameters["weight"].requires_grad


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_peft_loads_our_router_adapters_with_the_same_logits_and_so_do_we(arch, tmp_path):
    import json

    from peft import PeftModel

    model = moe_model(arch)
    _convert(model)
    _perturb_routers(model)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    router_entry = "mlp.router.weight" if arch == "gpt_oss" else "mlp.gate.weight"
    assert router_entry in config["target_parameters"]
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        ours = moe_model(arch)
        load_adapter(ours, tmp_path / "adapter")
        assert all(is_adapted_router(r) for _, r in iter_routers(ours))
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=2e-5, rtol=0)
        # PEFT with its target_parameters, experts and router together (Qwen3-MoE, gpt-oss) or router and the
        # DeepSeek-V3 experts PEFT remaps (see test_experts): compare where PEFT loads the experts as saved.
        if arch != "deepseek_v3":
            peft_model = PeftModel.from_pretrained(moe_model(arch), tmp_path / "adapter").eval()
            torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, atol=2e-5, rtol=0)


def test_a_peft_router_adapter_loads_into_ours(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(moe_model("mixtral"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                 target_parameters=["mlp.gate.weight"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = moe_model("mixtral")
    load_adapter(ours, tmp_path / "peft")
    assert all(is_adapted_router(r) for _, r in iter_routers(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, peft_model(input_ids=IDS).logits, atol=2e-5, rtol=0)


def test_routers_are_not_adapted_by_default_and_the_export_folds_adapted_ones(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_qlora.tools.export import export_merged

    plain = moe_model("qwen3_moe")
    QLoRAPlugin(quant=FP32_NONE, lora=LoRAConfig(r=4, dropout=0.0)).convert_module(plain)
    assert not any(is_adapted_router(r) for _, r in iter_routers(plain))

    model = moe_model("qwen3_moe")
    _convert(model, QuantConfig(compute_dtype="fp32"))
    _perturb_routers(model)
    report = export_merged(model, tmp_path / "merged", dtype=torch.float32, check_input_ids=IDS, progress=False)
    assert report.rel_logit_error < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reloaded.config._experts_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
