"""CLIP weights the Hugging Face way: a hub name is fetched into the HF cache (HF_HOME) on first use when
online, logged with its size; read from the cache afterwards; offline, one line. The hub client is mocked
at its boundary (``HfApi.model_info``, ``hf_hub_download``), in a fresh interpreter whose HF_HOME is a
temporary folder (the hub libraries read it at import)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

REVISION = "0123456789abcdef0123456789abcdef01234567"
SCRIPT = r'''
import json, logging, os, shutil, sys
from pathlib import Path
from types import SimpleNamespace
from huggingface_hub import constants
import rsfusion.lightning_modules.networks.m3amba as net

tiny, revision, modes = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
calls, mode = [], None

class FakeApi:
    def model_info(self, repo, files_metadata=False):
        calls.append(["model_info", repo])
        if mode == "unreachable":
            raise ConnectionError("Max retries exceeded with url: /api/models/org/tiny-clip")
        return SimpleNamespace(sha=revision, siblings=[SimpleNamespace(rfilename=n, size=(tiny / n).stat().st_size)
                                                       for n in ("config.json", "model.safetensors")])

def fake_download(repo, filename, revision=None):
    calls.append(["download", repo, filename, revision])
    root = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    (root / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    shutil.copy(tiny / filename, root / "snapshots" / revision / filename)
    return str(root / "snapshots" / revision / filename)

net.HfApi, net.hf_hub_download = FakeApi, fake_download
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
for mode in modes:  # one load per mode, in this process (the hub libraries read HF_HOME once, at import)
    calls.clear()
    os.environ.pop("HF_HUB_OFFLINE", None)
    if mode == "offline":
        os.environ["HF_HUB_OFFLINE"] = "1"
    print("=== " + mode, file=sys.stderr, flush=True)
    try:
        tower = net.load_clip_vision_tower("org/tiny-clip")
    except FileNotFoundError as err:
        print(json.dumps({"error": str(err), "calls": calls}))
    else:
        print(json.dumps({"calls": calls, "source": net.clip_weights_source("org/tiny-clip"),
                          "params": sum(p.numel() for p in tower.parameters())}))
'''


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, int]:
    folder = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=8)
    model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder, sum(p.numel() for p in model.parameters())


def _load(tiny: Path, hf_home: Path, *modes: str) -> list[tuple[dict, str]]:
    """One fresh interpreter with HF_HOME = ``hf_home``, loading the tower once per mode: (result, log) each."""
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environment.update(HF_HOME=str(hf_home), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny), REVISION, *modes], env=environment,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    logs = out.stderr.split("=== ")[1:]
    assert len(results) == len(logs) == len(modes), out.stderr[-3000:]
    return list(zip(results, logs))


def test_a_hub_name_is_fetched_once_into_hf_home_logged_with_its_size(tiny_clip, tmp_path):
    tiny, params = tiny_clip
    (first, log), (again, log_again) = _load(tiny, tmp_path / "hf", "online", "online")
    size = (tiny / "model.safetensors").stat().st_size
    assert first["calls"] == [["model_info", "org/tiny-clip"],
                              ["download", "org/tiny-clip", "config.json", REVISION],
                              ["download", "org/tiny-clip", "model.safetensors", REVISION]]
    assert first["params"] == params
    expected = (f"CLIP weights org/tiny-clip (revision {REVISION}): downloading config.json and model.safetensors "
                f"({size / 2 ** 20:.1f} MiB) into {tmp_path / 'hf' / 'hub'}")
    assert expected in log
    sha = hashlib.sha256((tiny / "model.safetensors").read_bytes()).hexdigest()
    assert first["source"] == {"source": "org/tiny-clip", "file": "model.safetensors", "revision": REVISION,
                               "sha256": sha}  # what a checkpoint records
    assert again["calls"] == [] and "downloading" not in log_again and again["source"] == first["source"]


def test_offline_or_unreachable_the_error_is_one_line(tiny_clip, tmp_path):
    tiny, _ = tiny_clip
    (offline, _), (unreachable, _) = _load(tiny, tmp_path / "empty", "offline", "unreachable")
    assert offline["calls"] == [] and "\n" not in offline["error"]
    assert offline["error"].startswith("CLIP weights 'org/tiny-clip' not found locally and HF_HUB_OFFLINE is set: ")
    assert unreachable["error"] == (
        f"CLIP weights 'org/tiny-clip': not in the Hugging Face cache ({tmp_path / 'empty' / 'hub'}) and the hub "
        "download failed (ConnectionError: Max retries exceeded with url: /api/models/org/tiny-clip); set "
        "HF_HUB_OFFLINE=1 and fill the cache by hand, or pass clip_model=<local directory>")
