"""Sweeps (``lightning-qlora -m lora.r=4,8,16``): short run directory names, and one table across the runs.

The run directory of a sweep job is ``<num>_<overrides>``: the overrides the sweep varies (``lora.r=4,8`` ->
``0_r=4``, ``1_r=8``), each shortened to its last key and the whole capped in length (a hash keeps capped names
apart); every override is in the run's ``.hydra/overrides.yaml`` and in the summary. When the sweep ends,
:class:`SweepSummary` (a Hydra callback, wired in ``conf/config.yaml``) reads each run's ``results.json`` and writes
``summary.md`` and ``summary.json`` into the sweep directory, with a column for each override that differs between
the runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lightning_qlora")

# Longest ``<overrides>`` part of a sweep run's directory name, hash included.
MAX_DIRNAME = 48
_METRICS = (
    ("perplexity_before", "ppl before"),
    ("perplexity_after", "ppl after"),
    ("steps", "steps"),
    ("tokens_per_sec", "tokens/s"),
    ("fit_seconds", "fit s"),
)


# The keys the running sweep varies, read from its command line when it starts (in the process that launches the
# jobs); empty when unknown (e.g. a remote launcher), and then every override names the directory.
_swept_keys: set[str] = set()


def sweep_dirname(overrides: Sequence[str], swept: set[str] | None = None) -> str:
    """``["lora.r=8", "trainer.max_steps=50"]`` -> ``"r=8,max_steps=50"``, at most :data:`MAX_DIRNAME` characters.

    With ``swept`` (default: what the running sweep varies), only those overrides name the run. A longer name is cut
    and ends with a short hash of the whole, so two runs never share a directory.
    """
    swept = _swept_keys if swept is None else swept
    chosen = [o for o in overrides if _key(o) in swept] if swept else list(overrides)
    parts = []
    for override in chosen or overrides:
        key, sep, value = str(override).lstrip("+~").partition("=")
        parts.append(f"{key.rpartition('.')[2]}{sep}{value}")
    name = ",".join(parts).replace("/", "-")
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(",".join(map(str, overrides)).encode()).hexdigest()[:8]
    return f"{name[: MAX_DIRNAME - 9]}~{digest}"


def register_resolver() -> None:
    """``${lq_sweep_dirname:${hydra.overrides.task}}`` in the app's config (Hydra resolves it per job)."""
    if not OmegaConf.has_resolver("lq_sweep_dirname"):
        OmegaConf.register_new_resolver("lq_sweep_dirname", lambda overrides: sweep_dirname(list(overrides)))


def swept_keys(overrides: Sequence[str]) -> set[str]:
    """The keys of the sweep overrides (``lora.r=4,8``, ``range(...)``, ``choice(...)``) on a command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def collect_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per finished or failed run under ``sweep_dir``: its directory, overrides and results."""
    rows = []
    for run_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=_job_number):
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        if not overrides_file.is_file():
            continue
        overrides = [str(o) for o in OmegaConf.load(overrides_file)]
        results_file = run_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
        rows.append({"run": run_dir.name, "overrides": overrides, "results": results})
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows``: a column per override that differs between runs, then the metrics."""
    parsed = [dict(o.lstrip("+~").partition("=")[::2] for o in row["overrides"]) for row in rows]
    keys = sorted({k for p in parsed for k in p})
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1] or keys
    header = ["run", *varying, *(label for _, label in _METRICS), "adapter"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, values in zip(rows, parsed, strict=True):
        results = row["results"]
        if results is None:
            metrics = ["failed (no results.json)"] + [""] * (len(_METRICS) - 1)
            adapter = ""
        else:
            metrics = [_fmt(results.get(key)) for key, _ in _METRICS]
            adapter = results.get("adapter_dir") or ""
        lines.append("| " + " | ".join([row["run"], *(values.get(k, "") for k in varying), *metrics, adapter]) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Names sweep runs by what the sweep varies; writes ``summary.md`` and ``summary.json`` into the sweep
    directory when it ends, and prints the table.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _swept_keys.clear()
        _swept_keys.update(swept_keys(list(config.hydra.overrides.task)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()  # printed whole, to be copied
        if not sweep_dir.is_dir():
            return
        rows = collect_runs(sweep_dir)
        if not rows:
            return
        table = summary_table(rows)
        (sweep_dir / "summary.md").write_text(table)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nSweep of {len(rows)} run(s): {sweep_dir}\n{table}summary: {sweep_dir / 'summary.md'}", flush=True)


def _key(override: str) -> str:
    return str(override).lstrip("+~").partition("=")[0]


def _job_number(path: Path) -> tuple[int, str]:
    head = path.name.partition("_")[0]
    return (int(head), path.name) if head.isdigit() else (1 << 30, path.name)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)
