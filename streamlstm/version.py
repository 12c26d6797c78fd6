"""The installed streamlstm version (metrics' build info, checkpoints, ``--version``)."""
from __future__ import annotations

__all__ = ["package_version"]


def package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("streamlstm")
    except (ImportError, PackageNotFoundError):
        return "0+unknown"
