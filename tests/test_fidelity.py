"""NF4 / NF4-DQ / FP4 / INT4 / INT8 round trips, stored bits, and the report command."""

import json
import subprocess
import sys

import pytest
import torch

from lightning_qlora.quant.fidelity import FORMATS, bits_per_parameter, reconstruction_errors, round_trip


@pytest.fixture(scope="module")
def gaussian():
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))


def test_error_order_on_gaussian_weights(gaussian):
    errors = {fmt: reconstruction_errors(gaussian, round_trip(gaussian, fmt).dequantized)["mean_abs"] for fmt in FORMATS}
    # NF4 places its levels at normal quantiles: best 4-bit format on normal weights; INT8 is far better still.
    assert errors["nf4"] < errors["fp4"] and errors["nf4"] < errors["int4"]
    assert errors["nf4-dq"] < errors["fp4"]
    assert errors["int8"] < errors["nf4"] / 10
    assert errors["nf4"] < 0.0733  # bitsandbytes' bound at blocksize 64 on N(0, 1)


def test_stored_bits_per_parameter(gaussian):
    bits = {fmt: bits_per_parameter(round_trip(gaussian, fmt).stored_bytes, gaussian.numel()) for fmt in FORMATS}
    # 4 bits + one fp32 absmax per 64 weights = 4.5; double quant: 8-bit absmax + fp32 per 256 blocks ~= 4.127.
    assert bits["nf4"] == pytest.approx(4.5, abs=2e-3)
    # Measured bytes also hold the 256-entry fp32 code book of the nested absmax (~0.008 bits/param at 1M weights).
    assert 4.127 <= bits["nf4-dq"] < 4.14
    assert bits["int4"] == pytest.approx(4.5)
    assert bits["int8"] == pytest.approx(8.5)


def test_uniform_int4_uses_15_levels_per_block():
    weight = torch.linspace(-1, 1, 64).view(1, 64)
    approx = round_trip(weight, "int4").dequantized
    assert len(torch.unique(approx)) == 15
    assert approx.abs().max() == pytest.approx(1.0)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match=r"format='int3' is not one of \['nf4', 'nf4-dq', 'fp4', 'int4', 'int8'\]"):
        round_trip(torch.randn(4, 64), "int3")


def _report(args, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_qlora.tools.report", *args, "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "report.json").read_text())


def test_report_on_minilm_fp32_weights(tmp_path):
    report = _report(["--model", "all-minilm-l6-v2"], tmp_path)
    weights = report["weights"]
    assert set(weights) == set(FORMATS) and weights["nf4"]["layers"] == 37  # 6 layers x 6 linears + pooler
    assert weights["nf4"]["relative_error"] < weights["int4"]["relative_error"]
    assert weights["nf4-dq"]["bits_per_param"] < weights["nf4"]["bits_per_param"] - 0.3
    assert report["perplexity"] is None  # an encoder: no causal-LM perplexity
    assert (tmp_path / "report.md").read_text().startswith("# Quantization fidelity: all-minilm-l6-v2")
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_report_on_smollm2_includes_perplexity(tmp_path, smollm2_path):
    # fp32 passes: what this CPU computes in (bf16 runs several times slower on CPUs without bf16 instructions).
    report = _report(["--eval-rows", "2", "--dtype", "fp32"], tmp_path)
    ppl = report["perplexity"]
    assert set(ppl) == {"fp32", *FORMATS} and report["compute_dtype"] == "fp32"
    assert all(1 < value < 1e4 for value in ppl.values())
    assert ppl["int8"] < ppl["nf4"] and ppl["nf4"] < ppl["int4"]  # the order the README's table shows
    markdown = (tmp_path / "report.md").read_text()
    assert "Q4_1 GGUF" in markdown and "| fp32 (reference) | 0 | 0 | 32 |" in markdown
