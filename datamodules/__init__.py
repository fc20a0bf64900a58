"""LightningDataModules that tile co-registered multimodal rasters into patches."""
from datamodules.io import RasterError
from datamodules.raster import RasterDataModule
from datamodules.synthetic import SyntheticDataModule

__all__ = ["RasterDataModule", "RasterError", "SyntheticDataModule"]
