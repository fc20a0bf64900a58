"""The repository layout never shadows an installed package.

``python -m pytest``, ``python -m ...``, ``python -c`` and notebooks put the working directory first
on ``sys.path``. From the repository root, a root folder with an ``__init__.py`` would win over any
installed distribution of the same name (``kernels``, which transformers imports, was one). Every
check runs in a fresh interpreter whose working directory is the repository root.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY_M3AMBA

ENV = {**os.environ, "PYTHONPATH": "", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg"}


def _python_at_root(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_the_only_regular_package_at_the_root_is_rsfusion():
    regular = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert regular == ["rsfusion"], f"root folders importable as regular packages: {regular}"


def test_the_design_card_folders_are_the_subpackages_of_rsfusion():
    for name in ("kernels", "datamodules", "lightning_modules"):
        assert (ROOT / "rsfusion" / name / "__init__.py").is_file(), name
        assert not (ROOT / name).exists(), f"{name}/ is back at the root, where it shadows installed packages"


def test_from_the_root_the_rsfusion_subpackages_import_and_keep_their_public_api():
    out = _python_at_root(
        "import json, rsfusion, rsfusion.kernels, rsfusion.datamodules, rsfusion.lightning_modules\n"
        "from rsfusion.kernels import selective_scan, selective_scan_ref\n"
        "print(json.dumps({m: __import__(m, fromlist=['_']).__file__ for m in "
        "('rsfusion', 'rsfusion.kernels', 'rsfusion.datamodules', 'rsfusion.lightning_modules')}))")
    assert out.returncode == 0, out.stderr[-2000:]
    files = json.loads(out.stdout.strip().splitlines()[-1])
    for module, file in files.items():
        assert Path(file).resolve() == (ROOT / Path(*module.split(".")) / "__init__.py").resolve(), module


@pytest.mark.parametrize("name", ["kernels", "datamodules", "lightning_modules"])
def test_from_the_root_a_design_card_name_is_never_the_repository(name):
    """``import kernels`` from the root is Hugging Face's ``kernels`` when it is installed, and no
    module at all otherwise; never a folder of this repository."""
    out = _python_at_root(
        f"import importlib.util; spec = importlib.util.find_spec({name!r});"
        "print(None if spec is None else (spec.origin or list(spec.submodule_search_locations)))")
    assert out.returncode == 0, out.stderr[-2000:]
    found = out.stdout.strip()
    assert str(ROOT) not in found or "site-packages" in found, found
    try:
        installed = importlib.metadata.packages_distributions().get(name)
    except Exception:  # pragma: no cover - metadata of a broken environment
        installed = None
    if installed:
        assert "site-packages" in found, f"{name} from the root is {found}, not the installed {installed}"


def test_from_the_root_transformers_clip_imports_and_a_tiny_tower_builds():
    out = _python_at_root(
        "import torch\n"
        "from transformers import CLIPVisionConfig\n"
        "from transformers.models.clip import modeling_clip\n"
        "config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
        " num_attention_heads=2, image_size=16, patch_size=8, projection_dim=8)\n"
        "torch.manual_seed(0)\n"
        "tower = modeling_clip.CLIPVisionModelWithProjection(config).eval()\n"
        "with torch.no_grad():\n"
        "    out = tower(pixel_values=torch.randn(2, 3, 16, 16)).image_embeds\n"
        "print(tuple(out.shape), bool(torch.isfinite(out).all()))")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(2, 8) True"


@pytest.mark.slow
def test_python_m_fit_of_the_m3amba_config_trains_from_the_root(tmp_path):
    """``python -m rsfusion.lightning_modules fit --config configs/m3amba_synthetic.yaml``, shrunk by
    command-line overrides only, run from the repository root (where CLIP pulls in ``kernels``)."""
    clip = json.dumps({**TINY_M3AMBA["clip_config"], "image_size": 16})
    out = subprocess.run(
        [sys.executable, "-m", "rsfusion.lightning_modules", "fit", "--config", "configs/m3amba_synthetic.yaml",
         "--data.init_args.root", str(tmp_path / "scene"), "--data.init_args.scene_height", "24",
         "--data.init_args.scene_width", "24", "--data.init_args.train_per_class", "6",
         "--data.init_args.patch_size", "16", "--data.init_args.train_stride", "8",
         "--data.init_args.batch_size", "4", "--model.init_args.dims", "16", "--model.init_args.depth", "1",
         "--model.init_args.d_state", "2", "--model.init_args.clip_config", clip,
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "runs")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/OA" in out.stdout + out.stderr
    assert (tmp_path / "runs" / "version_0" / "predictions" / "classification_map.tif").is_file()


def _public_modules() -> list[str]:
    import pkgutil

    import rsfusion

    found = pkgutil.walk_packages(rsfusion.__path__, "rsfusion.")
    return ["rsfusion"] + sorted(m.name for m in found if not any(p.startswith("_") for p in m.name.split(".")))


def test_static_analysers_resolve_every_public_module_of_rsfusion(tmp_path):
    """What an editor sees: basedpyright (pyright, VS Code's engine) resolves every public rsfusion
    module and every name of their ``__all__`` in this environment's install, from a folder outside
    the repository (so the repository root does not help)."""
    import importlib
    import shutil

    pyright = shutil.which("basedpyright") or str(Path(sys.executable).with_name("basedpyright"))
    if not Path(pyright).exists():
        pytest.skip("basedpyright is not installed (it comes with the dev extra)")
    lines = []
    for name in _public_modules():
        lines.append(f"import {name}")
        lines += [f"from {name} import {symbol}" for symbol in getattr(importlib.import_module(name), "__all__", [])]
    assert len(lines) > 50
    (tmp_path / "every_module.py").write_text("\n".join(lines) + "\n")
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(
        {"typeCheckingMode": "off", "reportMissingImports": "error", "reportAttributeAccessIssue": "error"}))
    out = subprocess.run([pyright, "--pythonpath", sys.executable, "every_module.py"], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "0 errors" in out.stdout, out.stdout[-3000:] + out.stderr[-1000:]
