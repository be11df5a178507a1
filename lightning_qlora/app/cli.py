"""``lightning-qlora``: the Hydra app that runs a QLoRA fine-tune from ``conf/`` (the default job needs no network).

lightning-qlora                                         # SmolLM2-135M-Instruct on the Jargon File, offline
lightning-qlora lora.r=64 quant.quant_type=fp4 trainer.max_steps=50 logger=csv
lightning-qlora -m lora.r=4,8                           # a sweep, one run directory per value
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_qlora.app.sweep import register_resolver

log = logging.getLogger("lightning_qlora")
register_resolver()  # before Hydra resolves a sweep job's directory name
# What makes a run directory worth keeping after a failure: anything a user could resume from, load or read.
_RUN_OUTPUTS = ("*.ckpt", "*.safetensors", "results.json", "*.png")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Console-script entry point; returns the held-out perplexity after training (for sweepers)."""
    try:
        results = run(cfg)
    except BaseException:
        _drop_empty_run_dir(Path(cfg.run_dir))
        raise
    return float(results["perplexity_after"] if results["perplexity_after"] is not None else math.nan)


def _drop_empty_run_dir(run_dir: Path) -> None:
    """A run that failed before writing anything of use leaves no directory behind (only Hydra's config copy, a log
    and an empty logger folder would be there); one with a checkpoint, adapter or results stays whole.
    """
    import shutil
    import sys

    if not run_dir.is_dir() or any(next(run_dir.rglob(pattern), None) for pattern in _RUN_OUTPUTS):
        return
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=1)  # its files are inside the directory about to go
    shutil.rmtree(run_dir, ignore_errors=True)
    log.info("The run failed before writing a checkpoint, adapter or results: removed its directory %s", run_dir)


def _compile_setting(value: Any) -> Any:
    """The app's ``compile`` value for ``QLoRAPlugin(compile=...)``: false/true, a torch.compile mode name, or a
    mapping of torch.compile arguments (the plugin refuses anything else, listing the modes).
    """
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    return False if value is None else value


def _compute_dtype(value: Any, on_cpu: bool) -> Any:
    """``quant.compute_dtype``, with ``auto`` (the default) resolved for the device the run uses and logged."""
    if value != "auto":
        return value
    from lightning_qlora.hardware import preferred_compute_dtype

    dtype, reason = preferred_compute_dtype("cpu" if on_cpu else "cuda")
    log.info("Compute dtype %s (quant.compute_dtype=auto; set bf16, fp16 or fp32 to choose)", reason)
    return dtype


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one fine-tune described by ``cfg`` and return (and write to ``results.json``) what it measured."""
    _quiet_known_noise()
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_qlora.app.models.pretrained import resolve_pretrained
    from lightning_qlora.app.threads import choose_cpu_threads
    from lightning_qlora.app.validate import validate_app_config
    from lightning_qlora.lightning.callbacks import AdapterCheckpoint, PeakMemoryMonitor, TrainingCurves
    from lightning_qlora.lightning.interruption import interrupted_checkpoint_path
    from lightning_qlora.lightning.plugin import QLoRAPlugin
    from lightning_qlora.lora.peft_format import adapter_state_dict, save_adapter

    # Validate the cheap things before loading anything: a bad LoRA/quant value fails here, in a second.
    validate_app_config(cfg)
    on_cpu = not torch.cuda.is_available() or cfg.trainer.get("accelerator") == "cpu"
    if on_cpu:
        choose_cpu_threads(cfg.get("cpu_threads", "auto"))
    quant = instantiate(cfg.quant, compute_dtype=_compute_dtype(cfg.quant.get("compute_dtype"), on_cpu))
    lora = instantiate(cfg.lora)
    seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    model_path = resolve_pretrained(cfg.model.name_or_path)
    datamodule = instantiate(cfg.data, tokenizer_path=model_path)
    module = instantiate(cfg.model, name_or_path=model_path)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    bar_wanted = cfg.trainer.get("enable_progress_bar", True) is not False
    if not bar_wanted:  # the user switched bars off: keep the plain lines, drop a bar
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    has_bar = any(isinstance(c, ProgressBar) for c in callbacks)
    logger: Any = instantiate(cfg.logger) if cfg.get("logger") else False
    plugin = QLoRAPlugin(quant=quant, lora=lora, compile=_compile_setting(cfg.get("compile", False)),
                         memory_budget_gib=cfg.get("memory_budget_gib"))
    resume = resume_checkpoint(cfg.get("resume"))
    if resume is not None:
        plugin.restore_adapters_from_checkpoint()  # the checkpoint's adapters replace any initial ones
    trainer = instantiate(
        cfg.trainer, plugins=[plugin], callbacks=callbacks, logger=logger, enable_progress_bar=has_bar and bar_wanted
    )
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    datamodule.setup("fit")
    samples = datamodule.val_examples[: cfg.eval.sample_terms]
    results: dict[str, Any] = {"run_dir": str(run_dir), "model": cfg.model.name_or_path, "data": datamodule.describe()}

    # Validation also sets the model up (quantize + inject) so that the "before" answers come from the 4-bit base.
    before_ppl = _validate(trainer, module, datamodule) if (cfg.eval.perplexity or samples) and not resume else None
    results["perplexity_before"] = before_ppl if cfg.eval.perplexity else None
    before = module.generate_answers(
        datamodule.tokenizer, [s.prompt_messages for s in samples], cfg.eval.max_new_tokens
    )
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule, ckpt_path=str(resume) if resume else None)
    except SIGTERMException:
        if trainer.is_global_zero:  # the strategy saved the step reached; say where, and exit non-zero
            checkpoint = interrupted_checkpoint_path(trainer)
            results.update(interrupted=True, steps=trainer.global_step, resume_checkpoint=str(checkpoint),
                           resume_command=f"lightning-qlora resume={checkpoint}")
            (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        raise
    fit_seconds = time.perf_counter() - started
    results["resumed_from"] = str(resume) if resume else None
    results["perplexity_after"] = _validate(trainer, module, datamodule) if cfg.eval.perplexity else None
    curves_callback = _find(callbacks, TrainingCurves)
    if curves_callback is not None and curves_callback.path and curves_callback.steps and trainer.is_global_zero:
        curves_callback.write(curves_callback.path)  # again, with the validation after training
    after = module.generate_answers(
        datamodule.tokenizer, [s.prompt_messages for s in samples], cfg.eval.max_new_tokens
    )

    adapter_cb = _find(callbacks, AdapterCheckpoint)
    adapter_dir = adapter_cb.last_path if adapter_cb and adapter_cb.last_path else None
    if adapter_dir is None:
        state = adapter_state_dict(module)  # every rank: under FSDP the adapters are gathered collectively
        adapter_dir = run_dir / "adapter"
        if trainer.is_global_zero:
            save_adapter(module, adapter_dir, metadata={"global_step": trainer.global_step}, state=state)
        trainer.strategy.barrier("lightning-qlora adapter")
    memory = _find(callbacks, PeakMemoryMonitor)
    curves = _find(callbacks, TrainingCurves)
    summary = plugin.summary
    results.update(
        steps=trainer.global_step,
        fit_seconds=round(fit_seconds, 2),
        tokens_per_sec=round(module.train_tokens / fit_seconds, 1) if fit_seconds > 0 else None,
        trainable_params=summary.trainable_params if summary else None,
        total_params=summary.total_params if summary else None,
        trainable_percent=round(summary.trainable_percent, 4) if summary else None,
        peak_memory_gib={k: round(v, 4) for k, v in (memory.summary if memory else {}).items()},
        adapter_dir=str(adapter_dir),
        adapter_mib=round(sum(f.stat().st_size for f in Path(adapter_dir).iterdir()) / 2**20, 3),
        training_curves=str(curves.path) if curves and curves.path and curves.path.exists() else None,
        answers=[
            {"prompt": _last_user_turn(s.prompt_messages), "reference": s.reference, "before": b, "after": a}
            for s, b, a in zip(samples, before, after, strict=False)
        ],
    )
    if not trainer.is_global_zero:
        return results  # with several processes, rank zero writes and prints
    if logger:
        results["wandb"] = _finish_wandb(logger, results, Path(adapter_dir))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _print_report(results)
    return results


def _last_user_turn(messages: list[dict[str, Any]]) -> str:
    return next((str(m["content"]) for m in reversed(messages) if m["role"] == "user"), "")


def resume_checkpoint(value: Any) -> Path | None:
    """The checkpoint ``resume=`` names: a ``.ckpt`` path, or ``last`` for the newest ``last.ckpt`` of the runs
    under ``outputs/`` and ``multirun/`` (what an interrupted run saved).

    Raises:
        FileNotFoundError: when there is no such checkpoint, naming where it looked.
    """
    if value in (None, "", False):
        return None
    if str(value) == "last":
        found = [p for root in ("outputs", "multirun") for p in Path(root).glob("**/checkpoints/last.ckpt")]
        if not found:
            raise FileNotFoundError(
                "resume=last found no checkpoints/last.ckpt under outputs/ or multirun/ here. Pass the path: "
                "resume=outputs/<date>/<time>/checkpoints/last.ckpt"
            )
        return max(found, key=lambda p: p.stat().st_mtime).resolve()
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"resume={value}: no such checkpoint file. Point it at a run's checkpoints/last.ckpt.")
    return path.resolve()


def _quiet_known_noise() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes suggests installing `kernels` (a hub download) for a CPU kernel it already has a fallback for.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # ThroughputMonitor asks for FLOPs per batch to report MFU; tokens/s is what this app reports.
    warnings.filterwarnings("ignore", message=".*you need to define a `flops_per_batch`.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    # Lightning advertises a logging service at every fit; the app already logs to W&B or CSV.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    # A warning is a sentence for the user, not a site-packages path and line number.
    warnings.formatwarning = _warning_line


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def _warning_line(message: Any, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"{category.__name__}: {message}\n"


def _validate(trainer: Any, module: Any, datamodule: Any) -> float:
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)
    return round(float(metrics[0]["val/perplexity"]), 4)


def _find(callbacks: list[Any], kind: type) -> Any:
    return next((c for c in callbacks if isinstance(c, kind)), None)


def _finish_wandb(logger: Any, results: dict[str, Any], adapter_dir: Path) -> dict[str, Any] | None:
    from lightning.pytorch.loggers import WandbLogger

    metrics = {
        k: results[k]
        for k in ("perplexity_before", "perplexity_after", "tokens_per_sec", "trainable_params", "total_params")
        if results.get(k) is not None
    }
    logger.log_metrics({f"summary/{k}": v for k, v in metrics.items()}, step=results["steps"])
    if not isinstance(logger, WandbLogger):
        return None
    import wandb

    run = logger.experiment
    logger.log_text(
        key="answers",
        columns=["prompt", "reference", "before", "after"],
        data=[[a["prompt"], a["reference"], a["before"], a["after"]] for a in results["answers"]],
    )
    artifact = wandb.Artifact(name=f"adapter-{run.id}", type="model", metadata=metrics)
    artifact.add_dir(str(adapter_dir))
    run.log_artifact(artifact)
    offline = run.settings.mode in ("offline", "dryrun") or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    run_path = Path(run.dir).parent
    run.finish()
    return {"mode": "offline" if offline else "online", "run_dir": str(run_path), "id": run.id}


def _print_report(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="QLoRA fine-tune", show_header=False)
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    ppl_b, ppl_a = results["perplexity_before"], results["perplexity_after"]
    if ppl_b is not None and ppl_a is not None:
        table.add_row("held-out perplexity", f"{ppl_b:.2f} -> {ppl_a:.2f} ({100 * (ppl_a - ppl_b) / ppl_b:+.1f}%)")
    table.add_row("steps", f"{results['steps']} in {results['fit_seconds']:.1f} s")
    table.add_row("tokens/s (training)", f"{results['tokens_per_sec']}")
    if results["trainable_params"] is not None:
        table.add_row(
            "trainable / total params",
            f"{results['trainable_params']:,} / {results['total_params']:,} ({results['trainable_percent']:.3f}%)",
        )
    for key, value in results["peak_memory_gib"].items():
        label = {"memory/run_peak_rss_gib": "peak RSS (CPU process)"}.get(key, key.replace("memory/run_", ""))
        table.add_row(label, f"{value:.3f} GiB")
    table.add_row("adapter", f"{results['adapter_mib']:.2f} MiB (path below)")
    console.print(table)
    # Paths and commands on lines of their own, whole, whatever the terminal's width: to be copied.
    lines = [f"adapter:          {results['adapter_dir']}"]
    if results.get("training_curves"):
        lines.append(f"training curves:  {results['training_curves']}")
    wandb_info = results.get("wandb")
    if wandb_info:
        lines.append(f"W&B run ({wandb_info['mode']}): {wandb_info['run_dir']}")
        if wandb_info["mode"] == "offline":
            lines.append(f"upload it later:  wandb sync {wandb_info['run_dir']}")
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)

    answers = Table(title="Held-out terms: answers before and after fine-tuning", show_lines=True)
    for column in ("prompt", "before", "after", "reference (held-out answer)"):
        answers.add_column(column, overflow="fold")
    for a in results["answers"]:
        answers.add_row(a["prompt"], a["before"], a["after"], a["reference"][:300])
    console.print(answers)


if __name__ == "__main__":
    main()
