"""Evaluation: quality (perplexity) and efficiency (size, memory, latency, throughput)."""

from slimlm.eval.efficiency import efficiency
from slimlm.eval.quality import perplexity

__all__ = ["efficiency", "perplexity"]
