"""The conversion recipe (lightning_qlora.convert): block by block, calibration as a value, plain torch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, calibrate, convert_model, iter_converted_blocks
from lightning_qlora.convert import cast_floating
from lightning_qlora.lora import LoRALinear, inject_lora, iter_lora_layers, mark_only_lora_as_trainable
from lightning_qlora.modules import iter_linears
from lightning_qlora.quant import is_quantized_linear, quantize_model
from lightning_qlora.quant.fingerprint import WEIGHTS_HASH_ATTR


def _ids(vocab: int = 128, rows: int = 4, length: int = 12, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_blocks_come_one_by_one_then_the_root_with_the_summary(tiny_llama):
    seen = []
    for piece in iter_converted_blocks(tiny_llama, QuantConfig(), LoRAConfig(r=4)):
        still_plain = [n for n, m in iter_linears(tiny_llama) if not is_quantized_linear(m) and "lm_head" not in n]
        seen.append((piece.name, len(piece.quantized), len(piece.adapted), len(still_plain), piece.summary is not None))
    # Block 0 is finished (7 linears quantized and adapted) while block 1's 7 are still full precision.
    assert seen == [
        ("model.layers.0", 7, 7, 7, False),
        ("model.layers.1", 7, 7, 0, False),
        ("", 0, 0, 0, True),
    ]


def test_the_recipe_computes_what_the_building_blocks_compute(tiny_llama):
    quant, lora = QuantConfig(), LoRAConfig(r=4, dropout=0.0)
    by_hand = copy.deepcopy(tiny_llama)
    torch.manual_seed(3)
    quantize_model(by_hand, quant)
    cast_floating(by_hand, quant.torch_compute_dtype)
    inject_lora(by_hand, lora, skip_modules=quant.skip_modules)
    mark_only_lora_as_trainable(by_hand)
    torch.manual_seed(3)
    summary = convert_model(tiny_llama, quant, lora)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, by_hand(ids).logits, atol=0, rtol=0)
    assert summary.adapted == [n for n, _ in iter_lora_layers(by_hand)]
    assert summary.trainable_params == sum(p.numel() for p in by_hand.parameters() if p.requires_grad)
    assert getattr(tiny_llama, WEIGHTS_HASH_ATTR) == getattr(by_hand, WEIGHTS_HASH_ATTR)
    # Frozen base in the compute dtype, adapters in fp32 and trainable.
    for name, param in tiny_llama.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.dtype == torch.float32, name
        else:
            assert not param.requires_grad, name


def test_calibration_comes_in_as_a_value(tiny_llama):
    quant, lora = QuantConfig(), LoRAConfig(r=4, dropout=0.0, init_lora_weights="cloq")
    batches = [_ids(seed=s) for s in range(3)]
    result = calibrate(tiny_llama, batches, quant, lora, forward=lambda ids: tiny_llama(input_ids=ids))
    assert result.method == "none" and not result.rounded  # no GPTQ asked for: only the adapter factors
    assert len(result.adapter_init) == 14
    plain = copy.deepcopy(tiny_llama)
    summary = convert_model(tiny_llama, quant, lora, calibration=result)
    convert_model(plain, quant, lora)
    assert sorted(summary.initialized) == sorted(result.adapter_init)
    layer = tiny_llama.get_submodule("model.layers.1.mlp.down_proj")
    lora_a, lora_b = result.adapter_init["model.layers.1.mlp.down_proj"]
    torch.testing.assert_close(layer.lora_A.weight, lora_a, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_B.weight, lora_b, atol=0, rtol=0)
    assert float(plain.get_submodule("model.layers.1.mlp.down_proj").lora_B.weight.detach().abs().sum()) == 0.0


def test_error_correcting_init_brings_the_quantized_model_closer_to_full_precision(tiny_llama):
    quant, lora = QuantConfig(), LoRAConfig(r=8, dropout=0.0, init_lora_weights="cloq")
    ids = _ids(rows=8, seed=9)
    with torch.no_grad():
        exact = tiny_llama(ids).logits
    corrected, zero = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    result = calibrate(corrected, [ids], quant, lora, forward=lambda x: corrected(input_ids=x))
    convert_model(corrected, quant, lora, calibration=result)
    convert_model(zero, quant, lora)
    with torch.no_grad():
        error_corrected = (corrected(ids).logits - exact).norm()
        error_zero = (zero(ids).logits - exact).norm()
    assert error_corrected < 0.9 * error_zero, (float(error_corrected), float(error_zero))


def test_a_meta_model_is_materialized_layer_by_layer_on_the_device(tiny_llama_config):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config)
    summary = convert_model(model, QuantConfig(), LoRAConfig(r=4), device="cpu")
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert len(summary.quantization.quantized) == 14 and len(summary.adapted) == 14
    loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_bad_targets_are_refused_before_anything_is_converted(tiny_llama):
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*'model.layers.0.self_attn.q_proj'"):
        convert_model(tiny_llama, QuantConfig(), LoRAConfig(target_modules=["nope"]))
    assert not any(is_quantized_linear(m) for _, m in iter_linears(tiny_llama))
    assert not hasattr(tiny_llama, WEIGHTS_HASH_ATTR)


def test_converting_twice_changes_nothing(tiny_llama):
    convert_model(tiny_llama, QuantConfig(), LoRAConfig(r=4))
    packed = {n: m.weight.data.clone() for n, m in iter_linears(tiny_llama) if is_quantized_linear(m)}
    again = convert_model(tiny_llama, QuantConfig(), LoRAConfig(r=4))
    assert not again.changed_anything and not again.adapted and not again.quantization.quantized
    assert all(torch.equal(m.weight.data, packed[n]) for n, m in iter_linears(tiny_llama) if n in packed)


def test_a_model_without_blocks_is_converted_as_its_root():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    pieces = list(iter_converted_blocks(model, QuantConfig(skip_modules=()), LoRAConfig(r=2)))
    assert [p.name for p in pieces] == [""]
    assert pieces[0].adapted == ["0", "2"] and isinstance(model[0], LoRALinear)


def test_the_plugin_keeps_no_state_between_calls():
    # What a conversion needs comes in as arguments (device, calibration); the plugin holds only its settings and
    # what it reports (the summary, the memory plan), never values parked for a later call to find.
    plugin = QLoRAPlugin()
    assert set(vars(plugin)) == {
        "quant", "lora", "compile", "resume_mismatch", "strict", "precision", "dtype", "summary", "adapters_from_checkpoint",
        "memory_budget_gib", "max_batch_tokens", "memory_plan",
    }


@pytest.mark.parametrize("gptq", [False, True], ids=["cloq", "gptq+cloq"])
def test_calibrating_block_by_block_while_converting_equals_calibrating_first(tiny_llama, gptq):
    from lightning_qlora.calibration import CalibrationData

    quant = QuantConfig(calibration="gptq" if gptq else "none")
    lora = LoRAConfig(r=4, dropout=0.0, init_lora_weights="cloq")
    batches = [_ids(seed=s) for s in range(3)]
    first = copy.deepcopy(tiny_llama)
    result = calibrate(first, batches, quant, lora, forward=lambda ids: first(input_ids=ids))
    torch.manual_seed(1)
    convert_model(first, quant, lora, calibration=result)
    data = CalibrationData(batches, lambda ids: tiny_llama(input_ids=ids), gptq=gptq, adapter_init=True)
    torch.manual_seed(1)
    summary = None
    for piece in iter_converted_blocks(tiny_llama, quant, lora, calibrate_on=data):
        summary = piece.summary
    assert summary.calibration is not None and len(summary.initialized) == 14
    assert summary.calibration.layers == (14 if gptq else 0)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(_ids()).logits, first(_ids()).logits, atol=0, rtol=0)


def test_calibrating_a_random_meta_model_is_refused(tiny_llama_config):
    from transformers import LlamaForCausalLM

    from lightning_qlora.calibration import CalibrationData, CalibrationError

    with torch.device("meta"):
        model = LlamaForCausalLM(tiny_llama_config)
    data = CalibrationData([_ids()], lambda ids: model(input_ids=ids), adapter_init=True)
    lora = LoRAConfig(r=4, init_lora_weights="cloq")
    with pytest.raises(CalibrationError, match=r"built on the meta device without a checkpoint.*stream_pretrained"):
        list(iter_converted_blocks(model, QuantConfig(), lora, calibrate_on=data))


def test_the_progress_bar_shows_for_a_conversion_and_not_for_a_model_converted_before(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config)  # 8 blocks: the smallest model that gets a bar
    convert_model(model, QuantConfig(), LoRAConfig(r=2))
    assert "Converting to nf4" in capsys.readouterr().err
    convert_model(model, QuantConfig(), LoRAConfig(r=2))  # what the app's evaluation does: nothing is converted
    assert "Converting to nf4" not in capsys.readouterr().err
