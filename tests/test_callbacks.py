import errno
import json
from pathlib import Path

import pytest
import torch
from helpers import CausalLMModule, token_loader
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_qlora import AdapterCheckpoint, LoRAConfig, PeakMemoryMonitor, QLoRAPlugin, load_adapter
from lightning_qlora.lightning.callbacks import TrainingCurves
from lightning_qlora.lightning.callbacks.throughput import token_throughput_monitor


def _fit(tmp_path, callbacks, max_steps=6, config=None, logger=False, enable_progress_bar=False):
    module = CausalLMModule(config)
    trainer = Trainer(
        accelerator="cpu",
        strategy="qlora",
        plugins=[QLoRAPlugin(lora=LoRAConfig(r=4, dropout=0.0))],
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, token_loader())
    return module, trainer


def test_adapter_checkpoint_writes_peft_dirs_periodically_and_last(tmp_path, tiny_llama_config):
    callback = AdapterCheckpoint(dirpath=tmp_path / "adapters", every_n_train_steps=3)
    module, _ = _fit(tmp_path, [callback], config=tiny_llama_config)
    names = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert names == ["last", "step-000003", "step-000006"]
    last = tmp_path / "adapters" / "last"
    config = json.loads((last / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    base_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    adapter_bytes = (last / "adapter_model.safetensors").stat().st_size
    trainable_bytes = 4 * sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert adapter_bytes < trainable_bytes + 16_384  # adapters only, plus the header
    assert adapter_bytes < base_bytes
    assert callback.last_path == last
    # The saved adapter reproduces the trained model's outputs.
    fresh = CausalLMModule(tiny_llama_config)
    QLoRAPlugin(lora=LoRAConfig(r=4, dropout=0.0)).convert_module(fresh)
    load_adapter(fresh, last)
    ids = torch.randint(0, 128, (2, 8))
    module.model.eval(), fresh.model.eval()
    torch.testing.assert_close(fresh.model(ids).logits, module.model(ids).logits, atol=1e-5, rtol=0)


def test_adapter_checkpoint_failed_save_keeps_previous_adapter(tmp_path, tiny_llama_config, monkeypatch):
    callback = AdapterCheckpoint(dirpath=tmp_path / "adapters", every_n_train_steps=0)
    module, trainer = _fit(tmp_path, [callback], max_steps=2, config=tiny_llama_config)
    last = tmp_path / "adapters" / "last"
    before = (last / "adapter_model.safetensors").read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(1.0)
    with pytest.raises(OSError, match=r"adapter_model.safetensors: the disk is full.*previous files are intact"):
        callback.save(trainer, module, "last")
    monkeypatch.undo()
    assert (last / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["last"]
    assert sorted(p.name for p in last.iterdir()) == [  # no temporary file left behind
        "adapter_config.json", "adapter_model.safetensors"]


def test_adapter_checkpoint_rejects_negative_interval():
    with pytest.raises(ValueError, match=r"every_n_train_steps=-1 must be >= 0"):
        AdapterCheckpoint(every_n_train_steps=-1)


def test_peak_memory_on_cpu_logs_rss_and_summary(tmp_path, tiny_llama_config):
    monitor = PeakMemoryMonitor()
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, [monitor], config=tiny_llama_config, logger=logger)
    assert [step for step, _ in monitor.history] == [2, 4, 6]
    assert all(m["memory/peak_rss_gib"] > 0.05 for _, m in monitor.history)
    assert monitor.summary["memory/run_peak_rss_gib"] >= monitor.history[-1][1]["memory/peak_rss_gib"]
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "memory/peak_rss_gib" in metrics and "memory/run_peak_rss_gib" in metrics
    # strategy="qlora" also logs the conversion summary once at fit start.
    for key in ("qlora/layers_quantized", "qlora/trainable_params", "qlora/trainable_percent", "qlora/bits_per_param"):
        assert key in metrics


def test_throughput_reaches_the_logger_as_tokens_per_second(tmp_path, tiny_llama_config):
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, [token_throughput_monitor(window_size=2)], config=tiny_llama_config, logger=logger)
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "train/device/items_per_sec" in header  # items = tokens; one device, so no world-size total


def test_training_curves_png(tmp_path, tiny_llama_config):
    curves = TrainingCurves(path=tmp_path / "curves.png")
    _fit(tmp_path, [curves], config=tiny_llama_config)
    assert curves.steps == [1, 2, 3, 4, 5, 6] and len(curves.losses) == 6 and len(curves.memory_gib) == 6
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plain_progress_lines_when_nobody_watches_a_terminal(tmp_path, tiny_llama_config, caplog):
    import logging

    from lightning_qlora.lightning.callbacks import PlainProgress, progress_callback

    assert isinstance(progress_callback(interactive=False), PlainProgress)
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, [PlainProgress(every_n_steps=2)], max_steps=4, config=tiny_llama_config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert all("loss " in line and "tokens/s" in line and "elapsed" in line for line in lines), lines
    assert "left ~" in lines[0]


def test_the_bar_counts_steps_of_max_steps(tmp_path, tiny_llama_config):
    from lightning_qlora.lightning.callbacks import StepProgressBar, progress_callback

    bar = progress_callback(interactive=True)
    assert isinstance(bar, StepProgressBar)
    _fit(tmp_path, [bar], max_steps=3, config=tiny_llama_config, enable_progress_bar=True)
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.n == 3
    assert "tok/s" in bar.train_progress_bar.postfix
