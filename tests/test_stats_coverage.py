"""Calibration of the ablation's intervals: nominal 95% must cover 93-97% under both noise structures.

Simulated (blocks x items) NLL-like scores with a known true difference: "global shift" noise (a
training seed / data draw moves every item of a block) and "seed x item" noise (each item moves on its
own), plus a mixed case. The old seed-resampling bootstrap is run on the global case too, to show the
test can tell a miscalibrated interval (it covers ~80% there)."""

from __future__ import annotations

import numpy as np
import pytest

from eval.stats import block_diff, holm, paired_bootstrap_diff

BLOCKS, ITEMS, DELTA = 5, 80, 0.01


def _simulate(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    item = rng.normal(1.5, 0.4, ITEMS)  # item difficulty, shared by both systems
    inter = rng.normal(0, 0.01, ITEMS)  # item x treatment interaction (mean 0 over the population)
    shift, resid = {"global": (0.008, 0.002), "seed_x_item": (0.0, 0.05), "mixed": (0.003, 0.03)}[kind]
    ga, gb = rng.normal(0, shift, BLOCKS), rng.normal(0, shift, BLOCKS)
    a = item + DELTA + inter + ga[:, None] + rng.normal(0, resid, (BLOCKS, ITEMS))
    b = item + gb[:, None] + rng.normal(0, resid, (BLOCKS, ITEMS))
    return a, b, rng.integers(20, 129, ITEMS).astype(float)  # token-count weights


@pytest.mark.parametrize("kind", ["global", "seed_x_item", "mixed"])
def test_nominal_95_intervals_cover_93_to_97_percent(kind: str) -> None:
    rng = np.random.default_rng(20261202)
    reps = 1500
    covered = 0
    for _ in range(reps):
        a, b, w = _simulate(kind, rng)
        c = block_diff(a, b, w)
        covered += c.lo <= DELTA <= c.hi
    assert 0.93 <= covered / reps <= 0.97, f"{kind}: nominal 95% interval covered {covered / reps:.3f}"


def test_the_old_seed_bootstrap_undercovers_a_global_shift() -> None:
    """The check above can fail: the bootstrap that resamples 5 seeds is too narrow for block noise."""
    rng = np.random.default_rng(7)
    reps, covered = 300, 0
    for _ in range(reps):
        a, b, w = _simulate("global", rng)
        c = paired_bootstrap_diff(a, b, w, n_boot=400, seed=int(rng.integers(1 << 30)))
        covered += c.lo <= DELTA <= c.hi
    assert covered / reps < 0.90


def test_mde_is_the_80_percent_power_effect() -> None:
    """A true effect equal to the reported MDE is detected ~80% of the time (simulated again)."""
    rng = np.random.default_rng(3)
    a, b, w = _simulate("global", rng)
    mde = block_diff(a, b, w).mde
    hits, reps = 0, 600
    for _ in range(reps):
        a, b, w = _simulate("global", rng)
        hits += block_diff(a - DELTA + mde, b, w).lo > 0
    assert 0.6 <= hits / reps <= 0.95


def test_holm_adjusts_in_order_and_caps_at_one() -> None:
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.6, 0.9]) == [1.0, 1.0]


def test_deterministic_base_row_is_broadcast_over_blocks() -> None:
    rng = np.random.default_rng(0)
    a, b, w = _simulate("global", rng)
    c = block_diff(a[:1], b, w)  # one row: the untouched base model
    assert c.n_blocks == BLOCKS and c.se > 0
