"""GPTQ-calibrated NF4/FP4 rounding: the real bitsandbytes packs exactly the chosen codes, and they beat rounding to
nearest on the layers' outputs."""

from __future__ import annotations

import logging
import os

import bitsandbytes as bnb
import pytest
import torch
from helpers import TokenDataModule, TokenIdsModule, fast_trainer, token_loader
from torch import nn

from lightning_qlora import QLoRAPlugin, QuantConfig
from lightning_qlora.calibration import CalibrationError, calibrated_weights, gptq_round
from lightning_qlora.config import ConfigError
from lightning_qlora.lora.peft_format import load_adapter, read_adapter_metadata, save_adapter
from lightning_qlora.modules import iter_linears
from lightning_qlora.quant import dequantize_weight, packed_bytes, quantize_model


def _correlated_inputs(features: int, tokens: int = 4096, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, as in transformer layers."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) / features**0.5
    scales = torch.ones(features)
    scales[:: features // 8] = 6.0
    return (torch.randn(tokens, features, generator=generator) @ mixing) * scales


def _nearest(weight: torch.Tensor, quant_type: str, double_quant: bool = False) -> torch.Tensor:
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    return bnb.functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_identity_statistics_give_bitsandbytes_round_to_nearest(quant_type):
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    rounded = gptq_round(weight, torch.eye(256), quant_type, blocksize=64, damping=0.0)
    assert torch.equal(rounded, _nearest(weight, quant_type))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_calibrated_codes_pack_exactly_and_lower_the_output_error(quant_type):
    weight = torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    x = _correlated_inputs(256)
    rounded = gptq_round(weight, x.T @ x / len(x), quant_type, blocksize=64)

    # bitsandbytes recomputes the absmax and codes from the rounded weight and lands on the same values...
    assert torch.equal(_nearest(rounded, quant_type), rounded)
    # ...and with double quantization the packed codes are the same bytes (only the absmax is stored in 8 bits).
    plain, _ = bnb.functional.quantize_4bit(rounded, blocksize=64, quant_type=quant_type, compress_statistics=False)
    nested, _ = bnb.functional.quantize_4bit(rounded, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(plain, nested)

    def output_error(approx):
        return float(((x @ (weight - approx).T) ** 2).mean())

    nearest_error, calibrated_error = output_error(_nearest(weight, quant_type)), output_error(rounded)
    assert calibrated_error < 0.8 * nearest_error, (calibrated_error, nearest_error)
    # The weights themselves move further from the originals: the gain is on outputs, not on weight error.
    assert float((weight - rounded).pow(2).mean()) > float((weight - _nearest(weight, quant_type)).pow(2).mean())


def test_rows_not_divisible_into_blocks_are_refused():
    with pytest.raises(CalibrationError, match="multiple of blocksize"):
        gptq_round(torch.randn(4, 96), torch.eye(96), blocksize=64)


def _llama_batches(config, count: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, config.vocab_size, (4, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[0, length // 2 :] = 0  # padding is left out of the statistics
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**b).logits.float() for b in batches])


def test_calibrated_model_is_closer_to_full_precision_than_round_to_nearest(tiny_llama, tiny_llama_config):
    import copy

    batches = _llama_batches(tiny_llama_config)
    reference = _logits(tiny_llama, batches)
    before = {name: m.weight.detach().clone() for name, m in iter_linears(tiny_llama)}
    config = QuantConfig(compute_dtype="fp32")

    rounded, report = calibrated_weights(tiny_llama, batches, config=config)

    block_linears = {name for name, _ in iter_linears(tiny_llama) if name.startswith("model.layers.")}
    assert set(rounded) == block_linears and report.layers == len(block_linears) == 14
    assert report.nearest == 0  # lm_head is skipped, nothing else lies outside the blocks
    assert all(torch.equal(m.weight, before[name]) for name, m in iter_linears(tiny_llama)), "model changed"
    assert tiny_llama.training is False

    nearest_model, calibrated_model = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    nearest_report = quantize_model(nearest_model, config)
    calibrated_report = quantize_model(calibrated_model, config, rounded=rounded)
    # Same base fingerprint (the pretrained weights), same storage, other codes.
    assert calibrated_report.weights_sha256 == nearest_report.weights_sha256
    # (bitsandbytes' serialized state writes the nested offset as text: its length may differ by a digit or two)
    assert abs(calibrated_report.bytes_after - nearest_report.bytes_after) <= 14 * 4
    layer = "model.layers.0.mlp.down_proj"
    assert torch.allclose(dequantize_weight(dict(calibrated_model.named_modules())[layer]).float(), rounded[layer], atol=2e-3)

    def error(model):
        return float((_logits(model, batches) - reference).pow(2).mean())

    assert error(calibrated_model) < 0.8 * error(nearest_model), (error(calibrated_model), error(nearest_model))


def test_calibration_refuses_meta_models_and_empty_data(tiny_llama_config, tiny_llama):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(tiny_llama_config)
    with pytest.raises(CalibrationError, match="meta device"):
        calibrated_weights(meta, _llama_batches(tiny_llama_config))
    with pytest.raises(CalibrationError, match="no batches"):
        calibrated_weights(tiny_llama, [])
    with pytest.raises(CalibrationError, match="no transformer blocks"):
        calibrated_weights(nn.Sequential(nn.Linear(64, 64)), [torch.randn(2, 64)])


def test_config_validates_calibration():
    with pytest.raises(ConfigError, match="calibration='awq'"):
        QuantConfig(calibration="awq")
    with pytest.raises(ConfigError, match="needs a 4-bit quant_type"):
        QuantConfig(quant_type="none", calibration="gptq")
    with pytest.raises(ConfigError, match="calibration_samples"):
        QuantConfig(calibration_samples=0)



def _calibrating_trainer(tmp_path, samples: int = 24, **overrides):
    plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32", calibration="gptq", calibration_samples=samples))
    return fast_trainer(plugins=[plugin], strategy="qlora", default_root_dir=tmp_path, **overrides), plugin


def test_strategy_calibrates_on_the_first_training_rows_deterministically(tmp_path, tiny_llama_config, caplog):
    trainer, plugin = _calibrating_trainer(tmp_path, max_steps=3)
    module = TokenIdsModule(tiny_llama_config)
    full_precision = TokenIdsModule(tiny_llama_config).model  # same seed: the same pretrained weights
    trainer.fit(module, datamodule=TokenDataModule())
    assert len(module.losses) == 3 and all(torch.isfinite(torch.tensor(module.losses)))

    # The codes are exactly GPTQ's on the first 24 rows (3 batches of 8) in dataset order, whatever the shuffling.
    loader = token_loader(batch_size=8)
    rows = [loader.dataset[i][0] for i in range(24)]
    batches = [torch.stack(rows[i : i + 8]) for i in range(0, 24, 8)]
    expected, _ = calibrated_weights(full_precision, batches, forward=lambda ids: full_precision(input_ids=ids),
                                     config=plugin.quant)
    trained = dict(module.model.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        holder = nn.Module()
        holder.layer = nn.Linear(expected[name].shape[1], expected[name].shape[0], bias=False)
        quantize_model(holder, QuantConfig(compute_dtype="fp32", skip_modules=()), rounded={"layer": expected[name]})
        assert torch.equal(packed_bytes(trained[name].base_layer), packed_bytes(holder.layer)), name

    # The adapter records the calibration; loading it onto a base rounded to nearest says so.
    save_adapter(module, tmp_path / "adapter")
    assert read_adapter_metadata(tmp_path / "adapter")["quantization"]["calibration"] == "gptq"
    plain = TokenIdsModule(tiny_llama_config)
    with caplog.at_level(logging.WARNING, logger="lightning_qlora.lora.peft_format"):
        load_adapter(plain, tmp_path / "adapter", quant=QuantConfig(compute_dtype="fp32"))
    assert "calibration='gptq'" in caplog.text


def test_calibration_needs_a_datamodule_and_one_device(tmp_path, tiny_llama_config):
    trainer, _ = _calibrating_trainer(tmp_path)
    with pytest.raises(CalibrationError, match="LightningDataModule"):
        trainer.fit(TokenIdsModule(tiny_llama_config), train_dataloaders=token_loader())

    # Refused when the strategy connects the model, before DDP starts a process group. Lightning's DDP set-up writes
    # rank and port variables into this process's environment: put it back, or a later DDP test's processes would
    # believe they were launched externally and wait for ranks that never come.
    saved = dict(os.environ)
    try:
        plugin = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp32", calibration="gptq"))
        ddp = fast_trainer(plugins=[plugin], strategy="qlora_ddp", default_root_dir=tmp_path)
        with pytest.raises(CalibrationError, match="strategy='qlora_ddp' is not supported"):
            ddp.fit(TokenIdsModule(tiny_llama_config), datamodule=TokenDataModule())
        assert not torch.distributed.is_initialized()
    finally:
        os.environ.clear()
        os.environ.update(saved)

    plugin = QLoRAPlugin(quant=QuantConfig(calibration="gptq"))
    with pytest.raises(CalibrationError, match="no calibration ran"):
        plugin.convert_module(TokenIdsModule(tiny_llama_config))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrated_codes_pack_exactly_with_the_cuda_kernels(tiny_llama, tiny_llama_config):
    """bitsandbytes' CUDA quantize kernel re-derives the calibrated codes too, and the calibrated model beats
    round-to-nearest there as well."""
    import copy

    model = tiny_llama.cuda()
    batches = [{k: v.cuda() for k, v in b.items()} for b in _llama_batches(tiny_llama_config)]
    reference = _logits(model, batches)
    config = QuantConfig(compute_dtype="fp32")
    rounded, _ = calibrated_weights(model, batches, config=config)
    weight = rounded["model.layers.1.mlp.down_proj"]
    assert weight.is_cuda
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), weight)
    nearest_model, calibrated_model = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(nearest_model, config, device="cuda")
    quantize_model(calibrated_model, config, device="cuda", rounded=rounded)

    def error(m):
        return float((_logits(m, batches) - reference).pow(2).mean())

    assert error(calibrated_model) < 0.8 * error(nearest_model)


def test_singular_statistics_get_more_damping_or_a_clear_error():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(4))
    x[:, 1] = x[:, 0]  # two identical input channels: X^T X is singular
    x[:, 2] = -x[:, 0]
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    with pytest.raises(CalibrationError, match="stay singular"):
        gptq_round(weight, x.T @ x / len(x), damping=0.0)
    rounded = gptq_round(weight, x.T @ x / len(x), damping=1e-7)  # retried with 10x, 100x, 1000x more
    assert torch.equal(_nearest(rounded, "nf4"), rounded)
