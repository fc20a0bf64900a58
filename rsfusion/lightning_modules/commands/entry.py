"""The ``rsfusion`` and ``lightning`` console scripts (and ``python -m rsfusion``).

Importing Lightning takes ~7 s (it imports torchmetrics, transformers and torch._dynamo), so the
subcommands run before it is imported: those that need no Lightning (``rsfusion datasets``,
``rsfusion sweep``) start in about a second; the rest import it themselves.
"""
from __future__ import annotations

import sys

from rsfusion.lightning_modules.commands import run_subcommand


def main(args: list[str] | None = None) -> None:
    if run_subcommand(sys.argv[1:] if args is None else list(args)):
        return
    # Here, not at the top: the point of this module is that the subcommands above never import it
    from rsfusion.lightning_modules.commands.cli import main as lightning_cli_main

    lightning_cli_main(args)


if __name__ == "__main__":
    main()
