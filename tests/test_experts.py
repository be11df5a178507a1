"""Mixture-of-experts weights in 4-bit with per-expert adapters: the same outputs as transformers, PEFT loads them."""

import pytest
import torch
from moe_configs import MOE_ARCHS, VOCAB, moe_model

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter, save_adapter
from lightning_qlora.lora.experts import expert_factors, is_adapted_experts
from lightning_qlora.quant.experts import expert_weight, expert_weight_names, is_quantized_experts, iter_experts

FP32_NONE = QuantConfig(quant_type="none", compute_dtype="fp32")
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))


def _convert(model, quant=FP32_NONE, **lora):
    plugin = QLoRAPlugin(quant=quant, lora=LoRAConfig(r=8, dropout=0.0, **lora))
    plugin.convert_module(model)
    return plugin.summary


def _perturb(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in iter_experts(model):
            for b in expert_factors(module)[1].values():
                b.copy_(torch.randn(b.shape, generator=generator) * 0.05)
        for name, param in model.named_parameters():
            if "lora_B" in name and "experts" not in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_unquantized_experts_with_zero_adapters_compute_what_transformers_computes(arch):
    reference, model = moe_model(arch), moe_model(arch)
    summary = _convert(model)
    assert summary.adapted_experts
    assert all(is_adapted_experts(m) for _, m in iter_experts(model))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_weight_is_nf4_and_computes_with_its_dequantized_values(arch):
    model = moe_model(arch)
    summary = _convert(model, QuantConfig(compute_dtype="fp32"))
    experts = list(iter_experts(model))
    assert experts
    assert all(is_quantized_experts(m) for _, m in experts)
    assert summary.full_precision.not_quantized_params == 0, summary.full_precision.as_text()
    assert len(summary.experts.quantized) == 2 * len(experts)
    assert summary.experts.num_params // 2 < summary.experts.bytes_after < summary.experts.bytes_before / 5  # 4-bit
    assert "MoE experts: " in summary.as_text()
    assert "NOT QUANTIZED" not in summary.as_text()
    # The reference: transformers' own experts holding the values the 4-bit bytes decode to.
    reference = moe_model(arch)
    with torch.no_grad():
        for (name, ours), (_, theirs) in zip(experts, iter_experts(reference), strict=True):
            for weight in expert_weight_names(ours):
                original = getattr(theirs, weight)
                decoded = expert_weight(ours, weight, torch.float32)
                assert decoded.shape == original.shape
                error = (decoded - original).norm() / original.norm()
                assert 0.0 < error < 0.15, (name, weight, float(error))  # NF4's rounding, not garbage
                original.copy_(decoded)
        # Everything else the reference keeps in fp32; ours holds 4-bit linears: compare through the experts only.
        model_out = model.model.layers[-1].mlp.experts
        ref_out = reference.model.layers[-1].mlp.experts
        hidden = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
        index = torch.randint(0, 4, (10, 2), generator=torch.Generator().manual_seed(5))
        weights = torch.rand(10, 2, generator=torch.Generator().manual_seed(6))
        torch.testing.assert_close(model_out(hidden, index, weights), ref_out(hidden, index, weights), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_expert_adapters_get_the_gradients_of_the_merged_weights(arch):
    # d loss / d A and d B through the grouped path equal those of W + scaling * B @ A computed densely.
    model = moe_model(arch)
    _convert(model, QuantConfig(compute_dtype="fp32"))
    _perturb(model)
    experts = model.model.layers[-1].mlp.experts
    hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    index = torch.randint(0, 4, (16, 2), generator=torch.Generator().manual_seed(5))
    weights = torch.rand(16, 2, generator=torch.Generator().manual_seed(6))
    experts(hidden, index, weights).square().sum().backward()
    factor_a, factor_b = expert_factors(experts)
    grads = {n: (factor_a[n].grad.clone(), factor_b[n].grad.clone()) for n in factor_a}
    grad_hidden = hidden.grad.clone()

    reference = moe_model(arch).model.layers[-1].mlp.experts
    leaves = {n: (factor_a[n].detach().clone().requires_grad_(), factor_b[n].detach().clone().requires_grad_())
              for n in factor_a}
    scaling = experts.lora_scaling
    with torch.no_grad():
        frozen = {n: expert_weight(experts, n, torch.float32) for n in factor_a}
    originals = {n: reference._parameters.pop(n) for n in factor_a}
    for n, (a, b) in leaves.items():
        delta = torch.bmm(b, a) * scaling
        setattr(reference, n, frozen[n] + (delta.transpose(-2, -1) if reference.is_transposed else delta))
    hidden_ref = hidden.detach().clone().requires_grad_()
    reference.config._experts_implementation = "eager"
    reference(hidden_ref, index, weights).square().sum().backward()
    for n, (a, b) in leaves.items():
        torch.testing.assert_close(grads[n][0], a.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grads[n][1], b.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad_hidden, hidden_ref.grad, atol=1e-4, rtol=1e-4)
    assert originals


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_past_the_scratch_limit_are_unpacked_in_chunks_with_the_same_outputs_and_gradients(arch, monkeypatch):
    # (DeepSeek-V3's 256 experts unpack to 14 GiB a projection whole.) Past EXPERT_SCRATCH_BYTES the frozen matmul
    # unpacks a few experts at a time; outputs and gradients must not change.
    import lightning_qlora.lora.experts as lora_experts
    import lightning_qlora.quant.experts as quant_experts
    from lightning_qlora.quant.experts import expert_shape, expert_weight_range

    model = moe_model(arch)
    _convert(model, QuantConfig(compute_dtype="fp32"))
    _perturb(model)
    experts = model.model.layers[-1].mlp.experts
    for name in expert_weight_names(experts):  # a range unpacks exactly those experts' values
        whole = expert_weight(experts, name, torch.float32)
        assert torch.equal(expert_weight_range(experts, name, torch.float32, 1, 3), whole[1:3])
    hidden = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    index = torch.randint(0, 4, (16, 2), generator=torch.Generator().manual_seed(5))
    index[:, 0] = index[:, 0].clamp(max=2)  # (an expert may get no rows: the 4th only from the second choice)
    weights = torch.rand(16, 2, generator=torch.Generator().manual_seed(6))

    def step():
        model.zero_grad(set_to_none=True)
        leaf = hidden.clone().requires_grad_()
        out = experts(leaf, index, weights)
        out.square().sum().backward()
        factor_a, factor_b = expert_factors(experts)
        return out.detach(), leaf.grad, {n: (factor_a[n].grad, factor_b[n].grad) for n in factor_a}

    whole_out, whole_grad, whole_factors = step()
    unpacked = []
    real_range = lora_experts.expert_weight_range
    monkeypatch.setattr(lora_experts, "expert_weight_range",
                        lambda *a, **k: unpacked.append(real_range(*a, **k).shape[0]) or real_range(*a, **k))
    monkeypatch.setattr(lora_experts, "expert_weight", lambda *a, **k: pytest.fail("unpacked whole"))
    sizes = sorted(expert_shape(experts, n)[1] * expert_shape(experts, n)[2] for n in expert_weight_names(experts))
    monkeypatch.setattr(quant_experts, "EXPERT_SCRATCH_BYTES", 2 * sizes[0] * 4)  # 2 experts of the smaller, fp32
    chunked_out, chunked_grad, chunked_factors = step()
    # The smaller weight in chunks of 2 experts (the second's row groups counted from its own first row), the larger
    # (twice the size) one expert at a time.
    assert max(unpacked) == 2 and min(unpacked) == 1 and sizes[-1] == 2 * sizes[0]
    torch.testing.assert_close(chunked_out, whole_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-6, rtol=1e-6)
    for name, (a, b) in whole_factors.items():
        torch.testing.assert_close(chunked_factors[name][0], a, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(chunked_factors[name][1], b, atol=1e-6, rtol=1e-6)


# PEFT 0.21 reads target_modules 'gate_proj'/'up_proj'/'down_proj' of DeepSeek-V3 (and other types it converts from
# transformers 4's per-expert layout) as the experts' old names: adapters on its dense and shared-expert MLPs do not
# load there (README). Our own load does.
# PEFT 0.22 does the same for Qwen2-MoE's shared expert: there either outcome is PEFT's.
PEFT_LOADS = {arch: arch not in ("deepseek_v3", "qwen2_moe") for arch in MOE_ARCHS}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_peft_loads_our_expert_adapters_with_the_same_logits_and_so_do_we(arch, tmp_path):
    from peft import PeftModel

    model = moe_model(arch)
    _convert(model)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        try:
            peft_model = PeftModel.from_pretrained(moe_model(arch), tmp_path / "adapter").eval()
            torch.testing.assert_close(peft_model(input_ids=IDS).logits, expected, atol=2e-5, rtol=0)
        except RuntimeError as err:
            if PEFT_LOADS[arch] or "size mismatch" not in str(err):
                raise
        ours = moe_model(arch)
        load_adapter(ours, tmp_path / "adapter")
        torch.testing.assert_close(ours(input_ids=IDS).logits, expected, atol=2e-5, rtol=0)


def test_a_peft_expert_adapter_loads_into_ours(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(moe_model("qwen3_moe"), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = moe_model("qwen3_moe")
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, peft_model(input_ids=IDS).logits, atol=2e-5, rtol=0)


def test_experts_can_be_left_without_adapters_and_stay_4bit():
    model = moe_model("mixtral")
    summary = _convert(model, QuantConfig(compute_dtype="fp32"), target_experts=False)
    assert summary.adapted_experts == []
    assert len(summary.experts.quantized) == 4
    assert not any(is_adapted_experts(m) for _, m in iter_experts(model))
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()  # the frozen 4-bit experts pass gradients to what trains
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_the_merged_export_folds_the_expert_adapters_into_plain_expert_weights(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_qlora.tools.export import export_merged

    model = moe_model(arch)
    _convert(model, QuantConfig(compute_dtype="fp32"))
    _perturb(model)
    report = export_merged(model, tmp_path / "merged", dtype=torch.float32, check_input_ids=IDS, progress=False)
    assert report.rel_logit_error < 1e-4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reloaded.config._experts_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=1e-4, rtol=1e-4)
