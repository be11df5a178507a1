"""Checkpoints on disk streamed into 4-bit layer by layer (stream_pretrained + the recipe), and every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_qlora import LoRAConfig, QuantConfig, convert_model, stream_pretrained
from lightning_qlora.quant.checkpoint import INDEX_FILE, CheckpointError, SafetensorsCheckpoint
from lightning_qlora.quant.fingerprint import WEIGHTS_HASH_ATTR


def _config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def _write(directory, tied: bool = False, dtype=torch.bfloat16, shard: str = "40KB"):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tied)).to(dtype)
    model.save_pretrained(directory, max_shard_size=shard, safe_serialization=True)
    return directory


def _from_memory(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_streamed_conversion_equals_loading_then_quantizing(tmp_path, tied):
    directory = _write(tmp_path / "ckpt", tied=tied)
    assert (directory / INDEX_FILE).is_file()  # sharded, through the index
    quant, lora = QuantConfig(), LoRAConfig(r=4, dropout=0.0)
    streamed = stream_pretrained(directory)
    assert all(p.is_meta for p in streamed.parameters())
    loaded = _from_memory(directory)
    torch.manual_seed(7)
    summary = convert_model(streamed, quant, lora, device="cpu")
    torch.manual_seed(7)
    reference = convert_model(loaded, quant, lora)
    assert not [n for n, p in streamed.named_parameters() if p.is_meta]
    with torch.no_grad():
        torch.testing.assert_close(streamed.eval()(_ids()).logits, loaded.eval()(_ids()).logits, atol=0, rtol=0)
    assert getattr(streamed, WEIGHTS_HASH_ATTR) == getattr(loaded, WEIGHTS_HASH_ATTR)  # same base fingerprint
    assert summary.adapted == reference.adapted and summary.total_params == reference.total_params
    # The bf16 checkpoint's bytes, not an fp32 copy's, are what was read.
    assert summary.quantization.bytes_before == reference.quantization.bytes_before // 2
    if tied:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight
        assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16


def test_no_more_than_one_layers_weight_is_ever_read_at_once(tmp_path, monkeypatch):
    import lightning_qlora.quant.quantize as quantize

    directory = _write(tmp_path / "ckpt", dtype=torch.float32)
    checkpoint = SafetensorsCheckpoint(directory)
    largest = max(info.shape[0] * info.shape[1] for name, info in checkpoint.tensors.items() if name.endswith("proj.weight"))
    reads, buffers = [], {}
    load, get = SafetensorsCheckpoint.load, quantize._ScratchBuffers.get

    def recording_load(self, name, device, dtype=None, shape=None, out=None):
        reads.append((name, out is not None))
        return load(self, name, device, dtype, shape, out)

    def recording_get(self, shape, dtype, device):
        view = get(self, shape, dtype, device)
        buffers[view.untyped_storage().data_ptr()] = view.untyped_storage().nbytes()
        return view

    monkeypatch.setattr(SafetensorsCheckpoint, "load", recording_load)
    monkeypatch.setattr(quantize._ScratchBuffers, "get", recording_get)
    model = stream_pretrained(directory)
    convert_model(model, QuantConfig(), LoRAConfig(r=4), device="cpu")
    linear_reads = [used_buffer for name, used_buffer in reads if name.endswith("proj.weight")]
    assert len(linear_reads) == 21 and all(linear_reads)  # every linear weight went into the reused buffer
    # ... which is one buffer, the size of the largest linear: one layer in full precision at a time.
    assert list(buffers.values()) == [largest * 4]
    # Reading copies nothing into the process's own memory first: a tensor read is a view of the mapped file.
    assert not checkpoint.view("model.norm.weight").untyped_storage().resizable()


def test_a_streamed_model_trains_through_lightning_and_saves_its_fingerprint(tmp_path):
    from lightning.pytorch import LightningModule

    from helpers import fast_trainer, token_loader
    from lightning_qlora import QLoRAPlugin, save_adapter
    from lightning_qlora.lora import read_adapter_metadata

    directory = _write(tmp_path / "ckpt")

    class Streamed(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = None
            self.losses = []

        def configure_model(self):
            if self.model is None:
                self.model = stream_pretrained(directory)

        def training_step(self, batch, batch_idx):
            (ids,) = batch
            loss = self.model(input_ids=ids, labels=ids).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)

    module = Streamed()
    trainer = fast_trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], max_steps=12)
    trainer.fit(module, token_loader())
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert sum(module.losses[-3:]) < sum(module.losses[:3])
    save_adapter(module, tmp_path / "adapter")
    reference = _from_memory(directory)
    convert_model(reference, QuantConfig(), LoRAConfig(r=4))
    saved = read_adapter_metadata(tmp_path / "adapter")["base_fingerprint"]["weights_sha256"]
    assert saved == getattr(reference, WEIGHTS_HASH_ATTR)


def _shards(directory):
    return sorted(p for p in directory.glob("*.safetensors"))


def test_a_missing_shard_is_named(tmp_path):
    directory = _write(tmp_path / "ckpt")
    victim = _shards(directory)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"names 1 shard\(s\) that are not in .*{victim.name}.*fetch the missing"):
        stream_pretrained(directory)


def test_an_index_naming_a_file_that_is_not_there(tmp_path):
    directory = _write(tmp_path / "ckpt")
    index = json.loads((directory / INDEX_FILE).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-99999-of-99999.safetensors"
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-99999-of-99999.safetensors"):
        stream_pretrained(directory)


def test_a_truncated_shard_is_refused_before_anything_is_built(tmp_path):
    directory = _write(tmp_path / "ckpt")
    victim = _shards(directory)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"{victim.name} is truncated: its header describes .* Fetch it again"):
        stream_pretrained(directory)
    victim.write_bytes(b"\x00" * 4)  # not even a header
    with pytest.raises(CheckpointError, match=rf"{victim.name} is not a readable safetensors file"):
        stream_pretrained(directory)


def _rewrite(directory, name, change):
    """Apply ``change(tensors)`` to the shard holding ``name``."""
    index = json.loads((directory / INDEX_FILE).read_text())
    shard = directory / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def test_a_missing_tensor_is_named_at_conversion(tmp_path):
    directory = _write(tmp_path / "ckpt")
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(directory, name, lambda tensors: tensors.pop(name))
    model = stream_pretrained(directory)
    with pytest.raises(CheckpointError, match=r"has no tensor for the model's 'model.layers.1.mlp.up_proj.weight'"):
        convert_model(model, QuantConfig(), LoRAConfig(r=4), device="cpu")


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    directory = _write(tmp_path / "ckpt")
    name = "model.layers.0.self_attn.o_proj.weight"
    shard = _rewrite(directory, name, lambda tensors: tensors.__setitem__(name, torch.zeros(64, 32, dtype=torch.bfloat16)))
    model = stream_pretrained(directory)
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{name}' has shape \[64, 32\] but the model expects \[64, 64\]"):
        convert_model(model, QuantConfig(), LoRAConfig(r=4), device="cpu")


def test_an_unsupported_dtype_is_named(tmp_path):
    directory = _write(tmp_path / "ckpt")
    name = "model.norm.weight"
    _rewrite(directory, name, lambda tensors: tensors.__setitem__(name, tensors[name].to(torch.float8_e4m3fn)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has dtype 'F8_E4M3', which is not supported"):
        stream_pretrained(directory)


def test_an_architecture_transformers_does_not_know(tmp_path):
    directory = _write(tmp_path / "ckpt")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "llama-from-the-future"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json cannot be used by the installed transformers.*pip install -U"):
        stream_pretrained(directory)


def test_a_directory_without_config_or_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json is missing"):
        stream_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds no safetensors weights"):
        stream_pretrained(tmp_path)


def test_a_streamed_model_is_calibrated_block_by_block_as_the_loaded_one_is(tmp_path):
    from lightning_qlora import calibrate, iter_converted_blocks
    from lightning_qlora.calibration import CalibrationData

    directory = _write(tmp_path / "ckpt")
    quant, lora = QuantConfig(calibration="gptq"), LoRAConfig(r=4, dropout=0.0, init_lora_weights="cloq")
    batches = [_ids(seed=s) for s in range(3)]
    loaded = _from_memory(directory)
    result = calibrate(loaded, batches, quant, lora, forward=lambda ids: loaded(input_ids=ids))
    torch.manual_seed(2)
    convert_model(loaded, quant, lora, calibration=result)
    streamed = stream_pretrained(directory)
    data = CalibrationData(batches, lambda ids: streamed(input_ids=ids), gptq=True, adapter_init=True)
    torch.manual_seed(2)
    pieces = list(iter_converted_blocks(streamed, quant, lora, device="cpu", calibrate_on=data))
    assert len(pieces[-1].summary.initialized) == 21 and pieces[-1].summary.calibration.layers == 21
    with torch.no_grad():
        torch.testing.assert_close(streamed.eval()(_ids()).logits, loaded.eval()(_ids()).logits, atol=0, rtol=0)
    assert streamed.model.embed_tokens.weight.dtype == torch.bfloat16  # cast once calibration is done


@pytest.mark.gpu
def test_streaming_to_cuda_with_prefetch_packs_the_same_bytes(tmp_path, monkeypatch):
    from lightning_qlora.quant.streaming import StreamedWeights

    directory = _write(tmp_path / "ckpt")
    prefetched = stream_pretrained(directory)
    convert_model(prefetched, QuantConfig(), None, device="cuda")
    monkeypatch.setattr(StreamedWeights, "prefetch", lambda self, names, device: None)
    plain = stream_pretrained(directory)
    convert_model(plain, QuantConfig(), None, device="cuda")
    for (name, a), (_, b) in zip(prefetched.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_the_model_stays_on_its_device_when_fit_ends(tiny_llama_config):
    # Lightning's teardown moves the model to the CPU: for a 4-bit model, a second copy of it in host memory.
    from helpers import CausalLMModule, fast_trainer, token_loader
    from lightning_qlora import QLoRAPlugin

    class Recording(CausalLMModule):
        moved = 0

        def cpu(self):
            Recording.moved += 1
            return super().cpu()

    fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], max_steps=1).fit(Recording(tiny_llama_config), token_loader())
    assert Recording.moved == 1  # Lightning's own strategy does move it
    Recording.moved = 0
    module = Recording(tiny_llama_config)
    fast_trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], max_steps=1).fit(module, token_loader())
    assert Recording.moved == 0 and "cpu" not in vars(module)
