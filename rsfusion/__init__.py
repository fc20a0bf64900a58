"""rsfusion: multimodal remote-sensing land-cover classification with PyTorch Lightning.

Importing ``rsfusion`` loads nothing else: ``rsfusion.kernels`` (the selective scan),
``rsfusion.datamodules`` (rasters to patches) and ``rsfusion.lightning_modules`` (tasks, networks and
commands) are imported on demand.
"""

__version__ = "0.1.0"
