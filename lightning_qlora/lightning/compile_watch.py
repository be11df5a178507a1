"""Compiled blocks never fall back silently: graph breaks, recompiles after warm-up and CUDA-graph skips are warned
about (once each, with the count) and logged as metrics (``compile/graphs``, ``compile/graph_breaks``,
``compile/cudagraph_skips``, from torch's process-wide counters) while a QLoRA strategy trains compiled blocks.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_qlora.kernels.compile import CompileStats

# Steps the first compile may take (forward, backward, then the validation and CUDA-graph warm-up runs).
WARMUP_STEPS = 3


class CompileWatch:
    """Reads torch's compile counters before each training step (:meth:`check`)."""

    def __init__(self, cuda_graphs: bool, warmup_steps: int = WARMUP_STEPS) -> None:
        self.cuda_graphs = cuda_graphs
        self.warmup_steps = warmup_steps
        self.start = CompileStats.now()
        self.after_warmup: CompileStats | None = None
        self.warned: set[str] = set()

    def check(self, trainer: Trainer) -> CompileStats:
        """Compare the counters with the start and with the end of warm-up; warn and log as needed."""
        stats, step = CompileStats.now(), trainer.global_step
        if step >= 1 and stats.graphs == self.start.graphs:
            self._warn_once("eager", "torch.compile compiled no graph during the first step: the blocks ran eagerly. "
                                     "Set QLoRAPlugin(compile=False) to say so, or report the torch/transformers "
                                     "versions (TORCH_LOGS=graph_breaks shows why).")
        if stats.graph_breaks > self.start.graph_breaks:
            reasons = "; ".join(stats.break_reasons) or "see TORCH_LOGS=graph_breaks"
            self._warn_once("breaks", f"{stats.graph_breaks - self.start.graph_breaks} graph break(s) in the compiled "
                                      f"blocks: parts of them run eagerly ({reasons}).")
        if self.cuda_graphs and stats.cudagraph_skips > self.start.cudagraph_skips:
            self._warn_once("skips", f"{stats.cudagraph_skips - self.start.cudagraph_skips} compiled graph(s) run "
                                     "without CUDA graphs (inductor's log says why: TORCH_LOGS=perf_hints).")
        if step == self.warmup_steps:
            self.after_warmup = stats
        elif self.after_warmup is not None and stats.graphs > self.after_warmup.graphs:
            self._warn_once("recompiles", f"{stats.graphs - self.after_warmup.graphs} recompile(s) after warm-up: "
                                          "batch shapes or settings change between steps (TORCH_LOGS=recompiles says "
                                          "which); pack the data (one shape) or compile without CUDA graphs.")
        if step % max(1, trainer.log_every_n_steps) == 0:  # type: ignore[attr-defined]
            for logger in trainer.loggers:
                logger.log_metrics(stats.as_metrics(), step=step)
        return stats

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            rank_zero_warn(message)
