"""``rsfusion compare --study configs/studies/<benchmark>.yaml``: models x datasets x protocols x seeds.

A study file::

    seeds: [0, 1, 2]
    output: runs/studies/houston2013          # default: runs/studies/<file stem>
    datasets:
      houston2013:
        overrides: [--data.init_args.root=data/houston2013]   # every run on this dataset
        models:                               # column label -> config, or {config, overrides}
          TwoBranchCNN: configs/baseline_houston2013.yaml
          M3amba: {config: configs/m3amba_houston2013.yaml, overrides: [--trainer.max_epochs=50]}
    protocols:                                # protocol -> CLI overrides of every run
      official: []
      per_class_20: [--data.init_args.train_per_class=20]
    overrides: []                             # CLI overrides of every run

Overrides apply in the order study, dataset, model, protocol, then those given after ``--`` on the
command line (a later one wins).

Config paths are read relative to the working folder, else to the study file's folder or its parents.
Every run is ``<output>/<dataset>/<protocol>/<model>/seed<k>`` (a run folder as ``rsfusion fit``
writes it), run in its own process (``study_run.py``). A killed study continues where it stopped: a run
whose ``result.json`` matches its definition is not run again, an interrupted one resumes from its
``last.ckpt``, and a run whose definition changed (config file, overrides) starts anew.
Each ``<output>/<dataset>/<protocol>/`` gets ``table.md``, ``table.tex``, ``table.csv`` and
``maps.png``/``maps.pdf`` (``outputs/study_tables.py``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.writing import atomic_path
from rsfusion.lightning_modules.commands.study_run import RESULT
from rsfusion.lightning_modules.outputs.study_tables import SeedRun, maps_figure, write_tables

SPEC = "study_run.json"


@dataclass
class Study:
    path: Path
    seeds: list[int]
    output: Path
    datasets: dict[str, dict[str, tuple[Path, list[str]]]]  # dataset -> model -> (config, overrides)
    protocols: dict[str, list[str]]
    overrides: list[str]


@dataclass
class Run:
    dataset: str
    protocol: str
    model: str
    seed: int
    config: Path
    args: list[str]
    folder: Path

    @property
    def fingerprint(self) -> str:
        text = json.dumps([self.args, self.config.read_text()])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.protocol}/{self.model} seed {self.seed}"


def read_study(path: Path) -> Study:
    if not path.is_file():
        raise InputError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    unknown = sorted(set(raw) - {"seeds", "output", "datasets", "protocols", "overrides"})
    if unknown or not isinstance(raw.get("datasets"), dict) or not raw["datasets"]:
        raise InputError(f"{path}: expected the keys seeds, output, datasets (dataset -> models, overrides), "
                         f"protocols, overrides{'; unknown: ' + ', '.join(unknown) if unknown else ''}")
    datasets = {}
    for dataset, entry in raw["datasets"].items():
        models = entry.get("models") if isinstance(entry, dict) else None
        if not isinstance(models, dict) or not models or set(entry) - {"models", "overrides"}:
            raise InputError(f"{path}: datasets.{dataset} must hold models (label -> config) and optional overrides")
        shared = [str(a) for a in entry.get("overrides") or []]
        datasets[str(dataset)] = {str(label): _model(path, f"datasets.{dataset}.models.{label}", spec, shared)
                                  for label, spec in models.items()}
    protocols = {str(k): [str(a) for a in (v or [])] for k, v in (raw.get("protocols") or {"default": []}).items()}
    return Study(path, [int(s) for s in raw.get("seeds", [0, 1, 2])],
                 Path(raw.get("output", f"runs/studies/{path.stem}")), datasets, protocols,
                 [str(a) for a in raw.get("overrides") or []])


def _model(study: Path, where: str, spec, shared: list[str]) -> tuple[Path, list[str]]:
    if isinstance(spec, str):
        return _find(study, spec), shared
    if not isinstance(spec, dict) or "config" not in spec or set(spec) - {"config", "overrides"}:
        raise InputError(f"{study}: {where} must be a config path or {{config: <path>, overrides: [...]}}")
    return _find(study, str(spec["config"])), [*shared, *(str(a) for a in spec.get("overrides") or [])]


def _find(study: Path, config: str) -> Path:
    for base in (Path.cwd(), study.parent, study.parent.parent, study.parent.parent.parent):
        if (base / config).is_file():
            return (base / config).resolve()
    raise InputError(f"{study}: config {config} not found (relative to the working folder or the study file)")


def planned_runs(study: Study) -> list[Run]:
    runs = []
    for dataset, models in study.datasets.items():
        for protocol, protocol_overrides in study.protocols.items():
            for model, (config, model_overrides) in models.items():
                root = study.output / dataset / protocol / model
                for seed in study.seeds:
                    args = ["--config", str(config), "--seed_everything", str(seed), "--trainer.default_root_dir",
                            str(root), "--trainer.logger.init_args.version", f"seed{seed}", *study.overrides,
                            *model_overrides, *protocol_overrides]
                    runs.append(Run(dataset, protocol, model, seed, config, args, root / f"seed{seed}"))
    return runs


def state(run: Run) -> str:
    """``done``, ``resume`` (an interrupted run of the same definition) or ``new`` (the folder is cleared)."""
    for name in (RESULT, SPEC):
        file = run.folder / name
        if file.is_file() and json.loads(file.read_text()).get("fingerprint") != run.fingerprint:
            return "new"
    if (run.folder / RESULT).is_file():
        return "done"
    return "resume" if (run.folder / "checkpoints" / "last.ckpt").is_file() else "new"


def execute(run: Run) -> None:
    """Run one study run in its own process (its log beside its folder), unless it is done."""
    what = state(run)
    if what == "done":
        print(f"{run.name}: done, kept ({run.folder / RESULT})", flush=True)
        return
    if what == "new" and run.folder.exists():
        shutil.rmtree(run.folder)
    resume = str(run.folder / "checkpoints" / "last.ckpt") if what == "resume" else None
    spec = {"args": run.args, "run_dir": str(run.folder), "resume": resume, "fingerprint": run.fingerprint}
    with atomic_path(run.folder / SPEC) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=1))
    log = run.folder.parent / f"seed{run.seed}.log"
    print(f"{run.name}: {'resuming from ' + resume if resume else 'training'} (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("a") as handle:
        code = subprocess.call([sys.executable, "-m", "rsfusion.lightning_modules.commands.study_run",
                                str(run.folder / SPEC)], stdout=handle, stderr=subprocess.STDOUT)
    if code != 0 or not (run.folder / RESULT).is_file():
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["(empty)"]
        raise InputError(f"{run.name} failed (exit {code}); {log}: {last[0].strip()[:300]}")
    oa = json.loads((run.folder / RESULT).read_text())["metrics"]["OA"]
    print(f"{run.name}: OA {100 * oa:.2f} % in {time.perf_counter() - start:.0f} s", flush=True)


def finished(runs: list[Run]) -> dict[str, list[SeedRun]]:
    out: dict[str, list[SeedRun]] = {}
    for run in runs:
        out.setdefault(run.model, []).append(SeedRun(run.seed, run.folder,
                                                     json.loads((run.folder / RESULT).read_text())))
    names = {model: seeds[0].result["class_names"] for model, seeds in out.items()}
    if len({tuple(n) for n in names.values()}) > 1:
        raise InputError(f"models of one table must share classes: {names}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="rsfusion compare --study", description=__doc__.split("\n")[0],
                                     epilog="Arguments after -- are added to every run's overrides (last, so they "
                                            "win), e.g. -- --trainer.max_epochs=3")
    parser.add_argument("--study", type=Path, required=True, help="the study file (configs/studies/*.yaml)")
    parser.add_argument("--output", type=Path, help="overrides the study file's output folder")
    args = parser.parse_args(argv)
    try:
        study = read_study(args.study)
        if args.output:
            study.output = args.output
        study.protocols = {name: [*overrides, *extra] for name, overrides in study.protocols.items()}
        runs = planned_runs(study)
        start = time.perf_counter()
        for run in runs:
            execute(run)
        for dataset in study.datasets:
            for protocol in study.protocols:
                folder = study.output / dataset / protocol
                results = finished([r for r in runs if (r.dataset, r.protocol) == (dataset, protocol)])
                paths = write_tables(folder, results)
                figures = maps_figure(folder / "maps", results)
                print(f"\n## {dataset}, {protocol}\n\n{paths['md'].read_text()}")
                print("Written: " + ", ".join(str(p) for p in [*paths.values(), *figures]))
        print(f"Study wall time: {time.perf_counter() - start:.0f} s ({len(runs)} runs)")
    except InputError as err:
        sys.exit(f"error: {err}")
