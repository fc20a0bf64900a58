"""One run of a study, in its own process (``rsfusion compare --study`` starts it): fit (or resume from
``last.ckpt``), test the evaluation checkpoint, map the scene, and measure what the run cost.

Writes into the run folder, each file atomically, ``result.json`` last (its presence marks the run done):

- ``test_pixels.npz``: the (row, col), reference class and mapped class of every test pixel (McNemar);
- ``ground_truth.npy``: every labelled pixel of the scene (train, val, test), for the maps figure;
- ``result.json``: the test metrics, parameter counts, FLOPs per sample, seconds per training epoch,
  full-scene prediction throughput, peak memory, and the paths of the map and checkpoint.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

from rsfusion.datamodules.writing import atomic_path
from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs, evaluation_checkpoint
from rsfusion.lightning_modules.outputs.efficiency import (
    EpochTimer,
    flops_per_sample,
    parameter_counts,
    peak_memory_bytes,
)
from rsfusion.lightning_modules.outputs.maps import ensure_map_writer

RESULT = "result.json"


def run(args: list[str], run_dir: Path, resume: str | None) -> dict:
    cli = RSFusionCLI(**cli_kwargs(), args=args, run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    timer = EpochTimer()
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    ckpt = evaluation_checkpoint(trainer)
    (results,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)
    flops = flops_per_sample(model, next(iter(datamodule.test_dataloader())))
    writer = ensure_map_writer(trainer)
    start = time.perf_counter()
    trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt, return_predictions=False)
    predict_seconds = time.perf_counter() - start
    height, width = datamodule.shape
    labels = datamodule.label_rasters
    _save_test_pixels(run_dir, labels["test"], writer.paths["tif"])
    with atomic_path(run_dir / "ground_truth.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, sum(labels.values()).astype(np.uint8))
    return {"model": type(model).__name__, "sampling": datamodule.sampling, "patch_size": datamodule.patch_size,
            "metrics": {k.removeprefix("test/"): float(v) for k, v in results.items() if k.startswith("test/")},
            "class_names": list(datamodule.class_names), "palette": [list(c) for c in datamodule.palette or []],
            **parameter_counts(model), "flops_per_sample": flops,
            "epoch_seconds": timer.seconds, "predict_seconds": predict_seconds,
            "pixels_per_second": height * width / predict_seconds,
            "peak_memory_bytes": peak_memory_bytes(model.device),
            "data_seed": datamodule.hparams.get("seed"), "map": str(writer.paths["tif"]), "checkpoint": ckpt}


def _save_test_pixels(run_dir: Path, test: np.ndarray, map_path: Path) -> None:
    with rasterio.open(map_path) as src:
        mapped = src.read(1)
    rows, cols = np.nonzero(test)
    with atomic_path(run_dir / "test_pixels.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, rows=rows, cols=cols, reference=test[rows, cols], mapped=mapped[rows, cols])


def main(argv: list[str] | None = None) -> None:
    spec = json.loads(Path((sys.argv[1:] if argv is None else argv)[0]).read_text())
    run_dir = Path(spec["run_dir"])
    result = run(spec["args"], run_dir, spec.get("resume"))
    result["fingerprint"] = spec["fingerprint"]
    with atomic_path(run_dir / RESULT) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
