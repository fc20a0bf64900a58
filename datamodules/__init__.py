"""LightningDataModules that tile co-registered multimodal rasters into patches."""
from datamodules.benchmarks import (AugsburgDataModule, BerlinDataModule, Houston2013DataModule, MSPanDataModule,
                                    MUUFLDataModule, TrentoDataModule)
from datamodules.io import InputError, RasterError
from datamodules.raster import RasterDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = ["AugsburgDataModule", "BerlinDataModule", "Houston2013DataModule", "InputError", "MSPanDataModule",
           "MUUFLDataModule", "RasterDataModule", "RasterError", "SyntheticDataModule", "TrentoDataModule"]
