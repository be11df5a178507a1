"""Pre-quantized bases in transformers' bitsandbytes 4-bit format: loaded as they are, and saved so others load them."""

from __future__ import annotations

import pytest
import torch

from lightning_qlora import LoRAConfig, QuantConfig, convert_model, save_quantized, stream_pretrained
from lightning_qlora.modules import iter_linears
from lightning_qlora.quant import is_quantized_linear, packed_bytes
from lightning_qlora.quant.checkpoint import CheckpointError
from lightning_qlora.quant.fingerprint import WEIGHTS_HASH_ATTR


def _full_precision(directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return directory


def _bnb_config(**overrides):
    from transformers import BitsAndBytesConfig

    settings = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16)
    settings.update(overrides)
    return BitsAndBytesConfig(**settings)


def _transformers_4bit(source, directory=None, **overrides):
    """transformers' own 4-bit load of ``source`` (saved to ``directory`` when given): a ``*-bnb-4bit`` checkpoint."""
    from transformers import AutoModelForCausalLM

    settings = {"quantization_config": _bnb_config(**overrides)} if overrides or directory else {}
    # (Passing quantization_config=None would switch off the checkpoint's own 4-bit loading.)
    model = AutoModelForCausalLM.from_pretrained(source, device_map={"": "cpu"}, dtype=torch.bfloat16, **settings)
    if directory is not None:
        model.save_pretrained(directory)
    return model.train()


def _packed(model):
    return {name.replace(".base_layer", ""): packed_bytes(m).clone() for name, m in iter_linears(model)
            if is_quantized_linear(m)}


def _ids():
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))


def test_a_bnb_4bit_checkpoint_loads_as_it_is_with_transformers_bytes_and_logits(tmp_path):
    source = _full_precision(tmp_path / "fp")
    _transformers_4bit(source, tmp_path / "bnb4")
    theirs = _transformers_4bit(tmp_path / "bnb4")  # transformers' own load of the pre-quantized directory
    ours = stream_pretrained(tmp_path / "bnb4")
    summary = convert_model(ours, QuantConfig(), LoRAConfig(r=4, dropout=0.0), device="cpu")
    assert len(summary.quantization.quantized) == 14 and summary.adapted
    mine, reference = _packed(ours), _packed(theirs)
    assert sorted(mine) == sorted(reference)
    assert all(torch.equal(mine[n], reference[n]) for n in mine)  # the same bytes: nothing was re-quantized
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits.float(), theirs(_ids()).logits.float(), atol=0, rtol=0)
    assert getattr(ours, WEIGHTS_HASH_ATTR) is None  # quantized by someone else: no full-precision weights to hash


def test_a_checkpoint_in_another_format_than_asked_is_refused(tmp_path):
    source = _full_precision(tmp_path / "fp")
    _transformers_4bit(source, tmp_path / "fp4", bnb_4bit_quant_type="fp4")
    with pytest.raises(CheckpointError, match=r"stores this layer as fp4.*QuantConfig\(quant_type='fp4'"):
        convert_model(stream_pretrained(tmp_path / "fp4"), QuantConfig(), None, device="cpu")


def test_saved_quantized_base_loads_in_transformers_and_back_and_keeps_the_fingerprint(tmp_path):
    source = _full_precision(tmp_path / "fp")
    model = stream_pretrained(source)
    convert_model(model, QuantConfig(), LoRAConfig(r=4, dropout=0.0), device="cpu")
    fingerprint = getattr(model, WEIGHTS_HASH_ATTR)
    save_quantized(model, tmp_path / "ours-4bit", max_shard_size="40KB")
    assert (tmp_path / "ours-4bit" / "model.safetensors.index.json").is_file()
    theirs = _transformers_4bit(tmp_path / "ours-4bit")
    assert all(torch.equal(_packed(theirs)[n], b) for n, b in _packed(model).items())
    back = stream_pretrained(tmp_path / "ours-4bit")
    convert_model(back, QuantConfig(), None, device="cpu")
    assert all(torch.equal(_packed(back)[n], b) for n, b in _packed(model).items())
    assert getattr(back, WEIGHTS_HASH_ATTR) == fingerprint  # adapters trained on it still match the original
    base = stream_pretrained(source)
    convert_model(base, QuantConfig(), None, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(_ids()).logits, base.eval()(_ids()).logits, atol=0, rtol=0)
        # (transformers' layers in train mode: in eval mode on the CPU bitsandbytes repacks them for its gemv kernel)
        torch.testing.assert_close(theirs(_ids()).logits.float(), base(_ids()).logits.float(), atol=0, rtol=0)


def test_the_quantize_command_writes_a_base_transformers_loads(tmp_path):
    import subprocess
    import sys

    source = _full_precision(tmp_path / "fp")
    (source / "tokenizer_config.json").write_text("{}")  # non-weight files travel with the copy
    result = subprocess.run(
        [sys.executable, "-m", "lightning_qlora.tools.quantize", str(source), "--out", str(tmp_path / "q"),
         "--device", "cpu"], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "14" in result.stdout and "bits/param" in result.stdout
    assert (tmp_path / "q" / "tokenizer_config.json").is_file()
    theirs = _transformers_4bit(tmp_path / "q")
    assert sum(is_quantized_linear(m) for _, m in iter_linears(theirs)) == 14
