"""The project's error types: bad input (data, configuration, a checkpoint) and outputs that cannot be
written. The console scripts print them as one line, ``error: <file or option>: <problem>``, exit
code 2, no traceback."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input (data or configuration) that the user must fix; reported as one line, no traceback."""

    latest: "InputError | None" = None  # the CLI finds it even when a library re-wraps the exception

    def __init__(self, *args):
        super().__init__(*args)
        InputError.latest = self

    @staticmethod
    def within(err: BaseException) -> "InputError | None":
        """``err`` itself, or the latest InputError when a library (jsonargparse) re-wrapped it into ``err``."""
        if isinstance(err, InputError):
            return err
        latest = InputError.latest
        return latest if latest is not None and str(latest) in str(err) else None


class RasterError(InputError):
    """A raster (or label map) that cannot be used as it is; the message names the file."""


class OutputError(InputError):
    """An output that cannot be written (no space left, a file-size limit...): one line naming the file."""
