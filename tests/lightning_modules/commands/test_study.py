"""``rsfusion compare --study``: tables equal each run's own numbers, mean +- std and McNemar against
independent computations, a killed study continues to the same table, and bad study files fail in one line."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from rsfusion.lightning_modules.commands.compare import main as compare_main
from rsfusion.lightning_modules.commands.study import planned_runs, read_study
from tests.conftest import CONFIGS

RSFUSION = str(Path(sys.executable).parent / "rsfusion")
SEEDS = (0, 1)


def _study(tmp_path: Path, *, epochs: int = 2, extra: list[str] = (), seeds=SEEDS) -> Path:
    shared = ["--data.init_args.root=data", "--data.init_args.scene_height=32", "--data.init_args.scene_width=36",
              "--data.init_args.train_per_class=10", "--data.init_args.batch_size=16"]
    study = {"seeds": list(seeds), "output": "out",
             "datasets": {"syn": {"overrides": shared, "models": {
                 "wide": {"config": str(CONFIGS / "demo.yaml"), "overrides": ["--model.init_args.width=8"]},
                 "narrow": {"config": str(CONFIGS / "demo.yaml"), "overrides": ["--model.init_args.width=4"]}}}},
             "overrides": [f"--trainer.max_epochs={epochs}", "--trainer.limit_train_batches=3",
                           "--trainer.enable_progress_bar=false", *extra]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))  # the models run in this order
    return path


def _run(study: Path, wait: bool = True, **kwargs):
    # One thread: multi-threaded CPU reductions may differ in the last bits between processes.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [RSFUSION, "compare", "--study", str(study)]
    if not wait:
        return subprocess.Popen(cmd, cwd=study.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=study.parent, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def _table(folder: Path) -> dict[tuple[str, str, str], dict]:
    with (folder / "table.csv").open() as handle:
        return {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(handle)}


def _confusion(run: Path) -> np.ndarray:
    with (run / "reports" / "confusion_matrix.csv").open() as handle:
        return np.array([[int(v) for v in row[1:]] for row in list(csv.reader(handle))[1:]])


def _mcnemar_p(b: int, c: int) -> float:
    n = b + c
    if n < 25:
        return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)
    return math.erfc(math.sqrt((abs(b - c) - 1) ** 2 / n / 2))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    out = _run(_study(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / "out" / "syn" / "default", out.stdout


def test_accuracy_table_is_the_runs_own_confusion_matrices_averaged(finished):
    folder, stdout = finished
    table = _table(folder)
    for model in ("wide", "narrow"):
        per_seed = []
        for seed in SEEDS:
            cm = _confusion(folder / model / f"seed{seed}")  # what the run itself reported
            recall = np.diag(cm) / cm.sum(1)
            po, pe = np.trace(cm) / cm.sum(), (cm.sum(0) * cm.sum(1)).sum() / cm.sum() ** 2
            per_seed.append({"OA": 100 * po, "AA": 100 * recall.mean(), "κ (x100)": 100 * (po - pe) / (1 - pe),
                             **{name: 100 * r for name, r in zip(["Trees", "Grass", "Roofs", "Roads", "Water",
                                                                    "Bare soil"], recall)}})
        for row in per_seed[0]:
            values = np.array([s[row] for s in per_seed])
            cell = table["accuracy", row, model]
            assert float(cell["mean"]) == pytest.approx(values.mean(), abs=1e-4), (model, row)
            assert float(cell["std"]) == pytest.approx(values.std(ddof=1), abs=1e-4), (model, row)
            assert cell["text"] == f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"
    oa = {m: float(table["accuracy", "OA", m]["mean"]) for m in ("wide", "narrow")}
    best_row = (folder / "table.md").read_text().split("| OA |")[1].splitlines()[0]
    assert best_row.count("**") == 2 and f"**{oa[max(oa, key=oa.get)]:.2f}" in best_row  # the best OA in bold
    assert r"\toprule" in (folder / "table.tex").read_text() and "| OA |" in stdout


def test_mcnemar_from_the_runs_test_pixels_and_maps(finished):
    folder, _ = finished
    table = _table(folder)
    oa = {m: float(table["accuracy", "OA", m]["mean"]) for m in ("wide", "narrow")}
    best, other = sorted(oa, key=oa.get, reverse=True)
    for seed in SEEDS:
        pixels = {}
        for model in (best, other):
            run = folder / model / f"seed{seed}"
            with np.load(run / "test_pixels.npz") as data:
                pixels[model] = {k: data[k] for k in data.files}
            with rasterio.open(run / "predictions" / "classification_map.tif") as src:
                mapped = src.read(1)[pixels[model]["rows"], pixels[model]["cols"]]
            np.testing.assert_array_equal(pixels[model]["mapped"], mapped)  # the map the run wrote
            cm = _confusion(run)
            assert (pixels[model]["mapped"] == pixels[model]["reference"]).mean() == pytest.approx(
                np.trace(cm) / cm.sum())  # the map agrees with the run's test on every test pixel
        right = {m: pixels[m]["mapped"] == pixels[m]["reference"] for m in (best, other)}
        b, c = int((right[best] & ~right[other]).sum()), int((~right[best] & right[other]).sum())
        cell = table["significance", other, f"McNemar p, seed {seed}"]
        assert float(cell["mean"]) == pytest.approx(_mcnemar_p(b, c), rel=1e-9)
        assert cell["text"].endswith(f"({b}/{c})")
    assert (folder / "maps.png").stat().st_size > 0 and (folder / "maps.pdf").read_bytes().startswith(b"%PDF")


def test_efficiency_table_is_measured_in_the_runs(finished):
    folder, _ = finished
    table = _table(folder)
    for model, width in (("wide", 8), ("narrow", 4)):
        result = json.loads((folder / model / "seed0" / "result.json").read_text())
        assert float(table["efficiency", "trainable parameters", model]["mean"]) == result["trainable_params"]
        # the two-branch CNN: 2 conv3x3 per branch, fuse conv3x3 on 2w, a 1x1 head; BN adds 2 per channel
        bands = {"hsi": 48, "dsm": 1}
        expected = sum(9 * c * width + 2 * width + 9 * width * width + 2 * width for c in bands.values())
        expected += 9 * (2 * width) ** 2 + 2 * 2 * width + (2 * width + 1) * 6
        assert result["trainable_params"] == expected and result["frozen_params"] == 0
        assert result["flops_per_sample"] > 0 and len(result["epoch_seconds"]) == 2


@pytest.mark.slow
def test_a_killed_study_continues_to_the_same_table(tmp_path):
    extra = ["--trainer.deterministic=true"]
    straight = tmp_path / "straight"
    straight.mkdir()
    assert _run(_study(straight, epochs=4, extra=extra, seeds=[0])).returncode == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    study = _study(killed, epochs=4, extra=extra, seeds=[0])
    proc = _run(study, wait=False)
    second = killed / "out" / "syn" / "default" / "narrow" / "seed0"
    deadline = time.time() + 300
    while not (second / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its run, mid-training of its second run
    proc.wait()
    assert (killed / "out" / "syn" / "default" / "wide" / "seed0" / "result.json").exists()
    assert not (second / "result.json").exists()
    out = _run(study)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wide seed 0: done, kept" in out.stdout and "narrow seed 0: resuming from" in out.stdout
    a, b = _table(straight / "out" / "syn" / "default"), _table(killed / "out" / "syn" / "default")
    assert a.keys() == b.keys()
    for key in a:
        if key[0] != "efficiency" or key[1] in ("trainable parameters", "FLOPs per sample"):
            assert (a[key]["mean"], a[key]["std"]) == (b[key]["mean"], b[key]["std"]), key


@pytest.mark.parametrize("text, message", [
    ("seeds: [0]\n", r"expected the keys seeds, output, datasets"),
    ("datasets: {syn: {models: {a: configs/demo.yaml}}}\nextra: 1\n", r"unknown: extra"),
    ("datasets: {syn: {models: {a: missing.yaml}}}\n", r"config missing\.yaml not found"),
    ("datasets: {syn: {models: {a: {conf: x}}}}\n", r"datasets\.syn\.models\.a must be a config path or"),
    ("datasets: [\n", r"not valid YAML"),
])
def test_bad_study_files_fail_in_one_line(tmp_path, monkeypatch, text, message):
    study = tmp_path / "bad.yaml"
    study.write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        compare_main(["--study", str(study)])
    assert str(exit_.value.code).startswith(f"error: {study}: ") and "\n" not in str(exit_.value.code)
    assert re.search(message, str(exit_.value.code)), exit_.value.code


def test_a_bad_study_file_through_the_console_script(tmp_path):
    study = tmp_path / "bad.yaml"
    study.write_text("seeds: [0]\n")
    out = _run(study)
    assert out.returncode == 1 and out.stderr.strip() == (
        f"error: {study}: expected the keys seeds, output, datasets (dataset -> models, overrides), protocols, "
        "overrides"), out.stderr


@pytest.mark.parametrize("study", sorted((CONFIGS / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_reads_and_names_shipped_configs(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from elsewhere: configs are found beside the study file
    plan = read_study(study)
    runs = planned_runs(plan)
    assert runs and len({r.folder for r in runs}) == len(runs)
    assert {r.config.parent for r in runs} == {CONFIGS} and all(r.config.is_file() for r in runs)
    assert len(runs) == len(plan.seeds) * len(plan.protocols) * sum(len(m) for m in plan.datasets.values())
