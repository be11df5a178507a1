"""Check the app's whole config, types included, before anything is loaded: a typo'd value fails in a second."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lightning_qlora.config import ConfigError

# key -> (what it must be, allowed types, may be null). bool is excluded from the numbers on purpose.
_SCALARS: dict[str, tuple[str, tuple[type, ...], bool]] = {
    "seed": ("an integer", (int,), False),
    "trainer.max_steps": ("an integer (-1: no limit)", (int,), False),
    "trainer.log_every_n_steps": ("a positive integer", (int,), False),
    "trainer.gradient_clip_val": ("a number or null", (int, float), True),
    "trainer.accumulate_grad_batches": ("a positive integer", (int,), False),
    "data.max_length": ("an integer (tokens per row) or null", (int,), True),
    "data.max_tokens": ("an integer (tokens per packed row)", (int,), False),
    "data.batch_size": ("a positive integer", (int,), False),
    "data.val_size": ("an integer (held-out rows)", (int,), False),
    "data.limit_train": ("an integer or null", (int,), True),
    "model.lr": ("a number, e.g. 1e-3", (int, float), False),
    "model.weight_decay": ("a number", (int, float), False),
    "model.warmup_steps": ("an integer", (int,), False),
    "model.min_lr_ratio": ("a number in [0, 1]", (int, float), False),
    "eval.sample_terms": ("an integer", (int,), False),
    "memory_budget_gib": ("a positive number of GiB or null", (int, float), True),
    "eval.max_new_tokens": ("a positive integer", (int,), False),
}
_POSITIVE = {"trainer.log_every_n_steps", "trainer.accumulate_grad_batches", "data.batch_size", "eval.max_new_tokens",
             "data.max_tokens"}


def validate_app_config(cfg: DictConfig) -> None:
    """Every problem of the app's scalar settings, at once.

    Raises:
        ConfigError: listing each bad value with what it must be.
    """
    problems = []
    for key, (what, types, nullable) in _SCALARS.items():
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            continue  # an option group that does not have it (e.g. logger=none)
        value: Any = OmegaConf.select(cfg, key)  # (an int, float, str, ... as the override gave it)
        if value is None and nullable:
            continue
        wrong_type = isinstance(value, bool) or not isinstance(value, types)
        if wrong_type or (key in _POSITIVE and value < 1):
            problems.append(f"{key}={value!r} must be {what}.")
    threads = OmegaConf.select(cfg, "cpu_threads", default="auto")
    if threads not in (None, "auto") and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        problems.append(f"cpu_threads={threads!r} must be auto, null or a positive integer.")
    problems.extend(_optimizer_in_backward_problems(cfg))
    if problems:
        raise ConfigError("The lightning-qlora config", problems)


def _optimizer_in_backward_problems(cfg: DictConfig) -> list[str]:
    # The strategy refuses these too, but only after the model is loaded and calibrated: here they fail at once.
    if OmegaConf.select(cfg, "model.optimizer_in_backward", default=False) is not True:
        return []
    problems = []
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip:
        problems.append(f"model.optimizer_in_backward=true steps each adapter inside backward, so "
                        f"trainer.gradient_clip_val={clip!r} (it needs every gradient at once) must be null.")
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    if isinstance(accumulate, int) and not isinstance(accumulate, bool) and accumulate > 1:
        problems.append(f"model.optimizer_in_backward=true frees each gradient at once, so "
                        f"trainer.accumulate_grad_batches={accumulate} must be 1 (use a larger data.batch_size).")
    strategy = OmegaConf.select(cfg, "trainer.strategy", default="qlora")
    if isinstance(strategy, str) and strategy != "qlora":
        problems.append(f"model.optimizer_in_backward=true needs trainer.strategy=qlora: {strategy} reduces "
                        "gradients across ranks after backward, too late for a step taken inside it.")
    return problems


_MISSING = object()
