"""The installed package's version, read from its distribution metadata (``pyproject.toml`` is the one source)."""

from __future__ import annotations

__all__ = ["DISTRIBUTION", "package_version"]

#: The distribution name in ``pyproject.toml``.
DISTRIBUTION = "bkn-export"


def package_version() -> str:
    """``importlib.metadata.version("bkn-export")``; ``"0+unknown"`` when run uninstalled (a bare checkout)."""
    from importlib import metadata  # ~0.1 s to import: only when the version is asked for

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
