"""``rsfusion export``: each model's exported program, run where rsfusion cannot be imported, gives
the Lightning model's probabilities on raw (unnormalised) inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rsfusion.datamodules.scene import Normalizer
from rsfusion.lightning_modules.commands.cli import main
from rsfusion.lightning_modules.commands.export import FEATURE_KEY, load_checkpoint
from tests.conftest import ROOT, TINY_DDPM, tiny_config
from tests.conftest import TINY_BDGF_NET as TINY_NET
from tests.conftest import TINY_DAS2F as DAS2F_TINY
from tests.conftest import TINY_M3AMBA as M3AMBA_TINY

# float32 end to end, same ops; the scan and ONNX Runtime's kernels sum in other orders
TORCH_ATOL, ONNX_ATOL = 1e-5, 1e-4

MODELS = {
    "cnn": ("demo", dict(scene_height=24, scene_width=24, train_per_class=6, patch_size=5, batch_size=16),
            dict(width=8)),
    "m3amba": ("m3amba_synthetic", dict(scene_height=24, scene_width=24, train_per_class=6, patch_size=8,
                                        batch_size=4), {**M3AMBA_TINY, "clip_config": {**M3AMBA_TINY["clip_config"],
                                                                                         "image_size": 8}}),
    "das2f": ("das2f_synthetic", dict(scene_height=16, scene_width=16, train_per_class=6, patch_size=4,
                                      batch_size=16), DAS2F_TINY),
    "bdgf": ("bdgf_synthetic", dict(scene_height=16, scene_width=16, train_per_class=6, patch_size=5, batch_size=16,
                                    pca={"hsi": 4}),
             dict(ddpm=TINY_DDPM, pretrain_steps=2, pretrain_batch_size=4, pretrain_tile=8, feature_levels=[0, 1],
                  guide_levels={"cnn": 0, "mamba": 1, "transformer": 1}, feature_timesteps=[5], feature_tile=8,
                  feature_overlap=4, **TINY_NET)),
}

# Run where no rsfusion module can be imported, however rsfusion is installed (wheel, editable .pth,
# a checkout on sys.path): a meta-path finder placed first refuses the name and any submodule of it,
# so the program fails if anything in it reaches for rsfusion.
CLEAN_PRELUDE = """
import sys
class BlockRsfusion:
    def find_spec(self, name, path=None, target=None):
        if name == "rsfusion" or name.startswith("rsfusion."):
            raise ModuleNotFoundError(f"rsfusion is blocked in this process ({name})")
        return None
sys.meta_path.insert(0, BlockRsfusion())
try:
    import rsfusion  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the rsfusion blocker did not work")
import numpy as np
inputs = dict(np.load(sys.argv[2]))
"""
RUN_TORCH = CLEAN_PRELUDE + """
import torch
program = torch.export.load(sys.argv[1]).module()
with torch.no_grad():
    out = program(*[torch.from_numpy(inputs[k]) for k in sys.argv[4].split(",")])
np.save(sys.argv[3], out.numpy())
"""
RUN_ONNX = CLEAN_PRELUDE + """
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(None, {k: inputs[k] for k in sys.argv[4].split(",")})[0])
"""


def _checkpoint(tmp_path: Path, key: str) -> Path:
    name, data, model = MODELS[key]
    if key == "bdgf":
        model = {**model, "cache_dir": str(tmp_path / "cache")}
    config = tiny_config(tmp_path, name, data, model, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         enable_model_summary=False)
    main(["fit", "--config", str(config), "--test_after_fit", "false", "--map_after_fit", "false"])
    return next((tmp_path / "runs").glob("version_*/checkpoints/best-*.ckpt"))


def _raw_batch(model, checkpoint: dict, info: dict, batch: int = 3) -> tuple[dict, dict]:
    """Raw inputs (numpy) for the exported program and the normalised batch the Lightning model sees,
    normalised by the DataModule's own code (Normalizer.apply) with the checkpoint's statistics."""
    rng = np.random.default_rng(1)
    state = next(v for v in checkpoint.values() if isinstance(v, dict) and "normalizers" in v)["normalizers"]
    raw, normalised = {}, {}
    for name, shape in info["inputs"].items():
        if name == FEATURE_KEY:
            raw[name] = rng.normal(size=(batch, *shape[1:])).astype(np.float32)
            normalised[name] = torch.from_numpy(raw[name]).half()  # the scene holds the bank as fp16
            continue
        normalizer = Normalizer.from_state({k: np.asarray(v) for k, v in state[name].items()})
        s = normalizer.stats
        bands = len(s.offset)
        values = s.offset[None, :, None, None] + s.scale[None, :, None, None] * rng.normal(
            size=(batch, bands, *shape[2:]))
        raw[name] = values.astype(np.float32)
        valid = np.ones(shape[2:], dtype=bool)
        normalised[name] = torch.from_numpy(np.stack([normalizer.apply(x, valid) for x in raw[name]]))
    if FEATURE_KEY in raw:
        raw[FEATURE_KEY] = normalised[FEATURE_KEY].float().numpy()  # the program gets what the model gets
    return raw, normalised


def _run_clean(script: str, program: Path, raw: dict, order: list[str], tmp_path: Path) -> np.ndarray:
    np.savez(tmp_path / "inputs.npz", **raw)
    (tmp_path / "run.py").write_text(textwrap.dedent(script))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), str(program), str(tmp_path / "inputs.npz"),
                          str(tmp_path / "out.npy"), ",".join(order)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return np.load(tmp_path / "out.npy")


@pytest.mark.slow
@pytest.mark.parametrize("key", list(MODELS))
def test_exported_program_reproduces_the_lightning_probabilities_without_rsfusion(tmp_path, key, capsys):
    ckpt = _checkpoint(tmp_path, key)
    model, checkpoint = load_checkpoint(ckpt)
    reference_scores = None
    for fmt, suffix, script, atol in (("torch", "pt2", RUN_TORCH, TORCH_ATOL), ("onnx", "onnx", RUN_ONNX, ONNX_ATOL)):
        output = tmp_path / f"model.{suffix}"
        main(["export", "--ckpt_path", str(ckpt), "--format", fmt, "--output", str(output)])
        assert f"exported to {output}" in capsys.readouterr().out
        info = json.loads(output.with_name(output.name + ".json").read_text())
        raw, normalised = _raw_batch(model, checkpoint, info)
        if reference_scores is None:
            with torch.no_grad():
                reference_scores = model.predict_logits(normalised).softmax(1).numpy()
        probabilities = _run_clean(script, output, raw, info["input_order"], tmp_path)
        assert probabilities.shape == reference_scores.shape == (3, *info["output"]["probabilities"][1:])
        np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probabilities, reference_scores, atol=atol, rtol=0)
    if key == "das2f":
        assert info["inputs"]["pan"][2:] == [16, 16]  # PAN at 4x the MS patch
    if key == "bdgf":
        assert info["input_order"][-1] == FEATURE_KEY
        assert info["inputs"]["hsi"][1] == 48  # the 48 raw bands go in, the PCA to 4 is inside


def test_missing_checkpoint_and_bad_ratio_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(tmp_path / "none.ckpt"), "--output", str(tmp_path / "m.pt2")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'none.ckpt'}: checkpoint not found"
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", "x.ckpt", "--output", "m.pt2", "--ratio", "pan4"])
    assert "expected MODALITY=RATIO (e.g. pan=4), got 'pan4'" in capsys.readouterr().err


def test_the_clean_process_refuses_every_rsfusion_import(tmp_path):
    """The guard of the test above: in its child process any rsfusion import fails, wheel, editable
    install or a checkout on the path alike (the child runs from the repository root here)."""
    script = CLEAN_PRELUDE + "\nimport rsfusion.kernels\n"
    (tmp_path / "run.py").write_text(textwrap.dedent(script))
    np.savez(tmp_path / "inputs.npz", x=np.zeros(1))
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), "-", str(tmp_path / "inputs.npz")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ModuleNotFoundError: rsfusion is blocked in this process (rsfusion)" in out.stderr
