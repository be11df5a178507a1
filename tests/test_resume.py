"""Exact resume: a run SIGKILLed mid-epoch and resumed with ckpt_path="last" continues as if never stopped."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, smollm2_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("resume")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"instruction": f"What is item {i}?", "response": f"Item {i} is number {i * 7 % 13}."} for i in range(68)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _run(setup, out, *extra):
    cmd = [sys.executable, str(WORKER), "--out", str(out), "--model", str(setup / "model"),
           "--data", str(setup / "data.jsonl"), "--max-steps", "24", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def reference(tiny_setup):
    """The uninterrupted 24-step run every interrupted one is compared with (the same for each: run once)."""
    out = tiny_setup / "reference"
    result = _run(tiny_setup, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _losses(path):
    losses = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        losses[int(step)] = float(loss)  # a re-run step overwrites the killed attempt
    return losses


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tiny_setup, reference, tmp_path):

    killed = _run(tiny_setup, tmp_path / "killed", "--kill-at", "10")
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "done.json").exists()
    resumed = _run(tiny_setup, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # 64 train rows packed two to a 96-token row, 2 per batch: 16 steps an epoch; step 10 is mid-epoch, and the run
    # continues into epoch 2.
    done = json.loads((tmp_path / "killed" / "done.json").read_text())
    assert done["global_step"] == json.loads((reference / "done.json").read_text())["global_step"] == 24
    expected, got = _losses(reference / "losses.txt"), _losses(tmp_path / "killed" / "losses.txt")
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    for step in range(10, 25):
        assert abs(got[step] - expected[step]) <= 1e-4, (step, got[step], expected[step])
    assert "not resumable" not in resumed.stderr

    # The resume checkpoint holds adapters + optimizer + loops, not the frozen base.
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    base = sum(f.stat().st_size for f in (tiny_setup / "model").glob("*.safetensors"))
    state = torch.load(ckpt, weights_only=True)
    assert all(".lora_" in key for key in state["state_dict"])
    assert ckpt.stat().st_size < 0.5 * base


@pytest.mark.parametrize(("signame", "status"), [("TERM", 143), ("INT", 130)])
def test_sigterm_or_ctrl_c_saves_the_step_reached_exits_nonzero_and_resumes_exactly(tiny_setup, reference, tmp_path,
                                                                                    signame, status):
    from lightning_qlora.lora import read_adapter_metadata

    # Checkpoints only every 100 steps: what survives the signal is what the stop itself saved.
    stopped = _run(tiny_setup, tmp_path / "stopped", "--kill-at", "10", "--signal", signame, "--checkpoint-every", "100")
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert "Resume it exactly" in stopped.stderr
    last = torch.load(tmp_path / "stopped" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 11  # the batch in flight finished, nothing after it ran
    assert read_adapter_metadata(tmp_path / "stopped" / "adapter" / "last")["global_step"] == 11
    resumed = _run(tiny_setup, tmp_path / "stopped", "--resume", "--checkpoint-every", "100")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = _losses(reference / "losses.txt"), _losses(tmp_path / "stopped" / "losses.txt")
    assert sorted(got) == list(range(1, 25))
    for step in range(1, 25):
        assert abs(got[step] - expected[step]) <= 1e-4, (step, got[step], expected[step])
