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


def test_moe_experts_left_in_bf16_are_named_warned_about_and_refused_under_strict():
    model = _qwen3_moe()
    with pytest.warns(UserWarning, match=r"matrix weights are not quantized .*MoE experts \(3-D\) 49,152 params"):
        QLoRAPlugin(lora=LoRAConfig(r=4)).convert_module(model)
    text = full_precision_report(model).as_text()
    assert "MoE experts (3-D) 49.2 K params NOT QUANTIZED (4 tensors, e.g. model.layers.0.mlp.experts.gate_up_proj)" in text
    assert "routers 512 params" in text
    with pytest.raises(QuantizationCoverageError, match=r"66.7% of the model's matrix weights stayed in full precision"):
        QLoRAPlugin(lora=LoRAConfig(r=4), strict=True).convert_module(_qwen3_moe())
    QLoRAPlugin(lora=LoRAConfig(r=4), strict=0.7).convert_module(_qwen3_moe())  # a stated share it is within
    with pytest.raises(ValueError, match=r"strict=1.5\) must be True, False or a share"):
        QLoRAPlugin(strict=1.5)
