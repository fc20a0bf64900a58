"""A run killed mid-training resumes from last.ckpt and ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.conftest import tiny_config


def _config(tmp_path: Path, name: str) -> Path:
    # dropout: the RNG state must be restored too
    return tiny_config(tmp_path, "demo", dict(scene_height=32, scene_width=40, train_per_class=40, patch_size=5,
                                              batch_size=8), dict(width=8, dropout=0.3), run=name, max_epochs=4,
                       deterministic=True)


def _fit(config: Path, *extra: str, wait: bool = True):
    cmd = [str(Path(sys.executable).parent / "rsfusion"), "fit", "--config", str(config), "--test_after_fit", "false",
           "--map_after_fit", "false", *extra]
    # One thread: multi-threaded CPU reductions may differ in the last bits between processes.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=config.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = subprocess.run(cmd, cwd=config.parent, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    _fit(_config(tmp_path, "straight"))
    resumed = _config(tmp_path, "resumed")
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    proc = _fit(resumed, wait=False)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the first epoch is saved; die somewhere after it
    proc.wait()
    interrupted_at = torch.load(last, weights_only=False)["epoch"]
    _fit(resumed, "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and interrupted_at <= 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    best_a = a["callbacks"][next(k for k in a["callbacks"] if "val/OA" in k)]["best_model_score"]
    best_b = b["callbacks"][next(k for k in b["callbacks"] if "val/OA" in k)]["best_model_score"]
    assert torch.equal(best_a, best_b)
