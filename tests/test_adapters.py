"""PEFT-format adapters: interchange with PEFT, fingerprint checks, bad files, merge/unmerge, export, atomic saves."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_merge_round_trip, llama
from torch import nn

from lightning_qlora import LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter, save_adapter
from lightning_qlora.lora import LoRALinear, iter_lora_layers, merge_lora, unmerge_lora
from lightning_qlora.lora.peft_format import AdapterFormatError, read_adapter_metadata
from lightning_qlora.quant import is_quantized_linear, packed_bytes
from lightning_qlora.quant.fingerprint import FingerprintMismatchError
from lightning_qlora.tools.export import export_merged

FP32_NONE = QuantConfig(quant_type="none", compute_dtype="fp32")


def _train_like(model, seed=1):
    """Give every adapter non-zero weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in iter_lora_layers(model):
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)


def _ours(model, r=4, quant=FP32_NONE, target="all-linear"):
    QLoRAPlugin(quant=quant, lora=LoRAConfig(r=r, alpha=8, dropout=0.0, target_modules=target)).convert_module(model)
    return model


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, tiny_llama_config, ids):
    from peft import PeftModel

    model = _ours(llama(tiny_llama_config))
    _train_like(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(llama(tiny_llama_config), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def _train_with_peft(peft_model, ids, steps=3):
    """A few real optimizer steps in PEFT, so its adapter is a trained one."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def test_peft_adapter_loads_into_ours_with_the_same_logits(tmp_path, tiny_llama_config, ids):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(llama(tiny_llama_config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    _train_with_peft(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = llama(tiny_llama_config)
    loaded = load_adapter(ours, tmp_path / "peft")  # injects the adapters PEFT's config names
    assert len(loaded) == 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_adapter_round_trips_through_peft(tmp_path, smollm2_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    model = _ours(AutoModelForCausalLM.from_pretrained(smollm2_path).eval(), r=4, target=["q_proj", "v_proj"])
    _train_like(model)
    save_adapter(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_adapter_trained_by_peft_loads_into_ours(tmp_path, smollm2_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_path),
                                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    _train_with_peft(peft_model, ids, steps=1)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-4, rtol=0)


def test_load_into_plain_model_quantizes_only_if_asked(tmp_path, tiny_llama_config, ids):
    model = _ours(llama(tiny_llama_config), quant=QuantConfig())
    _train_like(model)
    save_adapter(model, tmp_path / "adapter")
    assert read_adapter_metadata(tmp_path / "adapter")["quantization"]["quant_type"] == "nf4"

    plain = llama(tiny_llama_config)
    load_adapter(plain, tmp_path / "adapter")
    assert not any(is_quantized_linear(m) for m in plain.modules())
    quantized = llama(tiny_llama_config)
    load_adapter(quantized, tmp_path / "adapter", quant=QuantConfig())
    layer = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and is_quantized_linear(layer.base_layer)
    torch.testing.assert_close(layer.lora_B.weight, model.model.layers[0].self_attn.q_proj.lora_B.weight)


def test_adapter_from_another_base_is_refused_unless_not_strict(tmp_path, tiny_llama_config, caplog):
    model = _ours(llama(tiny_llama_config, seed=0))
    save_adapter(model, tmp_path / "adapter")
    other = llama(tiny_llama_config, seed=1)  # same shapes, different weights
    with pytest.raises(FingerprintMismatchError, match=r"was trained on LlamaForCausalLM .* but is being loaded into "
                                                       r"LlamaForCausalLM .*base weights differ.*strict=False"):
        load_adapter(other, tmp_path / "adapter")
    load_adapter(llama(tiny_llama_config, seed=1), tmp_path / "adapter", strict=False)
    assert "Loading anyway" in caplog.text

    bigger = tiny_llama_config.to_dict() | {"intermediate_size": 256}
    from transformers import LlamaConfig

    with pytest.raises(FingerprintMismatchError, match=r"linear layer names/shapes differ"):
        load_adapter(llama(LlamaConfig(**bigger)), tmp_path / "adapter")


def test_the_same_base_passes_the_fingerprint_quantized_or_not(tmp_path, tiny_llama_config):
    model = _ours(llama(tiny_llama_config), quant=QuantConfig())  # fingerprint recorded before quantization
    save_adapter(model, tmp_path / "adapter")
    load_adapter(llama(tiny_llama_config), tmp_path / "adapter")  # plain fp32 base: same weights hash
    load_adapter(llama(tiny_llama_config), tmp_path / "adapter", quant=QuantConfig(quant_type="fp4"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), r"adapter_model.safetensors is missing"),
        (lambda d: (d / "adapter_config.json").unlink(), r"adapter_config.json is missing"),
        (lambda d: _truncate(d / "adapter_model.safetensors"), r"cannot be read: truncated or corrupted"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), r"is not valid JSON"),
        (lambda d: _edit_config(d, lambda c: c | {"lora_magic": 3}), r"unknown field\(s\) \['lora_magic'\]"),
        (lambda d: _edit_config(d, lambda c: c | {"bias": "all"}), r"bias='all' is not supported"),
        (lambda d: _edit_config(d, lambda c: c | {"use_dora": True}), r"adapter weight\(s\) missing.*lora_magnitude_vector"),
        (lambda d: _edit_config(d, lambda c: c | {"r": 0}), r"r=0 must be > 0"),
    ],
)
def test_damaged_adapters_give_clear_errors(tmp_path, tiny_llama_config, damage, message):
    model = _ours(llama(tiny_llama_config))
    save_adapter(model, tmp_path / "adapter")
    damage(tmp_path / "adapter")
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(llama(tiny_llama_config), tmp_path / "adapter")


def test_shape_mismatch_names_the_weight(tmp_path, tiny_llama_config):
    save_adapter(_ours(llama(tiny_llama_config), r=4), tmp_path / "adapter")
    model = _ours(llama(tiny_llama_config), r=8)
    with pytest.raises(AdapterFormatError, match=r"lora_A.weight has shape \(4, 64\), the model's is \(8, 64\)"):
        load_adapter(model, tmp_path / "adapter")


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_config(directory, change):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_merge_into_plain_base_and_unmerge_exactly(tiny_llama_config, ids):
    model = _ours(llama(tiny_llama_config))
    _train_like(model)
    assert_merge_round_trip(model, ids)


def test_merge_into_4bit_base_warns_and_unmerge_restores_bytes(tiny_llama_config, ids):
    model = _ours(llama(tiny_llama_config), quant=QuantConfig())
    _train_like(model)
    before = {n: packed_bytes(m.base_layer).clone() for n, m in iter_lora_layers(model)}
    with pytest.warns(UserWarning, match=r"re-quantizes every adapted weight"):
        merge_lora(model)
    assert any(not torch.equal(packed_bytes(m.base_layer), before[n]) for n, m in iter_lora_layers(model))
    unmerge_lora(model)
    assert all(torch.equal(packed_bytes(m.base_layer), before[n]) for n, m in iter_lora_layers(model))


def test_export_merged_loads_with_transformers_and_reports_drift(tmp_path, tiny_llama_config, ids):
    from transformers import AutoModelForCausalLM

    model = _ours(llama(tiny_llama_config), quant=QuantConfig(compute_dtype="fp32"))
    _train_like(model)
    report = export_merged(model, tmp_path / "merged", dtype=torch.float32, check_input_ids=ids, progress=False)
    assert report.merged_layers == 14
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, LoRALinear) or is_quantized_linear(m) for m in reloaded.modules())
    # fp32 merge of the dequantized base: only float rounding separates it from base + adapter.
    assert report.rel_logit_error < 1e-4 and report.max_abs_logit_diff < 1e-3
    assert report.weight_rounding_rel_error == 0.0 and "the merge is faithful" in report.drift_explained()


def test_export_drift_is_put_on_the_scale_of_the_dtype_and_a_wrong_merge_is_called_out(tmp_path, tiny_llama_config, ids):
    from lightning_qlora.tools.export import merge_drift

    model = _ours(llama(tiny_llama_config), quant=QuantConfig(compute_dtype="fp32"))
    _train_like(model)
    report = export_merged(model, tmp_path / "merged", dtype=torch.bfloat16, check_input_ids=ids, progress=False)
    # bf16 keeps 8 significant bits: each weight rounds by up to 2^-9, about 2e-3 relative on the whole.
    assert 1e-4 < report.weight_rounding_rel_error < 4e-3
    assert report.rel_logit_error_fp32_compute <= report.rel_logit_error
    assert "the merge is faithful" in report.drift_explained()
    # The export no longer matches what the model computes (its adapters changed after the merge): called out.
    for _, layer in iter_lora_layers(model):
        layer.lora_B.weight.data *= 4
    report.max_abs_logit_diff, report.rel_logit_error, report.rel_logit_error_fp32_compute = merge_drift(
        model, tmp_path / "merged", ids
    )
    assert "more than rounding explains" in report.drift_explained()


def test_export_cli(tmp_path, tiny_llama_config):
    base = llama(tiny_llama_config)
    base.save_pretrained(tmp_path / "base")
    model = _ours(llama(tiny_llama_config), quant=QuantConfig())
    _train_like(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    tok_dir = tmp_path / "base"
    _write_tiny_tokenizer(tok_dir)
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.tools.export", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "merged" / "config.json").is_file() and "rel_logit_error" in result.stdout


def _write_tiny_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(directory)


_KILL_DURING_SAVE = r"""
import os, signal, sys, torch
from torch import nn
import safetensors.torch as st
from lightning_qlora import LoRAConfig, inject_lora, save_adapter
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
inject_lora(model, LoRAConfig(r=4))
for p in model.parameters():
    torch.nn.init.normal_(p)
real = st.save_file
def save_then_die(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # after the weights, before the config and the rename
st.save_file = save_then_die
save_adapter(model, sys.argv[1])
"""


def test_sigkill_during_save_leaves_previous_adapter_loadable(tmp_path):
    from lightning_qlora import inject_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path / "adapter")
    previous = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    result = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path / "adapter")], timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == previous
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))  # the same base
    assert load_adapter(fresh, tmp_path / "adapter") == ["0", "2"]


def test_kill_between_the_two_file_renames_leaves_a_loadable_adapter(tmp_path, monkeypatch):
    import os

    from lightning_qlora import inject_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        model[0].lora_B.weight.add_(1.0)  # the next save holds other values
    real_replace, calls = os.replace, []

    def replace_then_crash(source, target):
        calls.append(target)
        if len(calls) == 2:  # the new weights are in place; the config's rename never happens
            raise KeyboardInterrupt("killed")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    assert load_adapter(fresh, tmp_path / "adapter") == ["0", "2"]  # whole files only: new weights, same config
    torch.testing.assert_close(fresh[0].lora_B.weight, model[0].lora_B.weight)
    save_adapter(model, tmp_path / "adapter")
    hidden = sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.name.startswith("."))
    assert hidden == []  # the interrupted save's temporary file was cleaned up


