"""rsfusion's task classes by name: the only classes a checkpoint may name; and the short class names
of configs (``class_path: M3amba``, ``class_path: SyntheticDataModule``), which jsonargparse resolves
among the classes imported here.

A checkpoint stores its model class as a dotted path (``hyper_parameters._class_path``). Importing
that path would let a checkpoint run code: a ``.py`` file beside it is importable whenever the
working folder is on ``sys.path`` (``python -m``, notebooks). So a checkpoint's class is looked up
here by name, and any other name is refused in one line before anything is imported.
"""
from __future__ import annotations

import inspect

from rsfusion.datamodules.benchmarks import (
    AugsburgDataModule,
    BerlinDataModule,
    Houston2013DataModule,
    MSPanDataModule,
    MUUFLDataModule,
    TrentoDataModule,
)
from rsfusion.datamodules.checkpoint_inputs import read_checkpoint  # noqa: F401  (re-exported)
from rsfusion.datamodules.errors import InputError
from rsfusion.datamodules.raster import RasterDataModule
from rsfusion.datamodules.synthetic import SyntheticDataModule
from rsfusion.lightning_modules.base import FusionTask
from rsfusion.lightning_modules.baseline import TwoBranchCNN
from rsfusion.lightning_modules.bdgf import BDGF
from rsfusion.lightning_modules.bdgf_pretrain import BDGFPretrain
from rsfusion.lightning_modules.das2f import DAS2F
from rsfusion.lightning_modules.m3amba import M3amba

TASKS: dict[str, type[FusionTask]] = {cls.__name__: cls for cls in (TwoBranchCNN, M3amba, DAS2F, BDGF,
                                                                          BDGFPretrain)}
DATAMODULES = (RasterDataModule, SyntheticDataModule, Houston2013DataModule, TrentoDataModule, MUUFLDataModule,
               AugsburgDataModule, BerlinDataModule, MSPanDataModule)
# The paths checkpoints record: each class's own module, the package that re-exports it, and the module a
# class lived in before it moved (so older checkpoints keep loading).
ALIASES: dict[str, str] = {"rsfusion.lightning_modules.bdgf.BDGFPretrain": "BDGFPretrain"}
# The instantiator LightningCLI records in checkpoints (imported by load_from_checkpoint): the only one allowed
LIGHTNING_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def _paths() -> dict[str, str]:
    paths = {name: name for name in TASKS}
    for name, cls in TASKS.items():
        paths[f"{cls.__module__}.{cls.__qualname__}"] = name
        paths[f"rsfusion.lightning_modules.{name}"] = name
    return {**paths, **ALIASES}


def task_class(class_path: str | None, source: str) -> type[FusionTask]:
    """The task class a checkpoint (or config) names, looked up without importing anything; ``source``
    names the file in the one-line error for any other name."""
    name = _paths().get(str(class_path))
    if name is None:
        raise InputError(f"{source}: names the model class {class_path!r}, which is not one of rsfusion's tasks "
                         f"({', '.join(TASKS)}); refusing to import it")
    return TASKS[name]


def class_path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def checked_hyper_parameters(checkpoint: dict, source: str) -> tuple[type[FusionTask], dict]:
    """A checkpoint's task class and hyper-parameters, after the checks that keep it from importing code:
    a registered class, Lightning's own instantiator (or none)."""
    hparams = dict(checkpoint.get("hyper_parameters") or {}) if isinstance(checkpoint, dict) else {}
    if "_class_path" not in hparams:
        raise InputError(f"{source}: not a checkpoint of the lightning/rsfusion CLI (no model class recorded)")
    cls = task_class(hparams.pop("_class_path"), source)
    instantiator = hparams.pop("_instantiator", None)
    if instantiator not in (None, LIGHTNING_INSTANTIATOR):
        raise InputError(f"{source}: names the instantiator {instantiator!r}, not Lightning's; refusing to import it")
    return cls, hparams


def accepted_arguments(cls: type) -> set[str]:
    """The constructor arguments of ``cls``, following ``**kwargs`` up to the base classes that take them."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def check_known_arguments(cls: type, hparams: dict, source: str) -> None:
    unknown = sorted(set(hparams) - accepted_arguments(cls))
    if unknown:
        raise InputError(f"{source}: hyper-parameter {unknown[0]!r} is not an argument of {cls.__name__} (a checkpoint "
                         "of another rsfusion version, or edited?)")
