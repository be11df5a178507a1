"""The package face: lazy public names, a plain-torch core that imports without Lightning, one base error class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lightning_qlora
from lightning_qlora._imports import MissingDependencyError, require
from lightning_qlora.errors import QLoRAError

PACKAGE_DIR = Path(lightning_qlora.__file__).parent
# What the plain-torch core must never need: Lightning and the app's extras.
BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "wandb", "matplotlib", "rich",
           "gguf")

_WITHOUT_LIGHTNING = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())

    import torch
    from torch import nn
    import lightning_qlora
    import lightning_qlora.calibration, lightning_qlora.config, lightning_qlora.convert, lightning_qlora.kernels
    import lightning_qlora.lora, lightning_qlora.optim, lightning_qlora.quant, lightning_qlora.sharding
    from lightning_qlora import LoRAConfig, QuantConfig, convert_model, load_adapter, save_adapter

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    summary = convert_model(model, QuantConfig(skip_modules=()), LoRAConfig(r=4))
    save_adapter(model, sys.argv[1])
    fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    loaded = load_adapter(fresh, sys.argv[1], strict=False, quant=QuantConfig(skip_modules=()))
    assert loaded == ["0", "2"], loaded
    assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}], "an app or Lightning module was imported"
    try:
        lightning_qlora.QLoRAPlugin
    except ModuleNotFoundError as err:
        assert "lightning" in str(err)
    else:
        raise AssertionError("QLoRAPlugin resolved without Lightning")
    print("core ok:", summary.as_text())
    """
)


def test_the_core_imports_and_works_without_lightning_or_the_app_extras(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LIGHTNING, str(tmp_path / "adapter")],
        capture_output=True, text=True, timeout=300, cwd=PACKAGE_DIR.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "core ok: QLoRA: 2 linear layer(s) -> nf4 + double quant" in result.stdout


def test_public_names_are_sorted_and_each_resolves():
    assert lightning_qlora.__all__ == sorted(lightning_qlora.__all__)
    assert set(lightning_qlora.__all__) == set(lightning_qlora._EXPORTS)
    for name in lightning_qlora.__all__:
        assert getattr(lightning_qlora, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_qlora.nope  # noqa: B018


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="lightning_qlora.")]


def test_every_named_error_derives_from_the_base_error():
    errors = []
    for name in _all_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException):
                errors.append(cls)
    assert len(errors) >= 15, errors  # config, quant, calibration, adapters, checkpoints, data, OOM, optional imports
    assert [cls.__qualname__ for cls in errors if not issubclass(cls, QLoRAError)] == ["_StopForward"]


def test_no_module_is_past_about_400_lines():
    lengths = {p.relative_to(PACKAGE_DIR): len(p.read_text().splitlines()) for p in PACKAGE_DIR.rglob("*.py")}
    assert max(lengths.values()) <= 420, sorted(lengths.items(), key=lambda item: -item[1])[:3]


def test_the_core_never_imports_the_layers_above_it():
    # quant/, lora/, calibration/, optim/, kernels/, convert.py know nothing of Lightning, the app or the tools. (The
    # package face imports the Lightning layer by name only, lazily.)
    above = ("lightning_qlora.lightning", "lightning_qlora.app", "lightning_qlora.tools", "hydra", "pytorch_lightning")
    offenders = []
    for path in PACKAGE_DIR.rglob("*.py"):
        relative = path.relative_to(PACKAGE_DIR)
        if relative.parts[0] in ("lightning", "app", "tools") or str(relative) in ("__init__.py", "__main__.py"):
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) > 1 and words[0] in ("import", "from"):
                module = words[1]
                if module == "lightning" or module.startswith(("lightning.", *above)):
                    offenders.append(f"{relative}: {line.strip()}")
    assert offenders == []


def test_a_missing_optional_package_names_the_install_command():
    with pytest.raises(MissingDependencyError, match=r"the plot needs the package 'no_such_package_xyz'.*pip install"):
        require("no_such_package_xyz", "the plot")
    assert issubclass(MissingDependencyError, ImportError)
