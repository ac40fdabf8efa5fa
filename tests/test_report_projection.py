"""The leaderboard's "needs about N blocks" line uses the comparisons' own t-based MDE, not 2.8 x SE."""

from __future__ import annotations

import math

from eval.compare import MetricRow
from eval.report import blocks_needed
from eval.stats import Comparison, _t_quantile


def _row(se: float, blocks: int, role: str = "variant") -> MetricRow:
    df = blocks - 1
    mde = (_t_quantile(0.975, df) + _t_quantile(0.8, df)) * se
    d = Comparison(0.0, -2 * se, 2 * se, se, df, mde, 1.0, 99, blocks, "crossed blocks x items")
    return MetricRow("v", "heldout_clean_nll", blocks, 99, 2.0, {"std": 0, "min": 2, "max": 2}, [2.0] * blocks,
                     delta=d, role=role)


def test_projection_counts_t_quantiles_so_an_unmet_target_needs_more_blocks():
    # the README ablation's situation: 7 blocks, median MDE 0.013 (SE 0.0039), target 0.012.
    # With 2.8 x SE (the normal quantiles) 7 blocks would already "reach" it; with t(6) they do not.
    rows = [_row(0.0039, 7), _row(0.0032, 7), _row(0.0044, 7, role="negative control")]
    mde, blocks = blocks_needed(rows, "heldout_clean_nll", 0.012)
    assert math.isclose(mde, rows[0].delta.mde) and mde > 0.012 and 2.8 * 0.0039 < 0.012
    assert blocks == 8
    df = blocks - 1  # and the projected design meets the target by the same formula
    assert (_t_quantile(0.975, df) + _t_quantile(0.8, df)) * 0.0039 * math.sqrt(7 / blocks) <= 0.012


def test_a_met_target_needs_no_more_blocks_and_controls_do_not_count():
    rows = [_row(0.002, 5), _row(0.05, 5, role="positive control")]
    assert blocks_needed(rows, "heldout_clean_nll", 0.012) == (rows[0].delta.mde, 5)
    assert blocks_needed(rows, "other_metric", 0.012) is None
