"""Power theft detection: features, model, storage and serving for electricity billing data."""

__version__ = "0.1.0"
