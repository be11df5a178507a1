"""Every weight left in full precision is named by kind and size; strict=True refuses a model mostly unquantized."""

import pytest
import torch

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, convert_model
from lightning_qlora.lightning.coverage import QuantizationCoverageError
from lightning_qlora.quant.full_precision import full_precision_report


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
    return Qwen3MoeForCausalLM(config)


def test_a_llama_leaves_only_embeddings_norms_and_the_head(tiny_llama_config):
    from helpers import llama

    model = llama(tiny_llama_config)
    summary = convert_model(model, QuantConfig(), LoRAConfig(r=4))
    report = summary.full_precision
    assert {g.kind for g in report.groups} == {"embeddings", "norms", "kept linears"}
    assert report.not_quantized_params == 0 and report.not_quantized_share == 0.0
    assert "lm_head.weight" in next(g for g in report.groups if g.kind == "kept linears").names


def test_a_matrix_the_recipe_cannot_quantize_is_named_warned_about_and_refused_under_strict():
    # A model whose weight is used with F.linear, outside any nn.Linear: nothing quantizes it.
    class Projection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.randn(64, 64))
            self.head = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.head(torch.nn.functional.linear(x, self.proj))

    with pytest.warns(UserWarning, match=r"matrix weights are not quantized .*other matrices 4,096 params"):
        QLoRAPlugin(lora=LoRAConfig(r=4)).convert_module(Projection())
    model = Projection()
    QLoRAPlugin(quant=QuantConfig(skip_modules=()), lora=LoRAConfig(r=4), strict=0.95).convert_module(model)
    text = full_precision_report(model).as_text()
    assert "other matrices 4.1 K params NOT QUANTIZED (1 tensors, e.g. proj)" in text
    with pytest.raises(QuantizationCoverageError, match=r"88.9% of the model's matrix weights stayed in full precision"):
        QLoRAPlugin(quant=QuantConfig(skip_modules=()), lora=LoRAConfig(r=4), strict=True).convert_module(Projection())
    with pytest.raises(ValueError, match=r"strict=1.5\) must be True, False or a share"):
        QLoRAPlugin(strict=1.5)


def test_moe_experts_are_quantized_so_strict_passes_and_the_summary_says_so():
    model = _qwen3_moe()
    plugin = QLoRAPlugin(lora=LoRAConfig(r=8), strict=True)
    plugin.convert_module(model)
    assert plugin.summary.full_precision.not_quantized_params == 0
    assert "MoE experts: 4 weight(s), 49,152 params -> nf4" in plugin.summary.as_text()
    assert "routers 512 params" in plugin.summary.full_precision.as_text()
