"""LightningDataModules that tile co-registered multimodal rasters into patches.

Importing this package loads none of its modules: ``from rsfusion.datamodules import RasterDataModule``
imports the DataModule on first use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors see; at run time __getattr__ imports on first use
    from rsfusion.datamodules.benchmarks import (
        AugsburgDataModule,
        BerlinDataModule,
        Houston2013DataModule,
        MSPanDataModule,
        MUUFLDataModule,
        TrentoDataModule,
    )
    from rsfusion.datamodules.errors import InputError, RasterError
    from rsfusion.datamodules.raster import RasterDataModule
    from rsfusion.datamodules.synthetic import SyntheticDataModule

_EXPORTS = {
    **{name: "benchmarks" for name in ("AugsburgDataModule", "BerlinDataModule", "Houston2013DataModule",
                                       "MSPanDataModule", "MUUFLDataModule", "TrentoDataModule")},
    "InputError": "errors", "RasterError": "errors", "RasterDataModule": "raster", "SyntheticDataModule": "synthetic",
}
__all__ = ["AugsburgDataModule", "BerlinDataModule", "Houston2013DataModule", "InputError", "MSPanDataModule",
           "MUUFLDataModule", "RasterDataModule", "RasterError", "SyntheticDataModule", "TrentoDataModule"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
