"""Compression reporting: :func:`compression_summary` and the :class:`CompressionReport` callback."""

from lightning_compress.report.callback import CompressionReport
from lightning_compress.report.summary import CompressionSummary, compression_summary, shorten_name

__all__ = ["CompressionReport", "CompressionSummary", "compression_summary", "shorten_name"]
