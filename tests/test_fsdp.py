"""Fully sharded QLoRA through Lightning's FSDP2 (strategy="qlora_fsdp") and resume under DDP and FSDP.

The multi-process tests run tests/parallel_worker.py as 2 CPU processes over gloo (Lightning's own launcher).
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightning_qlora import QLoRAPlugin, QuantConfig
from lightning_qlora.config import ConfigError
from lightning_qlora.lightning.strategies.fsdp import QLoRAFSDPStrategy, resolve_quant_storage_for_fsdp
from lightning_qlora.lora import LoRALinear
from lightning_qlora.modules import find_blocks, iter_linears
from lightning_qlora.quant import dequantize_weight, is_quantized_linear, quantize_model
from lightning_qlora.sharding import QuantStorageMismatchError, check_quant_storage
from parallel_worker import run_in_this_process

WORKER = Path(__file__).with_name("parallel_worker.py")


def _run(out, *args, check=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(WORKER), "--out", str(out), *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def _facts(out, rank=0):
    return json.loads((out / f"facts_rank{rank}.json").read_text())


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_shards_base_and_adapters_and_matches_one_process_on_the_same_global_batch(tmp_path):
    _run(tmp_path / "fsdp", "--devices", 2, "--batch", 4)
    run_in_this_process(tmp_path / "single", "--devices", 1, "--batch", 8, "--strategy", "qlora")
    facts = _facts(tmp_path / "fsdp")
    # Sharded for real: adapters and packed base weights are DTensors, the blocks are the FSDP units, and the packed
    # bytes are stored in the compute dtype (fp32 here) because quant_storage was "auto".
    assert facts["sharded_adapters"] and facts["sharded_base"], facts
    assert facts["sharded_units"] == ["model.layers.0", "model.layers.1"]
    assert facts["packed_dtypes"] == ["torch.float32"]
    assert facts["global_step"] == 8
    rank0 = torch.load(tmp_path / "fsdp" / "adapters_rank0.pt")
    rank1 = torch.load(tmp_path / "fsdp" / "adapters_rank1.pt")
    single = torch.load(tmp_path / "single" / "adapters_rank0.pt")
    assert len(rank0) == 28 and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    # Same global batch, plain SGD, fp32 compute: equal up to float rounding of the averaged gradient (measured
    # 2.2e-8).
    assert _max_diff(rank0, single) < 1e-6
    assert max(rank0[k].abs().max().item() for k in rank0 if "lora_B" in k) > 0  # it trained
    # The adapter written by rank zero is a whole (gathered) PEFT-format adapter.
    adapter = tmp_path / "fsdp" / "adapter" / "last"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(adapter / "adapter_model.safetensors")
    assert len(saved) == 28
    for key, value in rank0.items():  # module.model.<peft name> -> base_model.model.<peft name>
        peft_key = "base_model.model." + key.removeprefix("model.")
        assert torch.equal(saved[peft_key], value), peft_key


def test_fsdp_streams_a_checkpoint_from_disk_block_by_block_like_one_process(tmp_path):
    # Each rank streams the checkpoint, quantizes a block and shards it, then the next: the same training as one
    # process streaming the same checkpoint.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(5)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    _run(tmp_path / "fsdp", "--devices", 2, "--batch", 4, "--epochs", 1, "--from-disk", tmp_path / "ckpt")
    run_in_this_process(tmp_path / "single", "--devices", 1, "--batch", 8, "--epochs", 1, "--strategy", "qlora",
         "--from-disk", tmp_path / "ckpt")
    facts = _facts(tmp_path / "fsdp")
    assert facts["sharded_base"] and facts["sharded_units"] == ["model.layers.0", "model.layers.1"]
    assert facts["meta_left"] == []
    rank0 = torch.load(tmp_path / "fsdp" / "adapters_rank0.pt")
    single = torch.load(tmp_path / "single" / "adapters_rank0.pt")
    assert _max_diff(rank0, single) < 1e-6


def test_dora_under_fsdp_matches_one_process(tmp_path):
    # DoRA's magnitude vector is a bare fp32 parameter beside the packed base inside each sharded block.
    _run(tmp_path / "fsdp", "--devices", 2, "--batch", 4, "--dora", 1)
    run_in_this_process(tmp_path / "single", "--devices", 1, "--batch", 8, "--strategy", "qlora", "--dora", 1)
    sharded = torch.load(tmp_path / "fsdp" / "adapters_rank0.pt")
    single = torch.load(tmp_path / "single" / "adapters_rank0.pt")
    assert len(sharded) == 42 and sum("lora_magnitude_vector" in k for k in sharded) == 14
    assert _max_diff(sharded, single) < 1e-6  # measured 4.5e-8
    saved = load_file(tmp_path / "fsdp" / "adapter" / "last" / "adapter_model.safetensors")
    assert sum("lora_magnitude_vector" in k for k in saved) == 14


@pytest.mark.parametrize(("strategy", "optimizer"),
                         [("qlora_fsdp", "adamw"), ("qlora_ddp", "adamw"), ("qlora_fsdp", "adamw8bit")])
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path, strategy, optimizer):
    # AdamW: its moments must come back too. The checkpoint after epoch 0 (step 4) is adapter-only, one file.
    # AdamW8bit (lightning_qlora.optim.adamw8bit) steps each rank's shard with bitsandbytes' 8-bit kernel, saves its
    # moments gathered in torch AdamW's format and re-quantizes them on load: bit for bit the same 8-bit state.
    common = ["--devices", 2, "--batch", 4, "--optimizer", optimizer, "--strategy", strategy]
    _run(tmp_path / "full", *common)
    ckpt = tmp_path / "full" / "checkpoints" / "epoch=0-step=4.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    assert all(".lora_" in k for k in checkpoint["state_dict"]) and len(checkpoint["state_dict"]) == 28
    states = checkpoint["optimizer_states"][0]["state"]
    assert len(states) == 28
    whole = {tuple(v.shape) for v in checkpoint["state_dict"].values()}
    assert all({"exp_avg", "exp_avg_sq", "step"} <= set(s) and tuple(s["exp_avg"].shape) in whole
               for s in states.values())  # whole (gathered) moments, fp32, as torch AdamW saves them
    _run(tmp_path / "resumed", *common, "--resume", ckpt)
    full = torch.load(tmp_path / "full" / "adapters_rank0.pt")
    resumed = torch.load(tmp_path / "resumed" / "adapters_rank1.pt")
    assert _max_diff(full, resumed) == 0.0  # measured: bit-identical on CPU for both strategies
    assert _facts(tmp_path / "resumed", 1)["losses"] == _facts(tmp_path / "full", 1)["losses"][4:]


def test_fsdp_refuses_an_explicit_quant_storage_other_than_the_compute_dtype():
    plugin = QLoRAPlugin(quant=QuantConfig(quant_storage="uint8"))
    with pytest.raises(QuantStorageMismatchError, match="quant_storage.*'bf16'.*destroying"):
        resolve_quant_storage_for_fsdp(plugin)
    auto = QLoRAPlugin(quant=QuantConfig(compute_dtype="fp16"))
    resolve_quant_storage_for_fsdp(auto)
    assert auto.quant.quant_storage == "fp16"
    with pytest.raises(ConfigError, match="quant_storage='int8'"):
        QuantConfig(quant_storage="int8")


def test_check_quant_storage_refuses_packed_weights_fsdp_would_cast(tiny_llama):
    quantize_model(tiny_llama, QuantConfig(quant_storage="uint8"))
    with pytest.raises(QuantStorageMismatchError, match=r"14 4-bit layer\(s\).*torch.uint8.*silently destroy"):
        check_quant_storage(tiny_llama, torch.bfloat16)
    check_quant_storage(tiny_llama, torch.uint8)  # matching: accepted


def test_bf16_storage_holds_the_same_bytes_as_uint8(tiny_llama):
    other = copy.deepcopy(tiny_llama)
    quantize_model(tiny_llama, QuantConfig(quant_storage="uint8"))
    quantize_model(other, QuantConfig(quant_storage="bf16"))
    a = tiny_llama.model.layers[1].self_attn.o_proj
    b = other.model.layers[1].self_attn.o_proj
    assert b.weight.dtype == torch.bfloat16
    assert torch.equal(a.weight.data.view(-1), b.weight.data.view(torch.uint8).view(-1))
    torch.testing.assert_close(dequantize_weight(a), dequantize_weight(b), atol=0, rtol=0)


def test_blocks_are_the_transformer_blocks_or_named_classes(tiny_llama):
    assert [n for n, _ in find_blocks(tiny_llama)] == ["model.layers.0", "model.layers.1"]
    assert [n for n, _ in find_blocks(tiny_llama, ["LlamaMLP"])] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with pytest.raises(ValueError, match="matches no module.*LlamaDecoderLayer"):
        find_blocks(tiny_llama, ["GPT2Block"])


def test_fsdp_strategy_is_registered_and_shards_over_all_ranks_by_default():
    from lightning.pytorch import Trainer

    trainer = Trainer(strategy="qlora_fsdp", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, QLoRAFSDPStrategy)
    assert trainer.strategy._tensor_parallel_size == 1
    assert QLoRAFSDPStrategy(shard_modules=["LlamaDecoderLayer"]).shard_modules == ["LlamaDecoderLayer"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_on_one_gpu_trains_saves_and_resumes(tmp_path):
    common = ["--devices", 1, "--batch", 8, "--optimizer", "adamw", "--accelerator", "gpu", "--compute-dtype", "bf16"]
    _run(tmp_path / "full", *common)
    facts = _facts(tmp_path / "full")
    assert facts["sharded_adapters"] and facts["sharded_base"] and facts["packed_dtypes"] == ["torch.bfloat16"]
    assert facts["losses"][-1] < facts["losses"][0]
    ckpt = tmp_path / "full" / "checkpoints" / "epoch=0-step=4.ckpt"
    _run(tmp_path / "resumed", *common, "--resume", ckpt)
    full = torch.load(tmp_path / "full" / "adapters_rank0.pt")
    resumed = torch.load(tmp_path / "resumed" / "adapters_rank0.pt")
    assert _max_diff(full, resumed) < 1e-6
    saved = load_file(tmp_path / "full" / "adapter" / "last" / "adapter_model.safetensors")
    assert len(saved) == 28 and all(v.device.type == "cpu" for v in saved.values())


def test_fsdp_conversion_adapts_and_shards_each_block_before_quantizing_the_next(tiny_llama):
    # A rank must never hold the whole 4-bit model unsharded (65B: ~35 GB): each block is finished and handed to
    # fully_shard as soon as its last linear is quantized, while the next block is still untouched.
    plugin = QLoRAPlugin(quant=QuantConfig(quant_storage="bf16"))
    reference = QLoRAPlugin(quant=QuantConfig(quant_storage="bf16"))
    reference.convert_module(copy.deepcopy(tiny_llama))  # the whole model at once, as on one device
    events = []
    for block in plugin.iter_converted_blocks(tiny_llama):
        if block.is_root:
            continue
        later = [m for n, m in iter_linears(tiny_llama) if n.startswith("model.layers.1.")]
        adapted = [m for m in block.module.modules() if isinstance(m, LoRALinear)]
        events.append((block.name, len(adapted), any(is_quantized_linear(m) for m in later),
                       {p.dtype for p in block.module.parameters() if not p.requires_grad}))
    assert [e[0] for e in events] == ["model.layers.0", "model.layers.1"]
    assert events[0][1] == 7 and events[0][2] is False  # block 0 adapted; block 1 not even quantized yet
    assert events[0][3] == {torch.bfloat16}  # packed bytes (bf16 storage) and norms, all in FSDP's dtype
    assert plugin.summary.adapted == reference.summary.adapted and len(plugin.summary.adapted) == 14
    assert plugin.summary.total_params == reference.summary.total_params
    assert plugin.summary.trainable_params == reference.summary.trainable_params
