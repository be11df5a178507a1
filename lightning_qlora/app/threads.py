"""How many CPU threads torch uses for a run on the CPU: the cores other processes leave free.

torch starts one compute thread per core. When other processes already keep cores busy, its threads fight them for
time slices and the whole run slows several-fold (``experiment=smoke`` on 2 cores with 2 busy processes beside it:
158 s with 2 threads, 63 s with 1; benchmarks/NOTES.md). ``cpu_threads: auto`` (the app's default) counts the cores
this process may use and subtracts the cores other processes keep busy, measured from ``/proc/stat`` over a quarter
of a second before the run starts (the load average would still count work that just ended); a number sets it;
``OMP_NUM_THREADS`` in the environment wins over ``auto``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

log = logging.getLogger("lightning_qlora")


def usable_cores() -> set[int]:
    """The cores this process may run on (its CPU affinity, which a container or ``taskset`` narrows)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def busy_cores(cores: set[int], window_s: float = 0.25) -> float:
    """How many of ``cores`` other processes keep busy right now (this one sleeps while it measures): the non-idle
    share of their time over ``window_s``, from ``/proc/stat``; the 1-minute load average where that is missing.
    """
    first = _cpu_times(cores)
    if first is None:
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    time.sleep(window_s)
    second = _cpu_times(cores)
    if second is None:
        return 0.0
    busy = total = 0
    for cpu, (idle_before, all_before) in first.items():
        idle_after, all_after = second.get(cpu, (idle_before, all_before))
        total += all_after - all_before
        busy += (all_after - all_before) - (idle_after - idle_before)
    return len(first) * busy / total if total > 0 else 0.0


def _cpu_times(cores: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (idle + iowait jiffies, all jiffies)}`` for ``cores``, from ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = [int(f) for f in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times or None


def free_cores(cores: int, load: float) -> int:
    """Threads that fit beside ``load`` busy processes on ``cores`` cores: at least 1, at most ``cores``."""
    return max(1, min(cores, cores - math.floor(load + 0.5)))


def choose_cpu_threads(setting: int | str | None) -> int | None:
    """Set torch's CPU threads for this run from ``setting`` (``"auto"``, a positive int, or ``None``: leave torch's
    choice) and return the number set (``None`` when left alone).

    Raises:
        ValueError: for a setting that is neither ``auto``, ``null`` nor a positive integer.
    """
    import torch

    if setting is None:
        return None
    if setting == "auto":
        if os.environ.get("OMP_NUM_THREADS"):
            return None  # the user chose already
        cores = usable_cores()
        load = busy_cores(cores)
        threads = free_cores(len(cores), load)
        if threads < len(cores):
            log.info(
                "CPU: %d cores, %.1f of them busy with other processes: torch uses %d thread(s) (cpu_threads=N or "
                "OMP_NUM_THREADS=N to choose)", len(cores), load, threads,
            )
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        threads = setting
    else:
        raise ValueError(f"cpu_threads={setting!r} must be auto, null or a positive integer.")
    torch.set_num_threads(threads)
    return threads
