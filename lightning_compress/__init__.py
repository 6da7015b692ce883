"""lightning-compress: neural-network compression as ordinary PyTorch Lightning callbacks."""

__version__ = "0.1.0"
