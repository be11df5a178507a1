import pytest
import torch
from torch import nn

from lightning_qlora import QuantConfig, quantize_model
from lightning_qlora.quant import dequantize_weight, is_quantized_linear, packed_bytes, quantized_nbytes


def _state_dict_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_on_gaussian_weights(double_quant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    weight = model[0].weight.data.normal_(0, 1).clone()
    quantize_model(model, QuantConfig(quant_type="nf4", double_quant=double_quant, skip_modules=()))
    error = (dequantize_weight(model[0]).float() - weight).abs().mean().item()
    # bitsandbytes' own bound for NF4 at blocksize 64 on N(0, 1).
    assert error < 0.0733
    assert error > 0.01  # it is a real 4-bit quantization, not a copy


def test_nf4_beats_fp4_on_gaussian_weights():
    torch.manual_seed(0)
    weight = torch.randn(512, 512)
    errors = {}
    for quant_type in ("nf4", "fp4"):
        model = nn.Sequential(nn.Linear(512, 512, bias=False))
        model[0].weight.data.copy_(weight)
        quantize_model(model, QuantConfig(quant_type=quant_type, skip_modules=()))
        errors[quant_type] = (dequantize_weight(model[0]).float() - weight).abs().mean().item()
    assert errors["nf4"] < errors["fp4"]


def test_double_quant_stores_nested_statistics_and_is_smaller():
    sizes = {}
    for double_quant in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
        quantize_model(model, QuantConfig(double_quant=double_quant, skip_modules=()))
        state = model[0].weight.quant_state
        assert (state.state2 is not None) == double_quant
        keys = model.state_dict().keys()
        assert any("nested_absmax" in k for k in keys) == double_quant
        sizes[double_quant] = _state_dict_bytes(model)
        assert quantized_nbytes(model[0]) > 1024 * 1024 // 2  # the packed weights themselves
    assert sizes[True] < sizes[False]


def test_measured_bits_per_parameter():
    model = nn.Sequential(nn.Linear(4096, 1024, bias=False))
    report = quantize_model(model, QuantConfig(double_quant=True, skip_modules=()))
    # 4 bits + ~0.127 bits of constants, plus a few bytes of code books and metadata.
    assert 4.12 < report.bits_per_parameter < 4.14
    model = nn.Sequential(nn.Linear(4096, 1024, bias=False))
    report = quantize_model(model, QuantConfig(double_quant=False, skip_modules=()))
    assert 4.49 < report.bits_per_parameter < 4.51
    assert report.bytes_before == 4096 * 1024 * 4  # fp32 source


def test_quantize_replaces_every_linear_except_skipped_and_freezes():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(64, 64))
    model.add_module("act", nn.GELU())
    model.add_module("lm_head", nn.Linear(64, 10))
    report = quantize_model(model, QuantConfig())
    assert report.quantized == ["proj"]
    assert report.skipped == ["lm_head"]
    assert is_quantized_linear(model.proj)
    assert type(model.lm_head) is nn.Linear
    assert not any(p.requires_grad for p in model.parameters())


def test_quantize_is_idempotent():
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_model(model, QuantConfig(skip_modules=()))
    before = packed_bytes(model[0]).clone()
    report = quantize_model(model, QuantConfig(skip_modules=()))
    assert report.quantized == []
    assert torch.equal(packed_bytes(model[0]), before)


def test_quant_type_none_casts_to_compute_dtype():
    model = nn.Sequential(nn.Linear(64, 64))
    report = quantize_model(model, QuantConfig(quant_type="none", compute_dtype="bf16", skip_modules=()))
    assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.bfloat16
    assert report.bytes_after == 64 * 64 * 2


def test_meta_device_layers_are_materialized_and_quantized():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    quantize_model(model, QuantConfig(skip_modules=()), device="cpu")
    for layer in (model[0], model[2]):
        assert is_quantized_linear(layer)
        weight = dequantize_weight(layer)
        assert weight.device.type == "cpu" and torch.isfinite(weight).all() and weight.abs().sum() > 0
    out = model(torch.randn(2, 128))
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def test_model_without_linear_is_refused():
    with pytest.raises(ValueError, match=r"Sequential has no nn.Linear layer"):
        quantize_model(nn.Sequential(nn.Conv1d(3, 3, 1)), QuantConfig())


def test_eval_inference_does_not_break_later_gradients():
    """bitsandbytes repacks CPU weights for eval inference into a layout without backward; ours must not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    quantize_model(model, QuantConfig(skip_modules=()))
    layer = model[0]
    before = packed_bytes(layer).clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.bfloat16))  # the generate() shape: one token, no grad
    layer.train()
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(packed_bytes(layer), before)


def test_plain_bitsandbytes_layer_shows_the_bug_we_guard_against():
    """Documents why the guard exists: bitsandbytes' own Linear4bit loses input gradients after CPU eval."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16, so bitsandbytes never repacks and the bug cannot occur")
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.bfloat16))
    layer.train()
    assert layer.weight.quant_state.packing_format_for_cpu  # the stored bytes were rearranged in place
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(UserWarning, match="gemv_4bit"):
        layer(x).float().sum().backward()
    assert x.grad is None  # no gradient reaches the input: this is what silently zeroes LoRA gradients


def test_weights_dequantize_straight_to_the_compute_dtype():
    """A base quantized from fp32 weights unpacks into bf16 directly: no fp32 copy written and cast down before every
    matmul (measured on the H200: the cast was a third of a 65B step's GPU time), with bit-identical values."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    weight = model[0].weight.detach().clone()
    quantize_model(model, QuantConfig(skip_modules=(), compute_dtype="bf16"))
    unpacked = dequantize_weight(model[0])
    assert unpacked.dtype == torch.bfloat16
    packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(unpacked, bnb.functional.dequantize_4bit(packed, state).to(torch.bfloat16))
