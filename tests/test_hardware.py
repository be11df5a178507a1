"""The compute dtype chosen where the user leaves it to us: bf16 only where the hardware multiplies it natively."""

import time

import pytest
import torch

from lightning_qlora.app.cli import _compute_dtype
from lightning_qlora.config import COMPUTE_DTYPES
from lightning_qlora.hardware import has_native_bf16, preferred_compute_dtype


def test_the_cpu_gets_bf16_only_with_bf16_instructions():
    dtype, reason = preferred_compute_dtype("cpu")
    assert dtype in COMPUTE_DTYPES
    assert (dtype == "bf16") == has_native_bf16("cpu")
    assert reason.startswith(dtype)
    if dtype == "fp32":
        assert "AVX512-BF16" in reason


def test_the_app_resolves_auto_and_keeps_a_named_dtype():
    assert _compute_dtype("fp16", on_cpu=True) == "fp16"
    assert _compute_dtype("bf16", on_cpu=True) == "bf16"
    assert _compute_dtype("auto", on_cpu=True) == preferred_compute_dtype("cpu")[0]


@pytest.mark.skipif(has_native_bf16("cpu"), reason="this CPU multiplies bf16 natively")
def test_bf16_matmuls_are_really_slower_here_than_fp32():
    # What the choice rests on, measured on this machine: the layout of a linear layer's input gradient.
    grad, weight = torch.randn(64, 4096), torch.randn(4096, 576)

    def best_of_three(a, b):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    fp32 = best_of_three(grad, weight)
    bf16 = best_of_three(grad.bfloat16(), weight.bfloat16())
    assert bf16 > 2 * fp32, (bf16, fp32)
