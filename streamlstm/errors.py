"""Exit statuses of the `streamlstm` commands, and how a configuration error is reported.

Exit status 2 means a configuration problem (the systemd unit does not restart on it); the
message names the key path and no traceback is printed.
"""
from __future__ import annotations

import sys

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_OK", "config_error"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def config_error(path, problem) -> int:
    """Print "configuration error in PATH" and the problem (a ConfigError or text) to stderr;
    returns EXIT_CONFIG."""
    print(f"streamlstm: configuration error in {path}:\n{problem}", file=sys.stderr)
    return EXIT_CONFIG
