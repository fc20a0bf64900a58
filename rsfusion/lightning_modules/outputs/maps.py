"""Full-scene classification maps: assembled from prediction batches, written as GeoTIFF + PNG."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from rasterio.errors import RasterioError

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.io import read_preview
from rsfusion.datamodules.writing import GeoTiffWriter, atomic_path
from rsfusion.lightning_modules.outputs.map_set import SET_TAG, SetLock, commit, manifest_path, write_failure
from rsfusion.lightning_modules.outputs.reporting import Progress, log_picture

log = logging.getLogger(__name__)


# A palette with distinct, print-friendly colours (black is kept for "no data").
DEFAULT_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]


def class_colours(palette, num_classes: int) -> list[tuple[int, int, int]]:
    """The map colours of classes 1..K: the DataModule's ``palette`` if it has one, else the default's."""
    if palette:
        return [tuple(int(v) for v in c) for c in palette]
    return [DEFAULT_PALETTE[k % len(DEFAULT_PALETTE)] for k in range(num_classes)]


def render_png(path: str | Path, classes: np.ndarray, class_names: list[str], palette: list[tuple[int, int, int]],
               title: str | None = None) -> None:
    """A colour map with a legend (0 = no data, black), written atomically."""
    colours = np.array([(0, 0, 0)] + [tuple(c) for c in palette], dtype=np.uint8)
    rgb = colours[np.clip(classes, 0, len(palette))]
    h, w = classes.shape
    fig_w = 6 + 2.5
    fig = Figure(figsize=(fig_w, max(3.0, 6 * h / max(w, 1))), dpi=150)
    ax = fig.subplots()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="k", label=name) for name, c in zip(class_names, palette)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


ProbabilityFormat = Literal["none", "float16", "uint8"]
ConfidenceMeasure = Literal["max", "margin", "entropy"]
CONFIDENCE_DESCRIPTIONS = {"max": "max probability", "margin": "margin (top1 - top2 probability)",
                           "entropy": "normalised entropy (0 = certain, 1 = uniform)"}


def confidence_bands(probs: np.ndarray, measures: Sequence[str]) -> np.ndarray:
    """(len(measures), n) confidence of (K, n) class probabilities: the top probability, the margin
    between the two highest, or the Shannon entropy divided by log K (0 = one class, 1 = uniform)."""
    out = np.empty((len(measures), probs.shape[1]), dtype=np.float32)
    top2 = -np.partition(-probs, min(1, probs.shape[0] - 1), axis=0)[:2]
    for i, measure in enumerate(measures):
        if measure == "max":
            out[i] = top2[0]
        elif measure == "margin":
            out[i] = top2[0] - top2[1] if probs.shape[0] > 1 else 1.0
        else:
            logs = np.log(np.clip(probs, 1e-12, None))
            out[i] = -(probs * logs).sum(axis=0) / max(np.log(probs.shape[0]), 1e-12)
    return out


def disk_array(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    """A zero-filled array memory-mapped from ``path`` whose disk blocks are reserved now: a full disk is an
    error here, not a crash (SIGBUS) when a page of a sparse file is first written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "rb+") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.path.getsize(path))
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate
                raise
    return array


class ClassificationMapWriter(BasePredictionWriter):
    """Writes ``lightning predict`` outputs into one class map, on one process or several (DDP).

    Each prediction batch carries where its samples lie: ``index`` (row, col of each pixel sample)
    or ``origin`` + ``owned`` (tile corners and the pixels each tile owns); the model's
    ``predict_step`` gives ``pred`` (classes 0..K-1) and, when the writer asks, ``probs``.

    Writes ``<output_dir>/<name>.tif`` (uint8/uint16 classes 1..K, 0 = no data, with the scene's CRS
    and transform, a colour table, the class names as GDAL category names in ``<name>.tif.aux.xml``,
    which QGIS shows as the legend, and as the ``CLASS_NAMES`` tag) and ``<name>.png`` (colours +
    legend). ``output_dir`` defaults to ``<trainer.log_dir>/predictions``.

    Args:
        probabilities: also write ``<name>_probabilities.tif``, one band per class (band descriptions
            = class names): ``float16`` (half floats, NaN = no data) or ``uint8`` (round(255 p), GDAL
            scale 1/255, all bands 0 = no data); ``none`` (default) writes none.
        confidence: also write ``<name>_confidence.tif`` (float32, NaN = no data) with one band per
            measure, in the order given: ``max`` (top probability), ``margin`` (top1 - top2),
            ``entropy`` (Shannon entropy / log K). Default: none.
        cog: write every raster as a Cloud-Optimised GeoTIFF with overviews (NEAREST for classes,
            AVERAGE for probabilities and confidence). Default: plain tiled GeoTIFF, no overviews.

    Each process writes its predictions into its own disk-backed parts (memory-mapped ``.npy`` in a
    hidden folder of this prediction beside the map; probabilities take 2 bytes per class and pixel),
    so no process holds the map in memory; when all are done, the first process merges the parts in
    row strips, checking that every sample was predicted once and no pixel twice, writes the GeoTIFFs
    and the PNG (downsampled for large scenes) into a staging folder and commits them as one set
    with ``<name>.manifest.json`` written last (:mod:`rsfusion.lightning_modules.outputs.map_set`). A second
    prediction into the same folder is refused while one runs.
    """

    STRIP_ROWS = 512
    STRIP_BYTES = 2 ** 26  # of merged strip per raster, at most (with at least 16 rows)
    PNG_MAX_SIDE = 1024  # a preview; the GeoTIFF has every pixel

    def __init__(self, output_dir: str | None = None, name: str = "classification_map",
                 probabilities: ProbabilityFormat = "none",
                 confidence: ConfidenceMeasure | list[ConfidenceMeasure] | None = None, cog: bool = False):
        super().__init__(write_interval="batch")
        if probabilities not in ("none", "float16", "uint8"):
            raise InputError(f"map probabilities must be float16, uint8 or none, got {probabilities!r}")
        measures = [confidence] if isinstance(confidence, str) else list(confidence or [])
        measures = [m for m in measures if m != "none"]
        bad = [m for m in measures if m not in CONFIDENCE_DESCRIPTIONS]
        if bad:
            raise InputError(f"map confidence must be among max, margin, entropy (or none), got {bad[0]!r}")
        self.output_dir, self.name = output_dir, name
        self.probabilities, self.confidence, self.cog = probabilities, measures, cog
        self.progress = None
        self.paths: dict[str, Path] = {}
        self._lock: SetLock | None = None

    @property
    def wants_probabilities(self) -> bool:
        return self.probabilities != "none" or bool(self.confidence)

    def _parts_dir(self) -> Path:
        return self._out / f".{self.name}.parts-{self._set_id}"

    def _staging_dir(self) -> Path:
        return self._out / f".{self.name}.staging-{self._set_id}"

    def _claim(self, trainer) -> None:
        """Rank 0 claims the output folder for this prediction's set; every rank learns the set id or the refusal."""
        decision = (None, None)
        if trainer.is_global_zero:
            lock = SetLock(self._out, self.name, uuid.uuid4().hex[:12])
            try:
                removed = lock.acquire()
                decision, self._lock = (lock.set_id, None), lock
                if removed:
                    rank_zero_info(f"Removed what an interrupted prediction left in {self._out}: {', '.join(removed)}")
            except InputError as err:
                decision = (None, str(err))
        self._set_id, refusal = trainer.strategy.broadcast(decision)
        if refusal is not None:
            raise InputError(refusal)

    def _release(self) -> None:
        if self._lock is not None:
            for folder in (self._parts_dir(), self._staging_dir()):
                shutil.rmtree(folder, ignore_errors=True)
            self._lock.release()
            self._lock = None

    @contextlib.contextmanager
    def _writing(self):
        """Disk full, a file-size limit, a quota: one line naming the map, not a traceback."""
        try:
            yield
        except (OSError, RasterioError) as err:
            failure = write_failure(err, self._out / f"{self.name}.tif")
            if failure is None:
                raise
            raise failure from None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._part = self._probs = self._conf = None
        self._release()

    def on_predict_start(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self._out = Path(self.output_dir or Path(log_dir or trainer.default_root_dir) / "predictions")
        self._claim(trainer)
        parts = self._parts_dir()
        if trainer.is_global_zero:
            parts.mkdir(parents=True)
        trainer.strategy.barrier("map_parts_ready")
        shape = trainer.datamodule.shape
        rank = trainer.global_rank
        k = len(trainer.datamodule.class_names)
        with self._writing():
            self._part = disk_array(parts / f"rank{rank}.npy", np.uint16, shape)
            self._probs = disk_array(parts / f"rank{rank}.probabilities.npy", np.float16,
                                     (k, *shape)) if self.probabilities != "none" else None
            self._conf = disk_array(parts / f"rank{rank}.confidence.npy", np.float32,
                                    (len(self.confidence), *shape)) if self.confidence else None
        # the model computes class probabilities only when a map asks for them
        pl_module.predict_probabilities = self.wants_probabilities
        self._samples = self._double = 0
        # Lightning's bar shows progress and ETA; without it (logs, batch jobs) report every 10 %.
        self.progress = None if trainer.progress_bar_callback is not None else Progress("full-scene prediction",
                                                                                         bar=False)
        self._batches_done, self._start = 0, time.perf_counter()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        self._batches_done += 1
        if self.progress is not None:
            self.progress(self._batches_done, int(sum(trainer.num_predict_batches)))
        pred = prediction["pred"].cpu().numpy().astype(np.uint16) + 1
        probs = prediction["probs"].float().cpu().numpy() if self.wants_probabilities else None
        self._samples += len(pred)
        if "index" in batch:
            rows, cols = batch["index"].cpu().numpy().T
            self._write(rows, cols, pred, None if probs is None else probs.T)
            return
        h, w = self._part.shape
        for i, ((y, x), owned) in enumerate(zip(batch["origin"].cpu().numpy(), batch["owned"].cpu().numpy())):
            ys, xs = np.nonzero(owned)
            gy, gx = ys + y, xs + x
            inside = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
            ys, xs = ys[inside], xs[inside]
            self._write(gy[inside], gx[inside], pred[i][ys, xs], None if probs is None else probs[i][:, ys, xs])

    def _write(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, probs: np.ndarray | None) -> None:
        """Classes of pixels (rows, cols) and, if asked for, their (K, n) probabilities."""
        self._double += int((self._part[rows, cols] != 0).sum())
        self._part[rows, cols] = values
        if self._probs is not None:
            self._probs[:, rows, cols] = probs
        if self._conf is not None:
            self._conf[:, rows, cols] = confidence_bands(probs, self.confidence)

    def on_predict_end(self, trainer, pl_module) -> None:
        pl_module.predict_probabilities = False
        parts = self._parts_dir()
        for part in (self._part, self._probs, self._conf):
            if part is not None:
                part.flush()
        self._part = self._probs = self._conf = None
        (parts / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"samples": self._samples, "double": self._double}))
        trainer.strategy.barrier("map_parts_written")
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        expected = len(dm.predict_dataset)
        staging = self._staging_dir()
        try:
            with self._writing():
                paths, predicted = self._merge(parts, trainer.world_size, expected, dm, staging)
                shutil.rmtree(parts, ignore_errors=True)
                png = staging / f"{self.name}.png"
                render_png(png, read_preview(paths["tif"], self.PNG_MAX_SIDE), dm.class_names,
                           class_colours(dm.palette, len(dm.class_names)), title=type(pl_module).__name__)
                ckpt = getattr(trainer, "ckpt_path", None)
                commit(staging, self._out, self.name, self._set_id, None if ckpt is None else str(ckpt))
        finally:
            self._release()
        self.paths = {key: self._out / path.name for key, path in {**paths, "png": png}.items()}
        self.paths["manifest"] = manifest_path(self._out, self.name)
        seconds = time.perf_counter() - self._start
        written = ", ".join(str(path) for key, path in self.paths.items())
        rank_zero_info(f"Classification map written to {written} ({predicted:,} pixels "
                       f"predicted in {seconds:.1f} s)")

        log_picture(trainer, "predict/classification_map", self.paths["png"],
                    f"{type(pl_module).__name__} classification map")

    def _writers(self, shape: tuple[int, int], dm, folder: Path) -> dict[str, GeoTiffWriter]:
        """The GeoTIFFs to write in ``folder``: the class map, and the probability and confidence rasters if
        asked for, each tagged with the set's id."""
        k = len(dm.class_names)
        crs, transform = dm.reference.crs, dm.reference.transform
        names = json.dumps(list(dm.class_names))
        tag = {SET_TAG: self._set_id}
        dtype = np.uint8 if k < 255 else np.uint16
        colours = enumerate(class_colours(dm.palette, k))
        colormap = {0: (0, 0, 0, 255), **{i + 1: (*c, 255) for i, c in colours}} if k < 255 else None
        writers = {"tif": GeoTiffWriter(
            folder / f"{self.name}.tif", shape, dtype, crs, transform, nodata=0, colormap=colormap,
            descriptions=["class"], tags={"CLASS_NAMES": names, **tag}, category_names=["no data", *dm.class_names],
            cog=self.cog, resampling="nearest")}
        if self.probabilities != "none":
            uint8 = self.probabilities == "uint8"
            writers["probabilities"] = GeoTiffWriter(
                folder / f"{self.name}_probabilities.tif", shape, np.uint8 if uint8 else np.float16, crs,
                transform, nodata=None if uint8 else float("nan"), count=k, descriptions=list(dm.class_names),
                tags={"CLASS_NAMES": names, "PROBABILITY_SCALE": "1/255" if uint8 else "1", **tag},
                scale=1 / 255 if uint8
                else None, cog=self.cog, resampling="average")
        if self.confidence:
            writers["confidence"] = GeoTiffWriter(
                folder / f"{self.name}_confidence.tif", shape, np.float32, crs, transform, nodata=float("nan"),
                count=len(self.confidence), descriptions=[CONFIDENCE_DESCRIPTIONS[m] for m in self.confidence],
                tags={"CONFIDENCE_MEASURES": json.dumps(self.confidence), **tag}, cog=self.cog, resampling="average")
        return writers

    def _strip_rows(self, width: int, bands: int, world_size: int) -> int:
        rows = self.STRIP_BYTES // max(1, width * bands * 4 * world_size)
        return int(min(self.STRIP_ROWS, max(16, rows)))

    def _merge(self, parts: Path, world_size: int, expected: int, dm, folder: Path) -> tuple[dict[str, Path], int]:
        """Merge the ranks' parts into the GeoTIFFs in ``folder``; returns their paths and the predicted pixels."""
        missing = [f"rank{r}.json" for r in range(world_size) if not (parts / f"rank{r}.json").is_file()]
        if missing:
            raise RuntimeError(f"{parts}: no prediction part from {', '.join(missing)}; with several nodes the "
                               "map's output directory must be on a filesystem every node shares")
        metas = [json.loads((parts / f"rank{r}.json").read_text()) for r in range(world_size)]
        samples, double = sum(m["samples"] for m in metas), sum(m["double"] for m in metas)
        maps = [np.load(parts / f"rank{r}.npy", mmap_mode="r") for r in range(world_size)]
        extra = {kind: [np.load(parts / f"rank{r}.{kind}.npy", mmap_mode="r") for r in range(world_size)]
                 for kind in ("probabilities", "confidence") if (parts / f"rank0.{kind}.npy").is_file()}
        shape = maps[0].shape
        bands = max([1] + [p[0].shape[0] for p in extra.values()])
        step = self._strip_rows(shape[1], bands, world_size)
        writers = self._writers(shape, dm, folder)
        predicted = 0
        with contextlib.ExitStack() as stack:
            outs = {key: stack.enter_context(w) for key, w in writers.items()}
            for r0 in range(0, shape[0], step):
                strips = np.stack([m[r0:r0 + step] for m in maps])
                double += int(((strips > 0).sum(axis=0) > 1).sum())
                strip = strips.max(axis=0)
                predicted += int((strip > 0).sum())
                outs["tif"].write(strip, r0)
                for kind, ranks in extra.items():
                    # each pixel comes from one rank, the others hold zeros: the sum is that rank's value
                    values = sum(part[:, r0:r0 + step].astype(np.float32) for part in ranks)
                    if kind == "probabilities" and self.probabilities == "uint8":
                        values = np.rint(np.where(strip > 0, values, 0) * 255)
                    else:
                        values = np.where(strip > 0, values, np.nan)
                    outs[kind].write(values, r0)
            if samples != expected or double:
                raise RuntimeError(f"full-scene prediction over {world_size} process(es) predicted {samples} of "
                                   f"{expected} samples and wrote {double} pixels more than once")
        return {key: w.path for key, w in writers.items()}, predicted


def ensure_map_writer(trainer) -> ClassificationMapWriter:
    for cb in trainer.callbacks:
        if isinstance(cb, ClassificationMapWriter):
            return cb
    writer = ClassificationMapWriter()
    trainer.callbacks.append(writer)
    return writer

