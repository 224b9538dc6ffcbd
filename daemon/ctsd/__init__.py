"""ctsd: the CTS data daemon."""

__version__ = "0.1.0"
