import math

import pytest

from lightning_qlora import ConfigError, LoRAConfig, QuantConfig


def test_defaults_are_qlora_paper_settings():
    quant = QuantConfig()
    assert (quant.quant_type, quant.double_quant, quant.compute_dtype, quant.blocksize) == ("nf4", True, "bf16", 64)
    assert quant.skip_modules == ("lm_head",)
    lora = LoRAConfig()
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (16, 32.0, 0.05, "all-linear")
    assert lora.scaling == pytest.approx(2.0)


def test_rslora_scaling():
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / math.sqrt(16))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r=0 must be > 0"),
        ({"r": -4}, r"r=-4 must be > 0"),
        ({"r": 2.5}, r"r=2.5 must be a positive int"),
        ({"alpha": 0}, r"alpha=0 must be a finite number > 0"),
        ({"alpha": -1.0}, r"alpha=-1.0 must be a finite number > 0"),
        ({"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout=-0.1 must be in \[0, 1\)"),
        ({"target_modules": []}, r"non-empty list"),
        ({"target_modules": "q_proj("}, r"not a valid regular expression"),
        ({"target_modules": 3}, r"has type int"),
    ],
)
def test_lora_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**kwargs)


def test_lora_config_lists_every_problem_at_once():
    with pytest.raises(ConfigError, match=r"LoRAConfig has 3 invalid value\(s\)") as info:
        LoRAConfig(r=0, alpha=-1, dropout=2.0)
    assert len(info.value.problems) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quant_type": "int3"}, r"quant_type='int3' is not supported. Use one of \['nf4', 'fp4', 'none'\]"),
        ({"compute_dtype": "fp8"}, r"compute_dtype='fp8' is not supported. Use one of \['bf16', 'fp16', 'fp32'\]"),
        ({"blocksize": 7}, r"blocksize=7 is not supported by bitsandbytes.*64 is the QLoRA default"),
        ({"blocksize": "64"}, r"blocksize='64' must be an int"),
        ({"double_quant": "yes"}, r"double_quant='yes' must be a bool"),
    ],
)
def test_quant_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def test_list_targets_are_normalized_to_tuple():
    assert LoRAConfig(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")


def test_bits_per_parameter_estimate_matches_the_paper():
    # 4 bits + 32/64 = 4.5 without double quant; 4 + 8/64 + 32/(64*256) ~= 4.127 with it.
    assert QuantConfig(double_quant=False).bits_per_parameter_estimate() == pytest.approx(4.5)
    assert QuantConfig(double_quant=True).bits_per_parameter_estimate() == pytest.approx(4.127, abs=1e-3)
