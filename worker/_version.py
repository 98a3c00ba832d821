"""The installed distribution's version, read once."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("loadwarden")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    VERSION = "0.0.0"
