"""Full-scene classification maps: assembled from prediction batches, written as GeoTIFF + PNG."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from datamodules.io import atomic_path, write_geotiff

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
    """Collects ``lightning predict`` outputs into one class map and writes it when prediction ends.

    Writes ``<output_dir>/classification_map.tif`` (uint8/uint16 classes 1..K, 0 = no data, with the
    scene's CRS and transform and a colour table) and ``classification_map.png`` (colours + legend).
    ``output_dir`` defaults to ``<trainer.log_dir>/predictions``.
    """

    def __init__(self, output_dir: str | None = None, name: str = "classification_map"):
        self.output_dir, self.name = output_dir, name
        self.class_map: np.ndarray | None = None
        self.progress = None
        self.paths: dict[str, Path] = {}

    def on_predict_start(self, trainer, pl_module) -> None:
        from datamodules.io import InputError
        from lightning_modules.reporting import Progress

        if trainer.world_size > 1:
            # Each rank would hold only its share of the windows: refuse rather than write a map with gaps.
            raise InputError("full-scene prediction does not support several processes yet; run `predict` with "
                             "--trainer.devices 1 --trainer.num_nodes 1")
        dm = trainer.datamodule
        self.class_map = np.zeros(dm.shape, dtype=np.uint16)
        # Lightning's bar shows progress and ETA; without it (logs, batch jobs) report every 10 %.
        self.progress = None if trainer.progress_bar_callback is not None else Progress("full-scene prediction",
                                                                                         bar=False)
        self._batches_done, self._start = 0, time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches_done += 1
        if self.progress is not None:
            self.progress(self._batches_done, int(sum(trainer.num_predict_batches)))
        pred = outputs["pred"].cpu().numpy().astype(np.uint16) + 1
        if "index" in outputs:
            rows, cols = outputs["index"].cpu().numpy().T
            self.class_map[rows, cols] = pred
            return
        h, w = self.class_map.shape
        for tile, (y, x), owned in zip(pred, outputs["origin"].cpu().numpy(), outputs["owned"].cpu().numpy()):
            ys, xs = np.nonzero(owned)
            gy, gx = ys + y, xs + x
            inside = (gy >= 0) & (gy < h) & (gx >= 0) & (gx < w)
            self.class_map[gy[inside], gx[inside]] = tile[ys[inside], xs[inside]]

    def on_predict_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        out = Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")
        k = len(dm.class_names)
        data = self.class_map.astype(np.uint8 if k < 255 else np.uint16)
        colormap = {0: (0, 0, 0, 255), **{i + 1: (*c, 255) for i, c in enumerate(dm.palette)}} if k < 255 else None
        tif, png = out / f"{self.name}.tif", out / f"{self.name}.png"
        write_geotiff(tif, data, dm.scene.crs, dm.scene.transform, nodata=0, colormap=colormap)
        render_png(png, data, dm.class_names, dm.palette, title=type(pl_module).__name__)
        self.paths = {"tif": tif, "png": png}
        seconds = time.perf_counter() - self._start
        rank_zero_info(f"Classification map written to {tif} and {png} ({int((data > 0).sum()):,} pixels "
                       f"predicted in {seconds:.1f} s)")
        from lightning_modules.reporting import log_picture

        log_picture(trainer, "predict/classification_map", png, f"{type(pl_module).__name__} classification map")


def ensure_map_writer(trainer) -> ClassificationMapWriter:
    for cb in trainer.callbacks:
        if isinstance(cb, ClassificationMapWriter):
            return cb
    writer = ClassificationMapWriter()
    trainer.callbacks.append(writer)
    return writer

