"""Sequential (block-by-block) calibration: one driver, statistics declared by each method."""

from slimlm.calibrate.driver import BlockContext, capture_block_inputs, run_sequential
from slimlm.calibrate.stats import LinearStats, collect_linear_stats

__all__ = ["BlockContext", "LinearStats", "capture_block_inputs", "collect_linear_stats", "run_sequential"]
