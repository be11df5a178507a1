"""The Hydra app: composition, overrides, sweeps, and a short real end-to-end run of the default job."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from safetensors.torch import load_file

from lightning_qlora import LoRAConfig, QuantConfig
from lightning_qlora.lora.peft_format import read_adapter_metadata

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides):
    with initialize_config_module(config_module="lightning_qlora.app.conf", version_base="1.3"):
        return compose(config_name="config", overrides=["run_dir=/tmp/unused", *overrides])


def test_default_config_composes_to_the_documented_job():
    cfg = _compose([])
    assert cfg.model.name_or_path == "smollm2-135m-instruct"
    assert cfg.data.source == "jargon"
    assert cfg.trainer.strategy == "qlora"
    assert cfg.logger._target_ == "lightning_qlora.app.tracking.wandb_logger"
    assert cfg.quant.compute_dtype == "auto"
    quant, lora = instantiate(cfg.quant, compute_dtype="bf16"), instantiate(cfg.lora)
    assert isinstance(quant, QuantConfig) and (quant.quant_type, quant.double_quant, quant.blocksize) == ("nf4", True, 64)
    assert isinstance(lora, LoRAConfig) and (lora.r, lora.target_modules) == (16, "all-linear")


def test_overrides_compose():
    cfg = _compose(["lora.r=64", "quant.quant_type=fp4", "trainer.max_steps=50", "logger=csv"])
    assert instantiate(cfg.lora).r == 64
    assert instantiate(cfg.quant, compute_dtype="fp32").quant_type == "fp4"
    assert cfg.trainer.max_steps == 50
    assert cfg.logger._target_ == "lightning.pytorch.loggers.CSVLogger"
    assert _compose(["logger=none"]).logger is None
    assert _compose(["quant=none"]).quant.quant_type == "none"
    assert _compose(["experiment=smoke"]).trainer.max_steps == 8


def test_compile_override_reaches_the_plugin_as_a_mode():
    from lightning_qlora.app.cli import _compile_setting
    from lightning_qlora.lightning.plugin import QLoRAPlugin

    assert QLoRAPlugin(compile=_compile_setting(_compose([]).compile)).compile == "auto"
    assert QLoRAPlugin(compile=_compile_setting(_compose(["compile=false"]).compile)).compile is False
    assert QLoRAPlugin(compile=_compile_setting(_compose(["compile=true"]).compile)).compile is True
    plugin = QLoRAPlugin(compile=_compile_setting(_compose(["compile=reduce-overhead"]).compile))
    assert plugin.compile == {"mode": "reduce-overhead"}
    plugin = QLoRAPlugin(compile=_compile_setting(_compose(["compile={mode: max-autotune, dynamic: false}"]).compile))
    assert plugin.compile == {"mode": "max-autotune", "dynamic": False}
    with pytest.raises(TypeError, match="reduce-overhead"):
        QLoRAPlugin(compile=_compile_setting(_compose(["compile=fast"]).compile))


def test_memory_budget_is_checked_and_the_datamodule_says_its_batch_size_in_tokens():
    from lightning_qlora.app.validate import validate_app_config
    from lightning_qlora.config import ConfigError

    cfg = _compose(["memory_budget_gib=70", "data.max_tokens=4096", "data.batch_size=2"])
    validate_app_config(cfg)
    assert cfg.memory_budget_gib == 70 and _compose([]).memory_budget_gib is None
    datamodule = instantiate(cfg.data, tokenizer_path="unused")
    assert datamodule.max_batch_tokens == 2 * 4096
    with pytest.raises(ConfigError, match="memory_budget_gib='lots' must be a positive number of GiB or null"):
        validate_app_config(_compose(["memory_budget_gib=lots"]))


def test_override_typo_fails_with_hydras_message():
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'lora.rr'"):
        _compose(["lora.rr=8"])
    with pytest.raises(ConfigCompositionException, match=r"Could not find 'quant/nf5'"):
        _compose(["quant=nf5"])


def test_bad_value_from_hydra_gets_our_error():
    cfg = _compose(["lora.r=0", "lora.dropout=1.5"])
    with pytest.raises(Exception, match=r"r=0 must be > 0[\s\S]*dropout=1.5 must be in \[0, 1\)"):
        instantiate(cfg.lora)


def test_jsonl_data_requires_a_path():
    cfg = _compose(["data=jsonl"])
    with pytest.raises(Exception, match=r"Missing mandatory value: data.path"):
        instantiate(cfg.data, tokenizer_path="unused")


def _run_app(args, cwd, timeout=900):
    # (tests/ on the path: a test can add one of its callbacks, e.g. +callbacks.stop._target_=helpers.SignalAt)
    pythonpath = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, WANDB_MODE="", HYDRA_FULL_ERROR="1", PYTHONPATH=pythonpath)
    env.pop("WANDB_MODE")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_qlora", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_short_end_to_end_run_of_the_default_job(tmp_path, smollm2_path):
    result = _run_app(["experiment=smoke", "trainer.accelerator=cpu"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    results = json.loads((run_dir / "results.json").read_text())

    # Held-out perplexity clearly drops after a few steps.
    assert results["perplexity_after"] < 0.8 * results["perplexity_before"], results
    assert results["steps"] == 8
    assert 0 < results["trainable_percent"] < 10
    assert results["tokens_per_sec"] > 0
    assert results["peak_memory_gib"]["memory/run_peak_rss_gib"] > 0.2

    # The adapter in PEFT format, a few MB rather than the base's hundreds.
    adapter = Path(results["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert Path(config["base_model_name_or_path"]).is_dir()  # a path PEFT can load, not the app's alias
    assert 1 < results["adapter_mib"] < 40
    assert (run_dir / "adapter" / "step-000004").is_dir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # The Hydra config, the PNG, and an offline W&B run that `wandb sync` can upload.
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    png = Path(results["training_curves"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert results["wandb"]["mode"] == "offline"
    wandb_run = Path(results["wandb"]["run_dir"])
    assert wandb_run.name.startswith("offline-run-") and list(wandb_run.glob("run-*.wandb"))
    assert "wandb sync" in result.stdout and "held-out perplexity" in result.stdout
    # Paths and commands printed whole, to be copied (rich would cut them at 80 columns in a pipe).
    assert f"wandb sync {results['wandb']['run_dir']}" in result.stdout
    assert results["adapter_dir"] in result.stdout and results["training_curves"] in result.stdout
    output = result.stdout + result.stderr
    assert "Tip:" not in output  # Lightning's advertisement
    assert output.count("Calibrated ") == 1  # the calibration result, once
    assert "site-packages" not in "\n".join(line for line in output.splitlines() if "Warning" in line)

    # The answers before and after are printed side by side.
    assert len(results["answers"]) == 1 and results["answers"][0]["before"] != results["answers"][0]["after"]


@pytest.mark.slow
def test_the_app_runs_fully_sharded_on_two_processes(tmp_path, smollm2_two_blocks):
    # The README's multi-GPU command, on 2 CPU processes (gloo): Lightning's launcher re-runs the app per rank,
    # with the 8-bit AdamW that steps each rank's shard. (4 steps: that the sharded run equals one process is
    # test_fsdp's; here the app's path, its sharded evaluation and rank zero's report, on SmolLM2's first 2 blocks.)
    result = _run_app([f"model.name_or_path={smollm2_two_blocks}", "trainer.strategy=qlora_fsdp", "trainer.devices=2",
                       "trainer.accelerator=cpu",
                       "lora.init_lora_weights=default", "experiment=smoke", "trainer.max_steps=4",
                       "eval.sample_terms=0", "logger=csv", "model.optimizer=adamw8bit"],
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = list((tmp_path / "outputs").glob("*/*"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 4 and results["perplexity_after"] < 0.9 * results["perplexity_before"], results
    assert result.stdout.count("held-out perplexity") == 1  # rank zero reports, once
    tensors = load_file(Path(results["adapter_dir"]) / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2  # 2 blocks x 7 linears x (A, B), each whole (gathered), not one rank's shard
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (16, 1536)


@pytest.mark.slow
def test_the_app_calibrates_and_steps_in_backward(tmp_path, smollm2_two_blocks):
    """The two memory/fidelity options from the command line: GPTQ-calibrated codes and AdamW inside backward."""
    result = _run_app([f"model.name_or_path={smollm2_two_blocks}", "experiment=smoke", "trainer.max_steps=2", "eval.sample_terms=0", "eval.perplexity=false",
                       "logger=csv", "quant.calibration=gptq", "quant.calibration_samples=8",
                       "model.optimizer_in_backward=true", "trainer.gradient_clip_val=null"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPTQ codes for 14 linears" in result.stdout + result.stderr
    adapter = next(tmp_path.rglob("adapter_config.json")).parent
    metadata = read_adapter_metadata(adapter)
    assert metadata["quantization"]["calibration"] == "gptq"


def test_stepping_in_backward_with_clipping_accumulation_or_ddp_is_refused_before_anything_loads(tmp_path):
    from lightning_qlora.app.validate import validate_app_config
    from lightning_qlora.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        validate_app_config(_compose(["model.optimizer_in_backward=true", "+trainer.accumulate_grad_batches=4",
                                      "trainer.strategy=qlora_ddp"]))
    message = str(caught.value)
    for expected in ("trainer.gradient_clip_val=1.0", "must be null", "trainer.accumulate_grad_batches=4 must be 1",
                     "needs trainer.strategy=qlora: qlora_ddp"):
        assert expected in message, message
    validate_app_config(_compose(["model.optimizer_in_backward=true", "trainer.gradient_clip_val=null"]))
    # Through the app: the refusal comes from the config check, in seconds, with no run directory left behind.
    refused = _run_app(["experiment=smoke", "model.optimizer_in_backward=true"], cwd=tmp_path)
    assert refused.returncode != 0 and "trainer.gradient_clip_val=1.0" in refused.stderr, refused.stderr[-2000:]
    assert "Converting" not in refused.stderr and not list(tmp_path.rglob("results.json"))


def test_sweep_runs_one_job_per_value(tmp_path, smollm2_two_blocks):
    result = _run_app(
        ["-m", "lora.r=4,8", "experiment=smoke", f"model.name_or_path={smollm2_two_blocks}", "trainer.max_steps=2", "eval.perplexity=false",
         "eval.sample_terms=0", "logger=csv", "trainer.accelerator=cpu",
         "lora.init_lora_weights=default"],  # (no calibration pass per job: the sweep is what is tested)
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = sorted(
        json.loads((p / "adapter_config.json").read_text())["r"] for p in tmp_path.glob("multirun/*/*/*/adapter/last")
    )
    assert ranks == [4, 8]
    # Runs are named by what the sweep varies, and one table covers them all.
    (sweep_dir,) = tmp_path.glob("multirun/*/*")
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0_r=4", "1_r=8"]
    table = (sweep_dir / "summary.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| run | lora.r | ppl before | ppl after | steps | tokens/s")
    assert lines[2].startswith("| 0_r=4 | 4 |") and lines[3].startswith("| 1_r=8 | 8 |") and "| 2 |" in lines[3]
    assert str(sweep_dir / "summary.md") in result.stdout
    assert len(json.loads((sweep_dir / "summary.json").read_text())) == 2


def test_cpu_threads_leave_the_cores_other_processes_use(monkeypatch):
    import torch

    from lightning_qlora.app.threads import busy_cores, choose_cpu_threads, free_cores, usable_cores

    assert [free_cores(2, load) for load in (0.0, 0.6, 1.4, 2.0, 7.5)] == [2, 1, 1, 1, 1]
    assert free_cores(16, 3.2) == 13
    assert 0.0 <= busy_cores(usable_cores(), window_s=0.05) <= len(usable_cores())
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr("lightning_qlora.app.threads.busy_cores", lambda cores: 1.0)
        monkeypatch.setattr("lightning_qlora.app.threads.usable_cores", lambda: {0, 1})
        assert choose_cpu_threads("auto") == 1 and torch.get_num_threads() == 1
        assert choose_cpu_threads(2) == 2 and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert choose_cpu_threads("auto") is None  # the user's choice stands
        assert choose_cpu_threads(None) is None
        with pytest.raises(ValueError, match="cpu_threads=0 must be auto, null or a positive integer"):
            choose_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_sweep_directory_names_are_short_and_distinct():
    from lightning_qlora.app.sweep import MAX_DIRNAME, sweep_dirname, swept_keys

    command = ["lora.r=4,8", "quant=nf4,fp4", "experiment=smoke", "trainer.max_steps=2", "+data.extra=range(1,3)"]
    assert swept_keys(command) == {"lora.r", "quant", "data.extra"}
    assert sweep_dirname(["lora.r=4", "quant=fp4", "trainer.max_steps=2"], {"lora.r", "quant"}) == "r=4,quant=fp4"
    # Nothing known of the sweep: every override, cut to a bounded length with a hash that keeps runs apart.
    many = [f"trainer.setting_number_{i}=value_{i}" for i in range(8)]
    first, second = sweep_dirname([*many, "lora.r=4"], set()), sweep_dirname([*many, "lora.r=8"], set())
    assert len(first) <= MAX_DIRNAME and len(second) <= MAX_DIRNAME and first != second


def test_a_run_that_fails_before_writing_anything_leaves_no_directory(tmp_path, smollm2_path):
    result = _run_app(["data=jsonl", f"data.path={tmp_path / 'missing.jsonl'}", "logger=csv"], cwd=tmp_path)
    assert result.returncode != 0 and "missing.jsonl' does not exist" in result.stderr
    assert not list((tmp_path / "outputs").glob("*/*"))
    assert "removed its directory" in result.stdout + result.stderr


def test_config_files_ship_inside_the_wheel(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("lightning_qlora-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("lightning_qlora/app/conf/config.yaml", "lightning_qlora/app/conf/quant/nf4.yaml",
                     "lightning_qlora/app/conf/experiment/smoke.yaml", "lightning_qlora/app/conf/__init__.py"):
        assert required in names


@pytest.mark.slow
def test_example_script_runs(tmp_path, smollm2_two_blocks):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "qlora_in_your_own_code.py"), "--max-steps", "2", "--out", str(tmp_path),
         "--model", smollm2_two_blocks],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # r 8 on the 7 linears of each of the 2 blocks (the whole SmolLM2: 2,442,240 over 30 blocks)
    assert "PEFT loaded the adapter: 162,816 LoRA parameters" in result.stdout


def test_sigterm_saves_the_run_exits_nonzero_and_resume_continues_it(tmp_path, smollm2_two_blocks):
    common = ["experiment=smoke", f"model.name_or_path={smollm2_two_blocks}", "trainer.accelerator=cpu", "lora.init_lora_weights=default", "logger=none",
              "eval.sample_terms=0", "eval.perplexity=false", "trainer.max_steps=6",
              "callbacks.resume_checkpoint.every_n_train_steps=100"]
    stopped = _run_app([*common, "+callbacks.stop._target_=helpers.SignalAt", "+callbacks.stop.step=3"], cwd=tmp_path)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run_dir = next((tmp_path / "outputs").glob("*/*"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["interrupted"] and results["steps"] == 4
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert results["resume_command"] == f"lightning-qlora resume={checkpoint}"
    assert (run_dir / "adapter" / "last" / "adapter_model.safetensors").is_file()
    resumed = _run_app([*common, "resume=last"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    second = max((tmp_path / "outputs").glob("*/*"), key=lambda p: p.stat().st_mtime)
    results = json.loads((second / "results.json").read_text())
    assert results["steps"] == 6 and results["resumed_from"] == str(checkpoint.resolve())


def test_wrong_types_in_the_whole_config_are_listed_before_anything_loads():
    from lightning_qlora.app.validate import validate_app_config
    from lightning_qlora.config import ConfigError

    cfg = _compose(["trainer.max_steps=abc", "data.max_length=abc", "data.batch_size=abc", "data.val_size=abc",
                    "model.lr=abc", "seed=abc", "data.batch_size=0", "cpu_threads=many"])
    with pytest.raises(ConfigError) as caught:
        validate_app_config(cfg)
    message = str(caught.value)
    for expected in ("trainer.max_steps='abc' must be an integer", "data.max_length='abc' must be an integer",
                     "data.batch_size=0 must be a positive integer", "data.val_size='abc' must be an integer",
                     "model.lr='abc' must be a number", "seed='abc' must be an integer",
                     "cpu_threads='many' must be auto, null or a positive integer"):
        assert expected in message, message
    validate_app_config(_compose([]))  # the defaults pass
    validate_app_config(_compose(["trainer.gradient_clip_val=null", "data.limit_train=null", "logger=none"]))
