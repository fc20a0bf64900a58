"""``rsfusion bank --config <bdgf config>``: BDGF's stage 2 alone, the feature bank of the config's scene.

Builds (or finds) the bank in the cache, pre-training the DDPM first when neither
``--model.init_args.ddpm_checkpoint`` nor a cached DDPM gives one, and prints the bank's path (its
``.json`` beside it holds the provenance). A ``fit`` of the same config then reads it ("feature bank
cache hit"), and ``--model.init_args.feature_bank <path>`` gives it to any other run.
"""
from __future__ import annotations

import sys

from rsfusion.datamodules.errors import InputError
from rsfusion.lightning_modules.bdgf import BDGF
from rsfusion.lightning_modules.commands.cli import RSFusionCLI, cli_kwargs


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip() + "\n\nOptions: those of 'rsfusion fit' (rsfusion fit --help); the model must be BDGF.")
        return
    try:
        cli = RSFusionCLI(**{**cli_kwargs(), "save_config_callback": None}, run=False, args=argv)
        if not isinstance(cli.model, BDGF):
            raise InputError(f"rsfusion bank: the config's model is {type(cli.model).__name__}, not BDGF")
        cli.datamodule.load()
        cli.model.prepare_feature_bank(cli.datamodule)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(cli.model.feature_bank_path)
