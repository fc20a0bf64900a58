"""What a checkpoint records about the input its model expects, and the checks of a new scene against it.

A :class:`~rsfusion.datamodules.raster.RasterDataModule` saves, beside its normalisation statistics, the
options it actually used (:func:`input_options`: modality names, order and band counts, class
names and palette, patch size, sampling, normalisation settings, PCA, nodata...), so that
``lightning predict --ckpt_path best.ckpt --data '{modalities: {...}}'`` can map an unlabelled scene
with nothing else given (:func:`read_checkpoint_inputs`; the CLI merges them under the user's options).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.label_set import labels_digest
from rsfusion.datamodules.normalization import Normalizer

# RasterDataModule options that name files of one scene: never carried from a checkpoint to another scene
SCENE_FILES = ("modalities", "train_labels", "test_labels", "val_labels", "labels")
# options that shape the network's input: a checkpoint's value is what the model was trained on
INPUT_KEYS = ("sampling", "patch_size", "allow_even_patch", "normalization", "normalization_overrides",
              "normalize_on", "clip_percentile", "pca", "nodata", "label_nodata", "train_stride", "batch_size",
              "eval_batch_size", "num_workers", "seed", "predict_window")


def input_options(dm) -> dict[str, Any]:
    """The options a DataModule really used (after its subclass's own defaults): plain types for checkpoints."""
    hp = dm.hparams
    options = {key: hp.get(key) for key in INPUT_KEYS if key in hp}
    options.update(sampling=dm.sampling, patch_size=dm.patch_size, batch_size=dm.batch_size,
                   eval_batch_size=dm.eval_batch_size, num_workers=dm.num_workers,
                   allow_even_patch=bool(hp.get("allow_even_patch")
                                         or (dm.sampling == "pixel" and dm.patch_size % 2 == 0)))
    palette = [list(c) for c in dm.palette] if dm.palette else None
    return {**options, "class_names": list(dm.class_names), "palette": palette,
            "modality_bands": [[name, int(bands)] for name, bands in dm._bands.items()],
            "in_channels": [[name, int(c)] for name, c in dm.in_channels.items()]}


@dataclass
class CheckpointInputs:
    """A checkpoint's model class and the RasterDataModule options a new scene is read with."""

    path: str
    model_class: str | None
    data: dict[str, Any]  # RasterDataModule init arguments, without the scene's files
    in_channels: dict[str, int]  # modality -> channels the network takes, in the order it takes them
    raw_bands: dict[str, int]  # modality -> bands of the rasters the normalisation was fitted on
    datamodule_state: dict | None

    def checked(self, modalities: Mapping[str, str], bands: Mapping[str, int]) -> None:
        """A one-line error if ``modalities`` (name -> file) with ``bands`` do not fit this checkpoint."""
        check_modalities(self.raw_bands or self.in_channels, bands, modalities, f"the checkpoint {self.path}",
                         what="bands" if self.raw_bands else "channels")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint file's content (tensors and plain types only: ``weights_only``), or a one-line error."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds for a truncated, foreign or pickled file
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(f"{path}: not a readable checkpoint ({type(err).__name__}: {detail[:200]})") from None
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    return ckpt


def init_options(datamodule_class: type) -> set[str]:
    """The arguments of ``datamodule_class``'s constructor."""
    return set(inspect.signature(datamodule_class.__init__).parameters) - {"self"}


def read_checkpoint_inputs(path: str | Path, data_options: Collection[str]) -> CheckpointInputs:
    """Read what ``path`` (a Lightning checkpoint of a RasterDataModule run) says about its input; of its
    DataModule options, those named in ``data_options`` (the RasterDataModule's, :func:`init_options`)."""
    ckpt = read_checkpoint(path)
    model_hp = dict(ckpt.get("hyper_parameters") or {})
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    data_class = str(data_hp.get("_class_path") or ckpt.get("datamodule_hparams_name") or "")
    state = None
    for key, value in ckpt.items():  # Lightning stores it under the DataModule's class name
        if isinstance(value, dict) and "normalizers" in value and (not data_class or data_class.endswith(key)):
            state = value
    saved = dict((state or {}).get("input") or {})
    allowed = set(data_options) - set(SCENE_FILES)
    if saved:
        data = {k: v for k, v in saved.items() if k in allowed}
        in_channels = {name: int(c) for name, c in saved["in_channels"]}
    else:  # checkpoints written before the DataModule saved its input options: its config and the model's
        data = {k: v for k, v in data_hp.items() if k in allowed and not k.startswith("_")}
        data["class_names"] = model_hp.get("class_names") or data.get("class_names")
        if data.get("sampling", "pixel") == "pixel" and data.get("patch_size", 1) % 2 == 0:
            data["allow_even_patch"] = True  # it was allowed when this model was trained
        in_channels = {name: int(c) for name, c in (model_hp.get("in_channels") or {}).items()}
    raw = {name: len(s["offset"]) for name, s in (state or {}).get("normalizers", {}).items()}
    raw = {name: raw[name] for name in in_channels if name in raw} if set(raw) == set(in_channels) else {}
    return CheckpointInputs(str(path), model_hp.get("_class_path"), data, in_channels, raw, state)


def check_modalities(expected: Mapping[str, int], actual: Mapping[str, int], files: Mapping[str, str] | None = None,
                     source: str = "the checkpoint", what: str = "bands") -> None:
    """One clear line when the data's modalities (name -> band count) differ from what the model was
    trained on: a missing, extra or renamed modality, a band count, or the order the model sees them in."""
    files = files or {}

    def where(name: str) -> str:
        return f"{files[name]} (modality {name!r})" if name in files else f"modality {name!r}"

    listed = ", ".join(f"{n} ({b} {what})" for n, b in expected.items())
    extra = [n for n in actual if n not in expected]
    missing = [n for n in expected if n not in actual]
    if extra:
        hint = f"; {', '.join(missing)} missing (renamed?)" if missing else ""
        raise InputError(f"{where(extra[0])}: not a modality {source} was trained on: {listed}{hint}")
    if missing:
        raise InputError(f"modality {missing[0]!r} is missing: {source} was trained on {listed}, the data gives "
                         f"{', '.join(actual) or 'none'}")
    for name, count in expected.items():
        if int(actual[name]) != int(count):
            raise InputError(f"{where(name)}: {actual[name]} {what}, {source} was trained on {count}")
    if list(actual) != list(expected):
        raise InputError(f"modalities are given in the order {', '.join(actual)}; {source} takes them in the order "
                         f"{', '.join(expected)} (the order the model sees them)")


def _same_normalizer(a: Normalizer, b: Normalizer | None) -> bool:
    if b is None:
        return False
    sa, sb = a.state(), b.state()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and np.allclose(sa[k], sb[k], rtol=1e-3, atol=1e-5) for k in sa)


def datamodule_state(dm) -> dict:
    """The fitted normalisation goes into checkpoints, so prediction normalises as training did; what a
    new scene must look like (``lightning predict --ckpt_path``); and the split's fingerprint, so a
    checkpoint is never tested on another split of the same labels."""
    state = {}
    if dm.label_rasters is not None:
        state["split"] = {"seed": int(dm.hparams.seed), "labels": dm.label_set.digest,
                          "split": labels_digest(dm.label_rasters)}
    if dm.normalizers is not None:
        # tensors, not numpy arrays: checkpoints are loaded with torch.load(weights_only=True)
        state["normalizers"] = {name: {k: torch.from_numpy(np.array(v)) for k, v in n.state().items()}
                                for name, n in dm.normalizers.items()}
        state["input"] = input_options(dm)
    return state


def restore_datamodule_state(dm, state_dict: dict) -> None:
    """Check a checkpoint's split fingerprint against ``dm``'s split, and give ``dm`` its normalisation."""
    split = state_dict.get("split")
    predicting = dm.trainer is not None and dm.trainer.predicting  # a map does not use the split
    if split and not predicting and dm.label_rasters is not None and split["labels"] == dm.label_set.digest \
            and split["split"] != labels_digest(dm.label_rasters):
        raise InputError(f"{dm.hparams.labels or dm.hparams.train_labels}: the checkpoint was trained on "
                         f"another split of these labels (split seed {split['seed']}, here {dm.hparams.seed}): "
                         f"its test pixels would not be the ones held out; pass --data.init_args.seed "
                         f"{split['seed']} (or the run's --seed_everything)")
    if "normalizers" not in state_dict:
        return
    saved = {name: Normalizer.from_state({k: np.asarray(v) for k, v in s.items()})
             for name, s in state_dict["normalizers"].items()}
    check_modalities({name: len(n.stats.offset) for name, n in saved.items()}, dm._bands, dm.modalities,
                     "the checkpoint's normalisation")
    if dm.scene is not None:  # already normalised with its own statistics: say if they differ
        for name, normalizer in saved.items():
            if not _same_normalizer(normalizer, dm.scene.normalizers.get(name)):
                rank_zero_warn(f"{dm.modalities.get(name, name)}: normalisation statistics differ from the "
                               "checkpoint's (another scene?); this scene is normalised with its own")
        return
    dm.normalizers = saved
