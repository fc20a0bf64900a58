"""Full-scene classification maps: assembled from prediction batches, written as GeoTIFF + PNG."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rsfusion.datamodules.io import GeoTiffWriter, atomic_path, read_preview

log = logging.getLogger(__name__)


def render_png(path: str | Path, class_map: np.ndarray, class_names: list[str], palette: list[tuple[int, int, int]],
               title: str | None = None) -> None:
    """A colour map with a legend (0 = no data, black), written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = np.array([(0, 0, 0)] + [tuple(c) for c in palette], dtype=np.uint8)
    rgb = colours[np.clip(class_map, 0, len(palette))]
    h, w = class_map.shape
    fig_w = 6 + 2.5
    fig, ax = plt.subplots(figsize=(fig_w, max(3.0, 6 * h / max(w, 1))), dpi=150)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="k", label=name) for name, c in zip(class_names, palette)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)


class ClassificationMapWriter(Callback):
    """Writes ``lightning predict`` outputs into one class map, on one process or several (DDP).

    Writes ``<output_dir>/classification_map.tif`` (uint8/uint16 classes 1..K, 0 = no data, with the
    scene's CRS and transform and a colour table) and ``classification_map.png`` (colours + legend).
    ``output_dir`` defaults to ``<trainer.log_dir>/predictions``.

    Each process writes its predictions into its own disk-backed part (a memory-mapped ``.npy`` in
    a hidden folder beside the map), so no process holds the map in memory; when all are done, the
    first process merges the parts in row strips, checking that every sample was predicted once and
    no pixel twice, writes the GeoTIFF and the PNG (downsampled for large scenes) and removes the parts.
    """

    STRIP_ROWS = 512
    PNG_MAX_SIDE = 1024  # a preview; the GeoTIFF has every pixel

    def __init__(self, output_dir: str | None = None, name: str = "classification_map"):
        self.output_dir, self.name = output_dir, name
        self.progress = None
        self.paths: dict[str, Path] = {}

    def _parts_dir(self) -> Path:
        return self._out / f".{self.name}.parts"

    def on_predict_start(self, trainer, pl_module) -> None:
        from rsfusion.lightning_modules.reporting import Progress

        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        self._out = Path(self.output_dir or Path(log_dir or trainer.default_root_dir) / "predictions")
        parts = self._parts_dir()
        if trainer.is_global_zero:
            shutil.rmtree(parts, ignore_errors=True)
            parts.mkdir(parents=True)
        trainer.strategy.barrier("map_parts_ready")
        shape = trainer.datamodule.shape
        self._part = np.lib.format.open_memmap(parts / f"rank{trainer.global_rank}.npy", mode="w+",
                                               dtype=np.uint16, shape=shape)
        self._samples = self._double = 0
        # Lightning's bar shows progress and ETA; without it (logs, batch jobs) report every 10 %.
        self.progress = None if trainer.progress_bar_callback is not None else Progress("full-scene prediction",
                                                                                         bar=False)
        self._batches_done, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches_done += 1
        if self.progress is not None:
            self.progress(self._batches_done, int(sum(trainer.num_predict_batches)))
        pred = outputs["pred"].cpu().numpy().astype(np.uint16) + 1
        self._samples += len(pred)
        if "index" in outputs:
            rows, cols = outputs["index"].cpu().numpy().T
            self._write(rows, cols, pred)
            return
        h, w = self._part.shape
        for tile, (y, x), owned in zip(pred, outputs["origin"].cpu().numpy(), outputs["owned"].cpu().numpy()):
            ys, xs = np.nonzero(owned)
            gy, gx = ys + y, xs + x
            inside = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
            self._write(gy[inside], gx[inside], tile[ys[inside], xs[inside]])

    def _write(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        self._double += int((self._part[rows, cols] != 0).sum())
        self._part[rows, cols] = values

    def on_predict_end(self, trainer, pl_module) -> None:
        parts = self._parts_dir()
        self._part.flush()
        del self._part
        (parts / f"rank{trainer.global_rank}.json").write_text(
            json.dumps({"samples": self._samples, "double": self._double}))
        trainer.strategy.barrier("map_parts_written")
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        expected = len(dm.predict_dataset)
        tif, png = self._out / f"{self.name}.tif", self._out / f"{self.name}.png"
        predicted = self._merge(parts, trainer.world_size, expected, tif, dm)
        shutil.rmtree(parts, ignore_errors=True)
        render_png(png, read_preview(tif, self.PNG_MAX_SIDE), dm.class_names, dm.palette,
                   title=type(pl_module).__name__)
        self.paths = {"tif": tif, "png": png}
        seconds = time.perf_counter() - self._start
        rank_zero_info(f"Classification map written to {tif} and {png} ({predicted:,} pixels "
                       f"predicted in {seconds:.1f} s)")
        from rsfusion.lightning_modules.reporting import log_picture

        log_picture(trainer, "predict/classification_map", png, f"{type(pl_module).__name__} classification map")

    def _merge(self, parts: Path, world_size: int, expected: int, tif: Path, dm) -> int:
        """Merge the ranks' parts into ``tif`` (atomically); returns the number of predicted pixels."""
        missing = [f"rank{r}.json" for r in range(world_size) if not (parts / f"rank{r}.json").is_file()]
        if missing:
            raise RuntimeError(f"{parts}: no prediction part from {', '.join(missing)}; with several nodes the "
                               "map's output directory must be on a filesystem every node shares")
        metas = [json.loads((parts / f"rank{r}.json").read_text()) for r in range(world_size)]
        samples, double = sum(m["samples"] for m in metas), sum(m["double"] for m in metas)
        maps = [np.load(parts / f"rank{r}.npy", mmap_mode="r") for r in range(world_size)]
        k = len(dm.class_names)
        dtype = np.uint8 if k < 255 else np.uint16
        colormap = {0: (0, 0, 0, 255), **{i + 1: (*c, 255) for i, c in enumerate(dm.palette)}} if k < 255 else None
        predicted = 0
        with GeoTiffWriter(tif, maps[0].shape, dtype, dm.reference.crs, dm.reference.transform, nodata=0,
                           colormap=colormap) as out:
            for r0 in range(0, maps[0].shape[0], self.STRIP_ROWS):
                strips = np.stack([m[r0:r0 + self.STRIP_ROWS] for m in maps])
                double += int(((strips > 0).sum(axis=0) > 1).sum())
                strip = strips.max(axis=0)
                predicted += int((strip > 0).sum())
                out.write(strip.astype(dtype), r0)
            if samples != expected or double:
                raise RuntimeError(f"full-scene prediction over {world_size} process(es) predicted {samples} of "
                                   f"{expected} samples and wrote {double} pixels more than once")
        return predicted


def ensure_map_writer(trainer) -> ClassificationMapWriter:
    for cb in trainer.callbacks:
        if isinstance(cb, ClassificationMapWriter):
            return cb
    writer = ClassificationMapWriter()
    trainer.callbacks.append(writer)
    return writer

