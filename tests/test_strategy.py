import pytest
import torch
from helpers import CausalLMModule, RegressionModule, fast_trainer, regression_loader, token_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_qlora import LoRAConfig, LoRALinear, QLoRAPlugin, QLoRAStrategy
from lightning_qlora.quant import is_quantized_linear


def _trainer(**kwargs):
    return fast_trainer(**({"max_steps": 6} | kwargs))


def test_strategy_by_name_uses_default_plugin():
    module = RegressionModule()
    trainer = _trainer(strategy="qlora")
    assert isinstance(trainer.strategy, QLoRAStrategy)
    trainer.fit(module, regression_loader())
    plugin = trainer.strategy.precision_plugin
    assert isinstance(plugin, QLoRAPlugin) and plugin.lora.r == 16 and plugin.quant.quant_type == "nf4"
    assert all(isinstance(m, LoRALinear) and is_quantized_linear(m.base_layer) for m in module.model[::2])


def test_strategy_with_a_non_qlora_precision_is_refused():
    trainer = _trainer(strategy="qlora", precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"strategy='qlora' needs the QLoRAPlugin precision plugin, but got MixedPrecision.*bf16-mixed"):
        trainer.fit(RegressionModule(), regression_loader())


def test_strategy_refuses_several_devices():
    trainer = _trainer(strategy="qlora", devices=2)
    with pytest.raises(ValueError, match=r"trains on one device, but devices=2"):
        trainer.fit(RegressionModule(), regression_loader())


def test_checkpoint_holds_adapters_only_and_resumes(tmp_path, tiny_llama_config):
    module = CausalLMModule(tiny_llama_config)
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    plugin = QLoRAPlugin(lora=LoRAConfig(r=4, dropout=0.0))
    _trainer(strategy="qlora", plugins=[plugin], callbacks=[ckpt], enable_checkpointing=True).fit(
        module, token_loader()
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    keys = set(saved["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(keys) == 2 * 2 * 7
    assert (tmp_path / "last.ckpt").stat().st_size < base_bytes / 2
    assert saved["global_step"] == 6 and saved["optimizer_states"]

    resumed = CausalLMModule(tiny_llama_config)
    trainer = _trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=4, dropout=0.0))], max_steps=8)
    trainer.fit(resumed, token_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 8
    assert len(resumed.losses) == 2  # only the two steps after the resume point ran


def test_configure_model_on_meta_device_is_materialized_layer_by_layer():
    class MetaModule(RegressionModule):
        def __init__(self):
            super().__init__()
            self.model = None

        def configure_model(self):
            if self.model is not None:
                return
            with torch.device("meta"):
                self.model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 1))

    module = MetaModule()
    trainer = _trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], max_steps=3)
    trainer.fit(module, regression_loader())
    assert not any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))
    assert is_quantized_linear(module.model[0].base_layer)
    assert torch.isfinite(torch.tensor(module.losses)).all()


class _RecordDevices(Callback):
    """Where the 4-bit base and the adapters live while training (Lightning moves the model back to the CPU after)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer = pl_module.model.model.layers[0].mlp.up_proj
        self.devices = {layer.base_layer.weight.device.type, layer.lora_A.weight.device.type, batch[0].device.type}


@pytest.mark.gpu
def test_strategy_quantizes_on_cuda_and_trains(tiny_llama_config, monkeypatch):
    import lightning_qlora.quant.quantize as quantize

    packed_on = set()
    original = quantize.quantized_linear

    def spy(linear, weight, config, device):
        packed_on.add((weight.device.type, device.type))
        return original(linear, weight, config, device)

    monkeypatch.setattr(quantize, "quantized_linear", spy)
    module = CausalLMModule(tiny_llama_config)
    record = _RecordDevices()
    plugin = QLoRAPlugin(lora=LoRAConfig(r=8, alpha=16, dropout=0.0))
    trainer = _trainer(strategy="qlora", accelerator="cuda", devices=1, max_steps=24, plugins=[plugin], callbacks=[record])
    trainer.fit(module, token_loader())
    assert packed_on == {("cuda", "cuda")}  # each weight moved to the GPU and quantized there, layer by layer
    assert record.devices == {"cuda"}
    assert sum(module.losses[-4:]) / 4 < sum(module.losses[:4]) / 4 - 0.3, module.losses


@pytest.mark.gpu
def test_plugin_on_cuda_with_default_strategy(tiny_llama_config):
    module = CausalLMModule(tiny_llama_config)
    record = _RecordDevices()
    trainer = _trainer(accelerator="cuda", devices=1, max_steps=10, plugins=[QLoRAPlugin(lora=LoRAConfig(r=8))],
                       callbacks=[record])
    trainer.fit(module, token_loader())
    assert record.devices == {"cuda"}


@pytest.fixture
def trained_checkpoint(tmp_path, tiny_llama_config):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    plugin = QLoRAPlugin(lora=LoRAConfig(r=4, alpha=8, dropout=0.0))
    _trainer(strategy="qlora", plugins=[plugin], callbacks=[ckpt], enable_checkpointing=True).fit(
        CausalLMModule(tiny_llama_config), token_loader()
    )
    return tmp_path / "last.ckpt"


@pytest.mark.parametrize(
    ("quant", "lora", "expected"),
    [
        (dict(quant_type="fp4"), {}, r"quant_type: 'nf4' in .*'fp4' now"),
        (dict(quant_type="none"), {}, r"quant_type: 'nf4' in .*'none' now"),
        (dict(double_quant=False), {}, r"double_quant: True in .*False now"),
        (dict(blocksize=128), {}, r"blocksize: 64 in .*128 now"),
        ({}, dict(alpha=16), r"alpha: 8.0 in .*16.0 now"),
        ({}, dict(use_rslora=True), r"use_rslora: False in .*True now"),
    ],
    ids=["fp4", "none", "no-double-quant", "blocksize", "alpha", "rslora"],
)
def test_resuming_with_settings_that_change_the_model_is_refused(trained_checkpoint, tiny_llama_config, quant, lora,
                                                                  expected):
    from lightning_qlora import QuantConfig
    from lightning_qlora.lightning.plugin import ResumeMismatchError

    plugin = QLoRAPlugin(quant=QuantConfig(**quant), lora=LoRAConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, **lora}))
    trainer = _trainer(strategy="qlora", plugins=[plugin], max_steps=8)
    with pytest.raises(ResumeMismatchError, match=expected + r".*resume_mismatch='warn'"):
        trainer.fit(CausalLMModule(tiny_llama_config), token_loader(), ckpt_path=str(trained_checkpoint))


def test_resuming_onto_another_base_of_the_same_shapes_is_refused_unless_asked(trained_checkpoint, tiny_llama_config):
    from lightning_qlora.lightning.plugin import ResumeMismatchError

    class OtherBase(CausalLMModule):
        def __init__(self, config):
            super().__init__(config)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.mul_(1.5)

    lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    with pytest.raises(ResumeMismatchError, match=r"base_weights_sha256"):
        _trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=lora)], max_steps=8).fit(
            OtherBase(tiny_llama_config), token_loader(), ckpt_path=str(trained_checkpoint))
    trainer = _trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=lora, resume_mismatch="warn")], max_steps=8)
    with pytest.warns(UserWarning, match=r"base_weights_sha256"):
        trainer.fit(OtherBase(tiny_llama_config), token_loader(), ckpt_path=str(trained_checkpoint))
    assert trainer.global_step == 8
