"""compile='auto': what it chooses where, the one line saying so, and the watch that never lets compiled blocks fall
back silently (real torch counters; CPU)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from lightning_qlora import QLoRAPlugin
from lightning_qlora.kernels.compile import CompileStats, choose_compile
from lightning_qlora.lightning.compile_watch import CompileWatch

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


def test_auto_compiles_on_one_cuda_device_with_cuda_graphs_only_for_static_shapes():
    assert choose_compile("auto", CUDA, static_shapes=True, distributed=False).kwargs == {"mode": "reduce-overhead"}
    assert choose_compile("auto", CUDA, static_shapes=None, distributed=False).kwargs == {}
    assert choose_compile("auto", CUDA, static_shapes=True, distributed=True).kwargs is None
    assert choose_compile("auto", CPU, static_shapes=True, distributed=False).kwargs is None
    assert "eager on cpu" in choose_compile("auto", CPU, True, False).reason
    # Explicit settings are kept as they are, wherever the run is.
    assert choose_compile(False, CUDA, True, False).kwargs is None
    assert choose_compile(True, CPU, None, False).kwargs == {}
    assert choose_compile({"mode": "max-autotune"}, CUDA, None, True).kwargs == {"mode": "max-autotune"}


def test_the_plugin_defaults_to_auto_and_says_what_it_chose(caplog):
    from torch import nn

    assert QLoRAPlugin().compile == "auto"
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    with caplog.at_level(logging.INFO):
        QLoRAPlugin().convert_module(model)
    line = next(r.getMessage() for r in caplog.records if "QLoRA fast path" in r.getMessage())
    assert "eager on cpu" in line and "plain path" in line
    with pytest.raises(TypeError, match="must be 'auto', True, False"):
        QLoRAPlugin(compile="fastest")


def _trainer(step):
    return SimpleNamespace(global_step=step, log_every_n_steps=1, loggers=[])


def test_the_watch_warns_when_nothing_was_compiled():
    watch = CompileWatch(cuda_graphs=False)
    watch.check(_trainer(0))
    with pytest.warns(UserWarning, match="compiled no graph during the first step: the blocks ran eagerly"):
        watch.check(_trainer(1))


def test_the_watch_counts_graph_breaks_and_recompiles_after_warm_up():
    torch._dynamo.reset()
    watch = CompileWatch(cuda_graphs=False, warmup_steps=1)

    def step(x):
        y = x.sin()
        torch._dynamo.graph_break()  # what transformers 5.25's kernel routing did inside every block
        return y.cos()

    compiled = torch.compile(step, backend="eager")
    compiled(torch.randn(4))
    with pytest.warns(UserWarning, match=r"graph break\(s\) in the compiled blocks"):
        watch.check(_trainer(1))
    compiled(torch.randn(4, 3))  # a new shape after warm-up
    compiled(torch.randn(5, 3, 2))
    with pytest.warns(UserWarning, match=r"recompile\(s\) after warm-up"):
        stats = watch.check(_trainer(2))
    assert stats.graphs > watch.start.graphs and stats.as_metrics()["compile/graph_breaks"] >= 1
    assert isinstance(CompileStats.now().break_reasons, tuple)
