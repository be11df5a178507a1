import logging

import pytest
import torch
from helpers import CausalLMModule, RegressionModule, fast_trainer, regression_loader, token_loader
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from lightning_qlora import LoRAConfig, LoRALinear, QLoRAPlugin, QuantConfig
from lightning_qlora.quant import is_quantized_linear, packed_bytes


def _trainer(**kwargs):
    return fast_trainer(**({"max_steps": 20} | kwargs))


def _packed(module):
    return {n: packed_bytes(m).clone() for n, m in module.named_modules() if is_quantized_linear(m)}


def test_fit_sequential_trains_adapters_only_and_keeps_base_bytes(caplog):
    module = RegressionModule()
    plugin = QLoRAPlugin(lora=LoRAConfig(r=8, alpha=16, dropout=0.0))
    trainer = _trainer(plugins=[plugin], max_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, regression_loader())
    # The summary logged once at fit start.
    assert "QLoRA: 3 linear layer(s) -> nf4 + double quant" in caplog.text
    assert "trainable params" in caplog.text
    summary = plugin.summary
    assert summary.trainable_params == (8 * 32 + 64 * 8) + (8 * 64 + 64 * 8) + (8 * 64 + 1 * 8)
    assert summary.total_params > summary.trainable_params
    assert all(isinstance(m, LoRALinear) for m in module.model if not isinstance(m, nn.ReLU))
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        f"model.{i}.lora_{ab}.weight" for i in (0, 2, 4) for ab in "AB"
    }

    before = _packed(module)
    assert len(before) == 3
    trainer = _trainer(plugins=[plugin], max_steps=20)
    trainer.fit(module, regression_loader())
    after = _packed(module)
    assert all(torch.equal(before[n], after[n]) for n in before)
    first, last = sum(module.losses[1:4]) / 3, sum(module.losses[-3:]) / 3
    assert last < 0.8 * first, module.losses


def test_fit_tiny_llama_loss_goes_down(tiny_llama_config):
    module = CausalLMModule(tiny_llama_config)
    trainer = _trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=8, alpha=16, dropout=0.0))], max_steps=24)
    trainer.fit(module, token_loader())
    layer = module.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and is_quantized_linear(layer.base_layer)
    assert type(module.model.lm_head) is nn.Linear  # skipped by default
    assert module.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert sum(module.losses[-4:]) / 4 < sum(module.losses[:4]) / 4 - 0.3, module.losses


def test_generate_before_training_still_trains(tiny_llama_config):
    """The CPU generate()-before-training trap: gradients must reach every adapter afterwards."""
    module = CausalLMModule(tiny_llama_config)
    plugin = QLoRAPlugin(lora=LoRAConfig(r=4, dropout=0.0))
    plugin.convert_module(module)
    module.model.eval()
    with torch.no_grad():
        module.model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    module.model.train()
    for layer in module.model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.02)  # so lora_A gets gradient too
    ids = torch.randint(0, 128, (2, 8))
    module.model(input_ids=ids, labels=ids).loss.backward()
    adapters = [m for m in module.model.modules() if isinstance(m, LoRALinear)]
    assert adapters
    for layer in adapters:
        assert layer.lora_A.weight.grad is not None and layer.lora_A.weight.grad.abs().sum() > 0
        assert layer.lora_B.weight.grad.abs().sum() > 0


def test_lora_none_quantizes_and_freezes_only():
    module = RegressionModule()
    plugin = QLoRAPlugin(lora=None)
    plugin.convert_module(module)
    assert all(is_quantized_linear(m) for m in module.model if not isinstance(m, nn.ReLU))
    assert not any(p.requires_grad for p in module.parameters())


def test_quant_type_none_is_plain_bf16_lora_on_the_same_path():
    module = RegressionModule()
    trainer = _trainer(plugins=[QLoRAPlugin(quant=QuantConfig(quant_type="none"), lora=LoRAConfig(r=8))], max_steps=5)
    trainer.fit(module, regression_loader())
    layer = module.model[0]
    assert isinstance(layer, LoRALinear) and type(layer.base_layer) is nn.Linear
    assert layer.base_layer.weight.dtype == torch.bfloat16 and not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_fit_twice_does_not_requantize_or_reinject(quant_type):
    module = RegressionModule()
    plugin = QLoRAPlugin(quant=QuantConfig(quant_type=quant_type), lora=LoRAConfig(r=4))
    _trainer(plugins=[plugin], max_steps=2).fit(module, regression_loader())
    adapters = [id(m) for m in module.modules() if isinstance(m, LoRALinear)]
    _trainer(plugins=[plugin], max_steps=2).validate(module, regression_loader())
    _trainer(plugins=[plugin], max_steps=2).fit(module, regression_loader())
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    assert [id(m) for m in layers] == adapters
    # A second conversion must neither freeze nor down-cast the adapters.
    assert all(m.lora_A.weight.dtype == torch.float32 and m.lora_A.weight.requires_grad for m in layers)
    assert plugin.summary.trainable_params == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert len(plugin.summary.adapted) == len(layers)  # the first conversion's summary, not "LoRA on 0 layers"


def test_plugin_with_mixed_precision_flag_is_refused():
    with pytest.raises(ValueError, match=r"Received both `precision=16-mixed` and `plugins=.*QLoRAPlugin.*Choose one"):
        Trainer(accelerator="cpu", precision="16-mixed", plugins=[QLoRAPlugin()])


def test_plugin_with_another_precision_plugin_is_refused():
    with pytest.raises(MisconfigurationException, match=r"Received multiple values for Precision flags in `plugins`. Expected one value for each type at most"):
        Trainer(accelerator="cpu", plugins=[QLoRAPlugin(), MixedPrecision("bf16-mixed", "cpu")])


def test_target_modules_matching_nothing_fails_before_training():
    module = RegressionModule()
    trainer = _trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(target_modules=["q_proj"]))])
    with pytest.raises(ValueError, match=r"matched no nn.Linear in the model. Linear layers look like: '0', '2', '4'"):
        trainer.fit(module, regression_loader())
    assert module.losses == []


def test_model_without_linear_is_refused_at_setup():
    class NoLinear(RegressionModule):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(nn.Conv1d(1, 1, 1))

    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear layer"):
        _trainer(plugins=[QLoRAPlugin()]).fit(NoLinear(), regression_loader())


def test_plugin_arguments_are_type_checked():
    with pytest.raises(TypeError, match=r"must be a QuantConfig"):
        QLoRAPlugin(quant={"quant_type": "nf4"})
    with pytest.raises(TypeError, match=r"must be a LoRAConfig or None"):
        QLoRAPlugin(lora=16)


def test_compile_option_compiles_each_block_and_trains_like_eager(tiny_llama_config):
    # aot_eager: the real torch.compile graph capture (dynamo + AOT autograd) around bitsandbytes' ops, without
    # inductor's C++ build time on CI; inductor is what runs on CUDA (benchmarks/README.md).
    def fit(compile_setting):
        module = CausalLMModule(tiny_llama_config, lr=1e-2)
        torch.manual_seed(5)
        fast_trainer(max_steps=6, plugins=[QLoRAPlugin(compile=compile_setting)]).fit(module, token_loader())
        return module

    eager = fit(False)
    compiled = fit({"backend": "aot_eager"})
    layers = compiled.model.model.layers
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in layers)
    assert getattr(compiled.model.model.embed_tokens, "_compiled_call_impl", None) is None
    assert compiled.losses[-1] < compiled.losses[0]
    for e, c in zip(eager.losses, compiled.losses):
        assert abs(e - c) / e < 2e-2, (eager.losses, compiled.losses)
    with pytest.raises(TypeError, match="compile='yes'.*reduce-overhead"):
        QLoRAPlugin(compile="yes")
    assert QLoRAPlugin(compile="reduce-overhead").compile == {"mode": "reduce-overhead"}


def test_tied_embeddings_count_once_in_the_summary(tiny_llama_config):
    tiny_llama_config.tie_word_embeddings = True
    module = CausalLMModule(tiny_llama_config)
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    before = sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32"), lora=LoRAConfig(r=4))
    plugin.convert_module(module)
    assert plugin.summary.total_params == before + plugin.summary.trainable_params


def test_compiled_blocks_are_not_recompiled_per_layer():
    # transformers builds a KV cache in every forward unless told otherwise; each block updating its own cache layer
    # made the compiled block recompile once per layer (then fall back to eager), seen on a 7B model on the H200.
    import torch._dynamo
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    QLoRAPlugin(compile={"backend": "aot_eager"}).convert_module(model)
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert not model.config.use_cache
    # One graph for the first block (its input needs no grad: the embeddings are frozen), one for all the others.
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert model.generation_config.use_cache  # generate() keeps its cache
