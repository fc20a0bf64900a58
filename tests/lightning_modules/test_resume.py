"""A run killed mid-training resumes from last.ckpt and ends exactly where an uninterrupted run ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
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
    last = tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    proc = _fit(resumed, wait=False)
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the first epoch is saved; die somewhere after it
    proc.wait()
    interrupted_at = torch.load(last, weights_only=False)["epoch"]
    _fit(resumed, "--ckpt_path", "last")
    a = torch.load(tmp_path / "straight" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(last, weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and interrupted_at <= 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    best_a = a["callbacks"][next(k for k in a["callbacks"] if "val/OA" in k)]["best_model_score"]
    best_b = b["callbacks"][next(k for k in b["callbacks"] if "val/OA" in k)]["best_model_score"]
    assert torch.equal(best_a, best_b)


class _FakeGPUs:
    """torch.cuda as the RNG callback sees it on a machine with ``count`` initialised GPUs (no GPU here): one
    RNG state each. Only the callback's view is replaced: torch's own code (the optimiser asks
    torch.cuda.is_available) keeps the real one, which a CUDA build without a driver would fail on."""

    def __init__(self, monkeypatch, count, offset=0):
        from rsfusion.lightning_modules import callbacks

        self.states = [torch.arange(16, dtype=torch.uint8) + offset + 16 * i for i in range(count)]
        monkeypatch.setattr(callbacks, "cuda", SimpleNamespace(
            is_available=lambda: True, is_initialized=lambda: True, device_count=lambda: count,
            get_rng_state_all=lambda: [s.clone() for s in self.states], set_rng_state_all=self.set_states))

    def set_states(self, states):
        self.states = [s.clone() for s in states]

    def holds(self, states):
        return len(states) == len(self.states) and all(torch.equal(a, b) for a, b in zip(states, self.states))


def _tiny_fit(tmp_path, ckpt_path=None, max_steps=1):
    import lightning as L

    from rsfusion.datamodules import SyntheticDataModule
    from rsfusion.lightning_modules import RNGStateCapture, TwoBranchCNN

    L.seed_everything(0)
    dm = SyntheticDataModule(root=str(tmp_path / "scene"), scene_height=24, scene_width=24, train_per_class=4,
                             patch_size=5, batch_size=8)
    model = TwoBranchCNN(in_channels={"hsi": 48, "dsm": 1}, num_classes=6, width=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[RNGStateCapture()])
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


def test_checkpoints_store_and_restore_the_cuda_rng_states(tmp_path, monkeypatch):
    trainer = _tiny_fit(tmp_path)
    gpus = _FakeGPUs(monkeypatch, count=2)
    trainer.save_checkpoint(tmp_path / "gpu.ckpt")
    saved = torch.load(tmp_path / "gpu.ckpt", weights_only=True)["rng_states"]["cuda"]
    assert gpus.holds(saved) and all(s.dtype == torch.uint8 for s in saved)
    later = _FakeGPUs(monkeypatch, count=2, offset=100)  # the resuming process: other GPU streams
    assert not later.holds(saved)
    _tiny_fit(tmp_path, ckpt_path=tmp_path / "gpu.ckpt", max_steps=2)
    assert later.holds(saved)


def test_cuda_rng_states_for_other_gpus_warn_once_and_cpu_checkpoints_still_load(tmp_path, monkeypatch):
    from rsfusion.lightning_modules import callbacks

    monkeypatch.setattr(callbacks, "_warned", set())
    _tiny_fit(tmp_path).save_checkpoint(tmp_path / "cpu.ckpt")  # this machine: no CUDA
    assert "cuda" not in torch.load(tmp_path / "cpu.ckpt", weights_only=True)["rng_states"]
    gpus = _FakeGPUs(monkeypatch, count=2)
    before = [s.clone() for s in gpus.states]
    trainer = _tiny_fit(tmp_path, ckpt_path=tmp_path / "cpu.ckpt", max_steps=2)  # a CPU checkpoint on "GPUs"
    assert gpus.holds(before) and trainer.global_step == 2
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    one = _FakeGPUs(monkeypatch, count=1, offset=100)  # resumed where only one GPU is visible
    with pytest.warns(UserWarning, match=r"RNG states of 2 GPU\(s\), this process sees 1") as record:
        _tiny_fit(tmp_path, ckpt_path=tmp_path / "two.ckpt", max_steps=3)
        _tiny_fit(tmp_path, ckpt_path=tmp_path / "two.ckpt", max_steps=3)
    assert sum("RNG states of" in str(w.message) for w in record) == 1
    assert one.states[0][0] == 100  # not overwritten by a mismatched state list
