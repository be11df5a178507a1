"""The fault matrix (README, Troubleshooting): each row a test."""

import errno
import sys
import time

import pytest
import torch
from helpers import RegressionModule, fast_trainer, regression_loader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_qlora import AdapterCheckpoint, ConfigError, LoRAConfig, QLoRAPlugin, QuantConfig, load_adapter
from lightning_qlora._imports import BitsandbytesUnavailableError, import_bitsandbytes
from lightning_qlora.app.tracking import wandb_mode
from lightning_qlora.lightning.callbacks import NoAdapterGradientError, NonFiniteLossError, TrainingGuard
from lightning_qlora.lightning.checkpoint_io import AtomicCheckpointIO, CheckpointLoadError
from lightning_qlora.lora import LoRALinear


class PoisonedModule(RegressionModule):
    """Returns a NaN loss on one batch, as a corrupt sample would."""

    def __init__(self, poison_batch: int) -> None:
        super().__init__()
        self.poison_batch = poison_batch

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx == self.poison_batch else loss


def _adapter_weights(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


# -- bitsandbytes missing or too old -------------------------------------------------------------------------------

def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    import_bitsandbytes.cache_clear()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    try:
        with pytest.raises(BitsandbytesUnavailableError, match=r"Install it with: pip install 'bitsandbytes>=0.45'"):
            import_bitsandbytes()
    finally:
        import_bitsandbytes.cache_clear()


def test_old_bitsandbytes_is_refused(monkeypatch):
    import bitsandbytes

    import_bitsandbytes.cache_clear()
    monkeypatch.setattr(bitsandbytes, "__version__", "0.41.1")
    try:
        with pytest.raises(BitsandbytesUnavailableError, match=r"bitsandbytes 0.41.1 is too old.*Upgrade with"):
            import_bitsandbytes()
    finally:
        import_bitsandbytes.cache_clear()


# -- CUDA asked for, none present -----------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_gpu_is_a_clear_error():
    with pytest.raises(MisconfigurationException, match=r"`CUDAAccelerator` can not run on your system since the accelerator is not available"):
        fast_trainer(accelerator="cuda", plugins=[QLoRAPlugin()])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_auto_accelerator_falls_back_to_cpu_with_one_warning(monkeypatch):
    import lightning_qlora.lightning.strategies.mixin as mixin

    monkeypatch.setattr(mixin, "_warned_cpu", False)
    with pytest.warns(UserWarning, match=r"QLoRA is running on the CPU") as record:
        for _ in range(2):
            fast_trainer(accelerator="auto", strategy="qlora", max_steps=1).fit(RegressionModule(), regression_loader())
    assert sum("running on the CPU" in str(w.message) for w in record) == 1


# -- NaN / inf loss -------------------------------------------------------------------------------------------------

def test_nan_loss_stops_with_step_and_batch_and_keeps_last_good_adapter(tmp_path):
    module = PoisonedModule(poison_batch=3)
    adapters = AdapterCheckpoint(tmp_path / "adapters", every_n_train_steps=1)
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[TrainingGuard(), adapters])
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at optimizer step 3, batch index 3"):
        trainer.fit(module, regression_loader())
    assert trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in _adapter_weights(module).values())
    good = RegressionModule()
    QLoRAPlugin(lora=LoRAConfig(r=4)).convert_module(good)
    load_adapter(good, tmp_path / "adapters" / "last", strict=False)
    for name, weight in _adapter_weights(good).items():
        torch.testing.assert_close(weight, _adapter_weights(module)[name])  # the last good adapter is on disk


def test_nan_loss_can_be_skipped():
    module = PoisonedModule(poison_batch=2)
    guard = TrainingGuard(on_nan="skip")
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[guard], max_steps=6)
    with pytest.warns(UserWarning, match=r"Skipping a batch: the loss is nan at optimizer step 2, batch index 2"):
        trainer.fit(module, regression_loader())
    assert guard.skipped == [(2, 2)]
    assert all(torch.isfinite(p).all() for p in _adapter_weights(module).values())


# -- gradients never reach the adapters -------------------------------------------------------------------------------

def test_gradients_that_never_reach_adapters_are_detected_in_the_first_steps():
    """Recreates the CPU generate()-before-training trap with bitsandbytes' own layer, which our layer avoids."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU lacks AVX512-BF16: bitsandbytes never switches to the inference layout here")

    module = RegressionModule()
    module.model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    QLoRAPlugin(lora=LoRAConfig(r=4)).convert_module(module)
    for layer in module.model:
        if isinstance(layer, LoRALinear):
            raw = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.bfloat16,
                                    quant_type="nf4")
            layer.base_layer = raw.to("cpu").eval()
            with torch.no_grad():
                raw(torch.randn(1, layer.in_features, dtype=torch.bfloat16))  # the generate() call
    losses_before = len(module.losses)
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[TrainingGuard()])
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 64, generator=generator), torch.randn(64, 64, generator=generator))
    with pytest.raises(NoAdapterGradientError, match=r"Only 1 of 3 LoRA adapters received a gradient at step 0"):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert len(module.losses) == losses_before + 1  # caught on the first step, not hours later


# -- Lightning checkpoints: killed/full-disk writes, corrupted files ------------------------------------------------

def test_full_disk_while_checkpointing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def full_disk(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"Could not write checkpoint .*last.ckpt: the disk is full. The previous"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_checkpoint_is_refused_with_name_and_reason(tmp_path, damage):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2)
    fast_trainer(strategy="qlora", max_steps=2, callbacks=[ckpt], enable_checkpointing=True).fit(
        RegressionModule(), regression_loader()
    )
    path = tmp_path / "last.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"not a checkpoint at all")
    trainer = fast_trainer(strategy="qlora", max_steps=4)
    with pytest.raises(CheckpointLoadError, match=r"Checkpoint .*last.ckpt cannot be loaded: (truncated or corrupted|not a valid)"):
        trainer.fit(RegressionModule(), regression_loader(), ckpt_path=str(path))


# -- W&B without a key or without a network -------------------------------------------------------------------------

def test_wandb_goes_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"


def test_wandb_goes_offline_when_server_unreachable(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    assert wandb_mode("auto") == "offline"
    assert time.monotonic() - started < 10


# -- config validation, fuzzed ---------------------------------------------------------------------------------------

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=12), st.lists(st.text(max_size=6), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(r=_ANY, alpha=_ANY, dropout=_ANY, target=_ANY, rslora=_ANY)
def test_random_lora_configs_fail_only_with_our_error(r, alpha, dropout, target, rslora):
    try:
        config = LoRAConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target, use_rslora=rslora)
    except ConfigError as err:
        assert str(err).startswith("LoRAConfig has ") and err.problems
    else:
        assert config.r > 0 and config.alpha > 0 and 0 <= config.dropout < 1


@settings(max_examples=300, deadline=None)
@given(quant_type=_ANY, double_quant=_ANY, compute_dtype=_ANY, blocksize=_ANY, skip=_ANY)
def test_random_quant_configs_fail_only_with_our_error(quant_type, double_quant, compute_dtype, blocksize, skip):
    try:
        QuantConfig(quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype,
                    blocksize=blocksize, skip_modules=skip)
    except ConfigError as err:
        assert str(err).startswith("QuantConfig has ") and err.problems


# -- out of GPU memory -----------------------------------------------------------------------------------------------

class GreedyModule(RegressionModule):
    """Asks for far more GPU memory than exists, as an oversized batch would."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        waste = torch.empty(2**41, dtype=torch.uint8, device=loss.device)  # 2 TiB
        return loss + waste[:1].float().sum() * 0


@pytest.mark.gpu
def test_out_of_gpu_memory_names_the_peak_and_the_remedies():
    from lightning_qlora.lightning.oom import QLoRAOutOfMemoryError

    trainer = fast_trainer(accelerator="cuda", strategy="qlora", max_steps=2)
    with pytest.raises(QLoRAOutOfMemoryError, match=r"CUDA ran out of memory in the forward pass at step 0 on .*: "
                                                     r"peak allocated \d+\.\d+ GiB of \d+\.\d GiB. To lower it: a smaller batch"):
        trainer.fit(GreedyModule(), regression_loader())


_KILL_DURING_CKPT = r"""
import os, signal, sys, torch
from lightning_qlora.lightning.checkpoint_io import AtomicCheckpointIO
real = torch.save
def save_half_then_die(obj, handle, *args, **kwargs):
    handle.write(b"PK\x03\x04 half a checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, sys.argv[1])
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    import subprocess

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    result = subprocess.run([sys.executable, "-c", _KILL_DURING_CKPT, str(path)], timeout=120)
    assert result.returncode == -9
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the next save cleans the half-written file


class PoisonedGradientModule(RegressionModule):
    """A finite loss whose gradient is NaN on one batch (an overflow in backward)."""

    def __init__(self, poison_batch: int, lr: float = 1e-2) -> None:
        super().__init__(lr=lr)
        self.poison_batch = poison_batch

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x).float()
        if batch_idx == self.poison_batch:
            out.register_hook(lambda grad: grad * float("nan"))
        loss = nn.functional.mse_loss(out, y.float())
        self.losses.append(loss.item())
        return loss


def test_nan_gradients_with_a_finite_loss_stop_before_the_update_and_keep_the_last_good_adapter(tmp_path):
    module = PoisonedGradientModule(poison_batch=3)
    adapters = AdapterCheckpoint(tmp_path / "adapters", every_n_train_steps=1)
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[TrainingGuard(), adapters])
    with pytest.raises(NonFiniteLossError, match=r"gradients of \d+ adapter tensor\(s\) hold NaN or inf at optimizer "
                                                 r"step 3 although the loss is finite.*lr="):
        trainer.fit(module, regression_loader())
    assert all(torch.isfinite(p).all() for p in _adapter_weights(module).values())
    good = RegressionModule()
    QLoRAPlugin(lora=LoRAConfig(r=4)).convert_module(good)
    load_adapter(good, tmp_path / "adapters" / "last", strict=False)
    for name, weight in _adapter_weights(good).items():
        torch.testing.assert_close(weight, _adapter_weights(module)[name])


def test_nan_gradients_can_be_skipped_too(tmp_path):
    module = PoisonedGradientModule(poison_batch=2)
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[TrainingGuard(on_nan="skip")],
                           max_steps=6)
    with pytest.warns(UserWarning, match=r"Skipping a batch: the gradients of"):
        trainer.fit(module, regression_loader())
    assert all(torch.isfinite(p).all() for p in _adapter_weights(module).values())


def test_a_diverging_learning_rate_is_named_not_taken_for_missing_gradients(tmp_path):
    module = RegressionModule(lr=1e6)
    trainer = fast_trainer(plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], callbacks=[TrainingGuard()], max_steps=10)
    with pytest.raises(NonFiniteLossError, match=r"(lr=1000000.0|learning rate)"):
        trainer.fit(module, regression_loader())


# -- adapters and checkpoints that must be refused, by name ----------------------------------------------------------

def _saved_adapter(tmp_path):
    from lightning_qlora import inject_lora, save_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(model, LoRAConfig(r=4))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _fresh():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def _edit_config(directory, **fields):
    import json

    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(fields)
    (directory / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "eva", "lora_ga"])
def test_adapters_trained_on_a_rewritten_base_are_refused(tmp_path, init):
    from lightning_qlora.lora import AdapterFormatError

    directory = _saved_adapter(tmp_path)
    _edit_config(directory, init_lora_weights=init)
    with pytest.raises(AdapterFormatError, match=rf"init_lora_weights='{init}' trains an adapter for a base that PEFT "
                                                 r"rewrote.*path_initial_model_for_weight_conversion"):
        load_adapter(_fresh(), directory)


@pytest.mark.parametrize(("value", "expected"), [
    (torch.ones(4, 32, dtype=torch.int32), r"has dtype torch.int32; adapter weights are floating point"),
    (torch.full((4, 32), float("nan")), r"holds NaN or inf"),
    (torch.full((4, 32), float("inf")), r"holds NaN or inf"),
], ids=["int", "nan", "inf"])
def test_adapter_tensors_that_are_not_finite_floats_are_refused(tmp_path, value, expected):
    from safetensors.torch import load_file, save_file

    from lightning_qlora.lora import AdapterFormatError

    directory = _saved_adapter(tmp_path)
    weights = directory / "adapter_model.safetensors"
    state = load_file(weights)
    key = "base_model.model.0.lora_A.weight"
    state[key] = value
    save_file(state, weights)
    with pytest.raises(AdapterFormatError, match=rf"tensor '{key}' " + expected):
        load_adapter(_fresh(), directory)


def test_damaged_adapter_configs_and_metadata_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from lightning_qlora.lora import AdapterFormatError

    directory = _saved_adapter(tmp_path)
    _edit_config(directory, target_modules=5)
    with pytest.raises(AdapterFormatError, match=r"target_modules=5 must be a list of module names or a string"):
        load_adapter(_fresh(), directory)
    (directory / "adapter_config.json").write_bytes(b'{"r": 4, "lora_alpha": "\xe9t\xe9"}')
    with pytest.raises(AdapterFormatError, match=r"adapter_config.json is not UTF-8 text"):
        load_adapter(_fresh(), directory)
    directory = _saved_adapter(tmp_path / "second")
    weights = directory / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"lightning_qlora": "[1, 2]"})
    with pytest.raises(AdapterFormatError, match=r"'lightning_qlora' metadata must be a JSON object, got list"):
        load_adapter(_fresh(), directory)
    save_file(load_file(weights), weights, metadata={"lightning_qlora": "not json"})
    with pytest.raises(AdapterFormatError, match=r"'lightning_qlora' metadata is not JSON"):
        load_adapter(_fresh(), directory)


def test_the_export_command_names_a_broken_adapter(tmp_path):
    import subprocess

    directory = _saved_adapter(tmp_path)
    (directory / "adapter_config.json").write_text("{not json")
    result = subprocess.run([sys.executable, "-m", "lightning_qlora.tools.export", "--adapter", str(directory),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "adapter_config.json is not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_checkpoints_that_are_not_lightning_ones_are_named(tmp_path):
    io = AtomicCheckpointIO()
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with pytest.raises(CheckpointLoadError, match=r"tensor.ckpt is not a Lightning checkpoint \(it holds Tensor\)"):
        io.load_checkpoint(tmp_path / "tensor.ckpt")
    with pytest.raises(CheckpointLoadError, match=r"is a directory, not a .ckpt file: point at a file in it"):
        io.load_checkpoint(tmp_path)
    torch.save({"weight": torch.zeros(3)}, tmp_path / "plain.ckpt")  # a plain state dict, resumed by a Trainer
    trainer = fast_trainer(strategy="qlora", plugins=[QLoRAPlugin(lora=LoRAConfig(r=4))], max_steps=1)
    with pytest.raises(CheckpointLoadError, match=r"plain.ckpt is not a Lightning checkpoint \(it holds a plain dict"):
        trainer.fit(RegressionModule(), regression_loader(), ckpt_path=str(tmp_path / "plain.ckpt"))


def test_checkpoints_load_weights_only_even_when_the_environment_asks_otherwise(tmp_path, monkeypatch):
    import pathlib

    checkpoint = {"state_dict": {}, "pytorch-lightning_version": "2.6.0", "hyper_parameters": {"p": pathlib.Path("x")}}
    torch.save(checkpoint, tmp_path / "trusted.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    io = AtomicCheckpointIO()
    with pytest.raises(CheckpointLoadError, match=r"holds Python objects beyond tensors.*weights_only=False"):
        io.load_checkpoint(tmp_path / "trusted.ckpt")
    assert io.load_checkpoint(tmp_path / "trusted.ckpt", weights_only=False)["hyper_parameters"]["p"].name == "x"


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"instruction": "caf\xe9", "response": "ok"}\n', r"data.jsonl:1: not UTF-8 text .*iconv"),
    (b'{"instruction": "ok", "response": "fine"}\n{"instruction": "\\ud800", "response": "x"}\n',
     r"data.jsonl:2: 'instruction' holds a lone surrogate escape"),
], ids=["latin-1", "lone-surrogate"])
def test_jsonl_encoding_problems_are_named_with_file_and_line(tmp_path, content, expected):
    from lightning_qlora.app.data import DataFormatError, load_jsonl

    from lightning_qlora.app.data.sources import load_rows

    (tmp_path / "data.jsonl").write_bytes(content)
    with pytest.raises(DataFormatError, match=expected):
        load_jsonl(tmp_path / "data.jsonl")
    with pytest.raises(DataFormatError, match=expected):  # the chat data path names it the same way
        load_rows(tmp_path / "data.jsonl")
