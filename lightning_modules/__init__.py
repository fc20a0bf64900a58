"""LightningModules of rsfusion: pure networks live in ``lightning_modules.networks``."""
from lightning_modules.base import FusionClassifier
from lightning_modules.bdgf import BDGF, BDGFPretrain
from lightning_modules.baseline import TwoBranchCNN
from lightning_modules.das2f import DAS2F
from lightning_modules.m3amba import M3amba
from lightning_modules.maps import ClassificationMapWriter

__all__ = ["BDGF", "BDGFPretrain", "ClassificationMapWriter", "DAS2F", "FusionClassifier", "M3amba", "TwoBranchCNN"]
