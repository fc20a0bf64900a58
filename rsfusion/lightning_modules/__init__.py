"""LightningModules of rsfusion: pure networks live in ``rsfusion.lightning_modules.networks``."""
from rsfusion.lightning_modules.base import FusionClassifier
from rsfusion.lightning_modules.baseline import TwoBranchCNN
from rsfusion.lightning_modules.bdgf import BDGF, BDGFPretrain
from rsfusion.lightning_modules.callbacks import LeakageReport, RNGStateCapture, default_callbacks
from rsfusion.lightning_modules.das2f import DAS2F
from rsfusion.lightning_modules.m3amba import M3amba
from rsfusion.lightning_modules.maps import ClassificationMapWriter
from rsfusion.lightning_modules.reporting import TestReport

__all__ = ["BDGF", "BDGFPretrain", "ClassificationMapWriter", "DAS2F", "FusionClassifier", "LeakageReport", "M3amba",
           "RNGStateCapture", "TestReport", "TwoBranchCNN", "default_callbacks"]
