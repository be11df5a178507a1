"""Writing outputs: other files left alone, files refused as directories, real read-only and full file systems,
concurrent readers and writers."""

from __future__ import annotations

import contextlib
import copy
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from lightning_qlora import LoRAConfig, inject_lora, load_adapter, save_adapter
from lightning_qlora._atomic import OutputWriteError


def _adapted(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    inject_lora(model, LoRAConfig(r=4))
    return model


@contextlib.contextmanager
def _mounted(path, options):
    """A real tmpfs at ``path`` (root and a mount namespace needed; the test is skipped where mounting fails)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_save_adapter_leaves_other_files_and_keeps_normal_permissions(tmp_path):
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "notes.txt").write_text("keep me")
    save_adapter(_adapted(), directory)
    assert (directory / "notes.txt").read_text() == "keep me"
    fresh = tmp_path / "new" / "adapter"
    save_adapter(_adapted(), fresh)
    mode = stat.S_IMODE(fresh.stat().st_mode)
    assert mode & 0o055 == 0o055 or mode == 0o777 & ~_umask()  # like mkdir would make it, not 0700
    assert stat.S_IMODE((fresh / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_a_file_where_the_adapter_directory_should_be_is_refused(tmp_path):
    target = tmp_path / "adapter"
    target.write_text("a file")
    with pytest.raises(OutputWriteError, match=r"adapter is a file, not a directory.*nothing was overwritten"):
        save_adapter(_adapted(), target)
    assert target.read_text() == "a file"


def test_saving_into_the_current_directory_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_adapter(_adapted(), ".")
    assert load_adapter(_adapted(), ".") == ["0", "2"]


def test_export_leaves_other_files_in_its_directory(tmp_path, tiny_llama):
    from lightning_qlora.tools.export import export_merged

    inject_lora(tiny_llama, LoRAConfig(r=4))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "README.md").write_text("mine")
    report = export_merged(tiny_llama, out, progress=False)
    assert (out / "README.md").read_text() == "mine"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert 0 < report.size_mib < 10  # counts what it wrote, not the other files


def test_a_read_only_directory_is_named_with_the_fix(tmp_path):
    with _mounted(tmp_path / "ro", "ro,size=1m") as directory, pytest.raises(
        OutputWriteError, match=rf"Could not write {directory}.*permission denied.*Choose a writable directory"
    ):
        save_adapter(_adapted(), directory)


def test_a_full_disk_keeps_the_previous_adapter_and_says_so(tmp_path):
    with _mounted(tmp_path / "small", "size=48k") as directory:
        save_adapter(_adapted(0), directory / "adapter")  # small: fits
        previous = (directory / "adapter" / "adapter_model.safetensors").read_bytes()
        big = nn.Sequential(nn.Linear(256, 256))
        inject_lora(big, LoRAConfig(r=64))  # 128 KiB of adapters: does not fit
        with pytest.raises(OutputWriteError, match=r"adapter_model.safetensors: the disk is full.*previous files"):
            save_adapter(big, directory / "adapter")
        assert (directory / "adapter" / "adapter_model.safetensors").read_bytes() == previous
        assert load_adapter(_adapted(0), directory / "adapter") == ["0", "2"]


def test_readers_never_disturb_a_writer_and_writers_take_turns(tmp_path):
    directory = tmp_path / "adapter"
    save_adapter(_adapted(), directory)
    errors: list[BaseException] = []
    stop = threading.Event()
    template = _adapted()  # built before the threads: torch's random state is shared between them

    def read() -> None:
        while not stop.is_set():
            try:
                load_adapter(copy.deepcopy(template), directory)
            except BaseException as err:  # a reader may only ever see whole files
                errors.append(err)

    def write(seed: int) -> None:
        model = copy.deepcopy(template)  # the same base; other adapter values
        with torch.no_grad():
            model[0].lora_B.weight.fill_(seed)
        try:
            for _ in range(15):
                save_adapter(model, directory)
        except BaseException as err:
            errors.append(err)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(seed,)) for seed in (1, 2)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert errors == []
    assert load_adapter(_adapted(), directory) == ["0", "2"]


def test_two_writer_processes_on_one_directory_both_finish(tmp_path):
    script = (
        "import sys, torch\nfrom torch import nn\nfrom lightning_qlora import LoRAConfig, inject_lora, save_adapter\n"
        "torch.manual_seed(0)\nm = nn.Sequential(nn.Linear(64, 64))\ninject_lora(m, LoRAConfig(r=8))\n"
        "torch.nn.init.constant_(m[0].lora_B.weight, float(sys.argv[2]))\n"
        "for _ in range(20):\n    save_adapter(m, sys.argv[1])\n"
    )
    directory = tmp_path / "adapter"
    processes = [subprocess.Popen([sys.executable, "-c", script, str(directory), str(seed)], stderr=subprocess.PIPE)
                 for seed in (1, 2)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()[-2000:] if process.stderr else ""
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(64, 64))
    assert load_adapter(fresh, directory) == ["0"]


def test_a_cache_directory_being_written_by_a_live_process_is_left_alone(tmp_path):
    from lightning_qlora._atomic import atomic_directory

    target = tmp_path / "model"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        live_staging = tmp_path / f".model.tmp-{alive.pid}-abc"
        dead_staging = tmp_path / f".model.tmp-{dead.stdout.strip()}-def"  # a killed run's leftover
        for staging in (live_staging, dead_staging):
            staging.mkdir()
        with atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")
        assert (target / "config.json").is_file()
        assert live_staging.is_dir() and not dead_staging.exists()
    finally:
        alive.kill()
        alive.wait()


def test_processes_asking_for_the_packaged_model_at_once_convert_it_once(tmp_path, monkeypatch):
    # DDP ranks (or parallel test workers) resolving the default model on a fresh machine: one converts, the others
    # wait for it and use its directory (before, each converted and removed the others' staging directories).
    from lightning_qlora._atomic import atomic_directory
    from lightning_qlora.app.models import pretrained

    conversions = []

    def convert(gguf, target, display):
        with atomic_directory(target) as staging:
            conversions.append(threading.current_thread().name)
            threading.Event().wait(0.3)  # long enough for the other caller to arrive while this one converts
            (staging / "config.json").write_text("{}")
            (staging / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(pretrained, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(pretrained, "find_packaged_gguf", lambda package: tmp_path / "SmolLM2.Q4_1.gguf")
    monkeypatch.setattr(pretrained, "convert_gguf", convert)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(pretrained.resolve_pretrained("smollm2-135m-instruct")))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and len(set(paths)) == 1 and len(paths) == 2
    assert (tmp_path / "models" / "SmolLM2-135M-Instruct-Q4_1" / "model.safetensors").read_bytes() == b"weights"
