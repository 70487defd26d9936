"""Task data loaders: a data directory (``--data-dir`` / ``HYPERADALORA_DATA_DIR``)."""
