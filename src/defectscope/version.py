"""The package version, on its own so that the core can read it without the package's `__init__`."""

__version__ = "0.1.0"
