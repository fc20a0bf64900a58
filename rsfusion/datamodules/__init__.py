"""LightningDataModules that tile co-registered multimodal rasters into patches."""
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

__all__ = ["AugsburgDataModule", "BerlinDataModule", "Houston2013DataModule", "InputError", "MSPanDataModule",
           "MUUFLDataModule", "RasterDataModule", "RasterError", "SyntheticDataModule", "TrentoDataModule"]
