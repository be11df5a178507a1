"""Error-correcting adapter initialization (init_lora_weights="cloq"): the closed form is the optimum, the real
4-bit base is what it corrects, and the strategy starts training from a model closer to full precision."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TokenDataModule, TokenIdsModule, fast_trainer, token_loader
from lightning.pytorch import Callback
from torch import nn

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig
from lightning_qlora.calibration import calibrated_weights
from lightning_qlora.calibration.cloq import ErrorCorrectingInit, error_correcting_factors
from lightning_qlora.config import ConfigError
from lightning_qlora.lora import LoRALinear, inject_lora, iter_lora_layers
from lightning_qlora.quant import dequantize_weight, quantize_model, stored_weight


def _correlated_inputs(features: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scales = torch.ones(features)
    scales[:: features // 8] = 8.0  # a few large channels, as in transformer activations
    return (torch.randn(tokens, features, generator=generator) @ mixing) * scales


def _output_error(weight, stored, delta, x) -> float:
    return float(((weight - stored - delta) @ x.T).pow(2).sum())


def test_factors_are_the_optimal_rank_r_output_correction():
    torch.manual_seed(0)
    weight = torch.randn(96, 128)
    x = _correlated_inputs(128)
    hessian = x.T @ x / x.shape[0]
    stored = stored_weight(weight, QuantConfig(compute_dtype="fp32"))
    rank, scaling = 8, 2.0

    a, b = error_correcting_factors(weight, stored, hessian, rank, scaling, damping=0.0)

    assert a.shape == (rank, 128) and b.shape == (96, rank) and a.dtype == b.dtype == torch.float32
    delta = scaling * b @ a
    # The optimum leaves exactly the singular values of (W - W_q) H^(1/2) beyond the first r.
    values, vectors = torch.linalg.eigh(hessian.double())
    root = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
    tail = torch.linalg.svdvals((weight - stored).double() @ root)[rank:].pow(2).sum() * x.shape[0]
    assert _output_error(weight, stored, delta, x) == pytest.approx(float(tail), rel=1e-3)
    # ... which beats both no correction and the plain SVD of the weight error (LoftQ's one-iteration init).
    u, s, vh = torch.linalg.svd(weight - stored)
    plain_svd = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert _output_error(weight, stored, delta, x) < 0.9 * _output_error(weight, stored, plain_svd, x)
    assert _output_error(weight, stored, plain_svd, x) < _output_error(weight, stored, torch.zeros_like(weight), x)


def test_without_statistics_the_factors_are_the_plain_svd_and_extra_ranks_stay_zero():
    torch.manual_seed(1)
    weight, stored = torch.randn(6, 64), torch.randn(6, 64)
    a, b = error_correcting_factors(weight, stored, torch.zeros(64, 64), rank=8, scaling=0.5)
    assert torch.allclose(0.5 * b @ a, weight - stored, atol=1e-4)  # rank 6 = full rank: exact
    assert torch.equal(b[:, 6:], torch.zeros(6, 2)) and a[6:].abs().sum() > 0  # Kaiming rows: B still learns


def test_stored_weight_is_bit_identical_to_the_quantized_layer():
    torch.manual_seed(2)
    for quant in (QuantConfig(), QuantConfig(quant_type="fp4", double_quant=False, compute_dtype="fp32")):
        model = nn.Sequential(nn.Linear(128, 64))
        weight = model[0].weight.detach().clone()
        quantize_model(model, QuantConfig(**{**quant.to_dict(), "skip_modules": ()}), progress=False)
        assert torch.equal(stored_weight(weight, quant), dequantize_weight(model[0]).float())


def test_dora_magnitude_is_reset_so_the_layer_computes_base_plus_update():
    torch.manual_seed(3)
    base = nn.Linear(64, 32)
    quantize_model(holder := nn.Sequential(base), QuantConfig(compute_dtype="fp32", skip_modules=()), progress=False)
    layer = LoRALinear(holder[0], r=4, lora_alpha=8, use_dora=True)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(32, 4) * 0.1
    layer.initialize_adapter(a, b)
    layer.eval()
    x = torch.randn(5, 64)
    expected = x @ (dequantize_weight(holder[0]).float() + 2.0 * b @ a).T + holder[0].bias
    assert torch.allclose(layer(x), expected, atol=1e-4)


def test_config_validates_the_init():
    with pytest.raises(ConfigError, match="init_lora_weights='pissa'"):
        LoRAConfig(init_lora_weights="pissa")
    # Nothing to correct on a base kept in bf16: no calibration, the default init (the bf16 LoRA baseline of the app).
    plugin = QLoRAPlugin(quant=QuantConfig(quant_type="none"), lora=LoRAConfig(init_lora_weights="cloq"))
    assert not plugin.needs_calibration
    model = plugin.convert_module(nn.Sequential(nn.Linear(64, 64)))
    assert torch.count_nonzero(model[0].lora_B.weight) == 0
    assert plugin.describe_calibration() == ""
    assert QLoRAPlugin(lora=LoRAConfig(init_lora_weights="cloq")).needs_calibration


def _llama_batches(config, count: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(0, config.vocab_size, (4, length), generator=generator)} for _ in range(count)]


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits.float() for b in batches])


def test_initialized_model_is_closer_to_full_precision_with_either_rounding(tiny_llama, tiny_llama_config):
    batches = _llama_batches(tiny_llama_config)
    reference = _logits(tiny_llama.eval(), batches)
    quant, lora = QuantConfig(compute_dtype="fp32"), LoRAConfig(r=8, dropout=0.0)

    def error(rounding: str, cloq: bool) -> float:
        model = copy.deepcopy(tiny_llama)
        init = ErrorCorrectingInit(quant, lora)
        rounded, _ = calibrated_weights(model, batches, config=quant, rounding=rounding, on_layer=init)
        assert (rounding == "nearest") == (not rounded) and len(init.factors) == 14  # every block linear
        quantize_model(model, quant, rounded=rounded, progress=False)
        inject_lora(model, lora, skip_modules=quant.skip_modules)
        if cloq:
            assert len(init.apply(model)) == 14
        else:
            assert all(torch.count_nonzero(layer.lora_B.weight) == 0 for _, layer in iter_lora_layers(model))
        return float((_logits(model.eval(), batches) - reference).pow(2).mean())

    nearest, nearest_cloq = error("nearest", False), error("nearest", True)
    gptq, gptq_cloq = error("gptq", False), error("gptq", True)
    assert nearest_cloq < 0.8 * nearest, (nearest_cloq, nearest)
    assert gptq_cloq < 0.8 * gptq, (gptq_cloq, gptq)



class _AdapterSnapshot(Callback):
    """The adapters as set-up left them, before the first optimizer step."""

    def __init__(self) -> None:
        self.starts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        for name, layer in iter_lora_layers(pl_module.model):
            self.starts[name] = (layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone())


def test_strategy_initializes_the_adapters_and_both_factors_train(tmp_path, tiny_llama_config):
    lora = LoRAConfig(r=4, init_lora_weights="cloq")
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32", calibration_samples=16), lora=lora)
    snapshot = _AdapterSnapshot()
    trainer = fast_trainer(plugins=[plugin], strategy="qlora", default_root_dir=tmp_path, max_steps=2,
                           callbacks=[snapshot])
    module = TokenIdsModule(tiny_llama_config)
    full_precision = TokenIdsModule(tiny_llama_config).model  # same seed: the same pretrained weights
    trainer.fit(module, datamodule=TokenDataModule())

    # Set-up started from exactly the factors of the first 16 training rows (2 batches of 8), on the real base.
    loader = token_loader(batch_size=8)
    rows = [loader.dataset[i][0] for i in range(16)]
    expected = ErrorCorrectingInit(plugin.quant, lora)
    calibrated_weights(full_precision, [torch.stack(rows[:8]), torch.stack(rows[8:])],
                       forward=lambda ids: full_precision(input_ids=ids), config=plugin.quant, rounding="nearest",
                       on_layer=expected)
    assert len(snapshot.starts) == 14
    name = "model.layers.1.mlp.down_proj"
    assert torch.allclose(snapshot.starts[name][0], expected.factors[name][0], atol=1e-5)
    assert torch.allclose(snapshot.starts[name][1], expected.factors[name][1], atol=1e-5)
    assert torch.count_nonzero(snapshot.starts[name][1]) > 0
    # Training moved both factors of every adapter (nonzero B: A gets gradients from the first step).
    for layer_name, layer in iter_lora_layers(module.model):
        a0, b0 = snapshot.starts[layer_name]
        assert not torch.equal(layer.lora_A.weight, a0) and not torch.equal(layer.lora_B.weight, b0), layer_name
    assert all(torch.isfinite(torch.tensor(module.losses)))


def test_a_resumed_fit_can_skip_the_init_its_checkpoint_overwrites(tmp_path, tiny_llama_config, monkeypatch):
    def trainer(steps, snapshot=None):
        plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32", calibration_samples=16),
                             lora=LoRAConfig(r=4, init_lora_weights="cloq"))
        callbacks = [snapshot] if snapshot else []
        return fast_trainer(plugins=[plugin], strategy="qlora", default_root_dir=tmp_path, max_steps=steps,
                            callbacks=callbacks), plugin

    first, _ = trainer(2)
    first.fit(TokenIdsModule(tiny_llama_config), datamodule=TokenDataModule())
    first.save_checkpoint(tmp_path / "step2.ckpt")
    saved = {name: layer.lora_B.weight.detach().clone() for name, layer in iter_lora_layers(first.lightning_module.model)}

    calls = []
    monkeypatch.setattr(QLoRAPlugin, "calibrate", lambda self, *a, **k: calls.append(1))
    snapshot = _AdapterSnapshot()
    resumed, plugin = trainer(3, snapshot)
    plugin.restore_adapters_from_checkpoint()
    resumed.fit(TokenIdsModule(tiny_llama_config), datamodule=TokenDataModule(), ckpt_path=tmp_path / "step2.ckpt")
    assert calls == []  # no calibration pass: the checkpoint restored the adapters
    assert resumed.global_step == 3
    assert all(torch.equal(snapshot.starts[name][1], b) for name, b in saved.items())
    assert plugin.needs_calibration  # the skip lasted one conversion: a fresh fit would compute the init again


def test_an_already_quantized_model_gets_the_default_init_and_a_warning():
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_model(model, QuantConfig(skip_modules=()), progress=False)
    plugin = QLoRAPlugin(lora=LoRAConfig(r=4, init_lora_weights="cloq"))
    with pytest.warns(UserWarning, match="already 4-bit"):
        plugin.convert_module(model)
    assert torch.count_nonzero(model[0].lora_B.weight) == 0
