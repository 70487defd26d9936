"""The library version (its own module, so that writers of files can record it without importing the package)."""

__version__ = "0.1.0"
