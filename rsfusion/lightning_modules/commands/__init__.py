"""The ``rsfusion`` command and its subcommands (``rsfusion --help`` lists them)."""
