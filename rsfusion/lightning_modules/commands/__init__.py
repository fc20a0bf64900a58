"""The ``rsfusion`` command and its subcommands (``rsfusion --help`` lists them).

``COMMANDS``: the subcommands besides LightningCLI's fit/validate/test/predict, each a module with a
``main(argv)``, imported only when it runs (by name, so this package imports nothing).
"""
from __future__ import annotations

import importlib

_COMMANDS = "rsfusion.lightning_modules.commands"
COMMANDS = {
    "export": (f"{_COMMANDS}.export", "a checkpoint as a torch.export/ONNX program that runs without rsfusion"),
    "evaluate": (f"{_COMMANDS}.evaluate", "score any classification map against a label raster (OA, AA, kappa, "
                                          "per class)"),
    "compare": (f"{_COMMANDS}.compare", "train configs over seeds and tabulate them; --study FILE: a whole study, "
                                        "the papers' tables"),
    "sweep": (f"{_COMMANDS}.sweeps", "print the command one W&B sweep trial runs (check a sweep file offline)"),
    "bank": (f"{_COMMANDS}.bank", "BDGF stage 2 alone: build or find a config's diffusion feature bank"),
    "datasets": (f"{_COMMANDS}.datasets", "the benchmarks: modalities, size, classes, licence, citations, source, "
                                          "cache, configs"),
    "download": (f"{_COMMANDS}.download", "fetch one benchmark with rs-fusion-datasets (checksums verified)"),
    "make-scene": ("rsfusion.datamodules.make_scene", "write a built-in synthetic scene's GeoTIFFs (another seed "
                                                      "or size)"),
}
EXTRA_HELP = "more commands (each with --help): " + "; ".join(
    f"'rsfusion {name}' {what}" for name, (_, what) in COMMANDS.items())


def run_subcommand(argv: list[str]) -> bool:
    """Run ``argv`` if it names one of ``COMMANDS`` (True), else leave it to LightningCLI (False)."""
    if not argv or argv[0] not in COMMANDS:
        return False
    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    return True
