"""LightningModules of rsfusion, by role.

- tasks (this folder): :class:`~rsfusion.lightning_modules.base.FusionClassifier` and the models'
  LightningModules, their losses, metrics and optimiser groups; ``registry`` names them;
- ``networks/``: pure ``nn.Module`` networks, free of training logic;
- ``outputs/``: run folders, callbacks, classification maps, reports;
- ``commands/``: the ``rsfusion`` command and its subcommands.

Importing this package loads none of them: ``from rsfusion.lightning_modules import M3amba`` imports
the task on first use, so importing a network loads only networks and kernels.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors see; at run time __getattr__ imports on first use
    from rsfusion.lightning_modules.base import FusionClassifier, FusionTask
    from rsfusion.lightning_modules.baseline import TwoBranchCNN
    from rsfusion.lightning_modules.bdgf import BDGF
    from rsfusion.lightning_modules.bdgf_pretrain import BDGFPretrain
    from rsfusion.lightning_modules.das2f import DAS2F
    from rsfusion.lightning_modules.m3amba import M3amba
    from rsfusion.lightning_modules.outputs.callbacks import LeakageReport, RNGStateCapture, default_callbacks
    from rsfusion.lightning_modules.outputs.maps import ClassificationMapWriter
    from rsfusion.lightning_modules.outputs.reporting import TestReport

_EXPORTS = {
    "FusionClassifier": "base", "FusionTask": "base", "TwoBranchCNN": "baseline", "BDGF": "bdgf",
    "BDGFPretrain": "bdgf_pretrain",
    "DAS2F": "das2f", "M3amba": "m3amba", "LeakageReport": "outputs.callbacks", "RNGStateCapture": "outputs.callbacks",
    "default_callbacks": "outputs.callbacks", "ClassificationMapWriter": "outputs.maps",
    "TestReport": "outputs.reporting",
}
__all__ = ["BDGF", "BDGFPretrain", "ClassificationMapWriter", "DAS2F", "FusionClassifier", "FusionTask",
           "LeakageReport", "M3amba", "RNGStateCapture", "TestReport", "TwoBranchCNN", "default_callbacks"]

# Modules that moved into outputs/ and commands/: their old names still import (the same module
# object), for checkpoints and saved config.yaml files that name them (e.g. ...runs.RunLogger).
MOVED = {**{name: f"outputs.{name}" for name in ("callbacks", "inference", "map_set", "maps", "reporting", "runs")},
         **{name: f"commands.{name}" for name in ("cli", "compare", "evaluate", "export", "sweeps")}}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``rsfusion.lightning_modules.<old name>`` -> the module now at ``MOVED[<old name>]``."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __name__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}")

    def exec_module(self, module) -> None:
        """The module was executed under its new name."""

    def get_code(self, fullname):
        """``python -m rsfusion.lightning_modules.<old name>`` runs the moved module as ``__main__``."""
        new = f"{__name__}.{MOVED[fullname.rpartition('.')[2]]}"
        return importlib.util.find_spec(new).loader.get_code(new)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
