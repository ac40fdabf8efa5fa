"""eval.stats on synthetic data where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from eval.stats import bootstrap_mean, paired_bootstrap_diff, seed_spread, weighted_metric
from tomelab.errors import TomelabError


def _system(rng: np.random.Generator, n_seeds: int, n_items: int, shift: float = 0.0) -> np.ndarray:
    difficulty = np.linspace(0, 5, n_items)  # big item-to-item variation, shared by both systems
    return difficulty[None, :] + shift + rng.normal(0, 0.05, size=(n_seeds, n_items))


def test_constant_shift_gives_ci_around_the_shift():
    rng = np.random.default_rng(1)
    base = _system(rng, 3, 200)
    shifted = base + 0.3  # every item, every seed improved by exactly 0.3
    ci = paired_bootstrap_diff(shifted, base, n_boot=1000)
    assert ci.estimate == pytest.approx(0.3)
    assert ci.lo <= 0.3 <= ci.hi
    assert ci.hi - ci.lo < 0.1  # pairing removes the (huge) item difficulty from the noise
    assert ci.excludes_zero()


def test_identical_systems_give_ci_containing_zero():
    rng = np.random.default_rng(2)
    a = _system(rng, 3, 150)
    b = _system(np.random.default_rng(3), 3, 150)  # same items, independent seed noise
    ci = paired_bootstrap_diff(a, b, n_boot=1000)
    assert ci.lo < 0 < ci.hi
    assert not ci.excludes_zero()


def test_pairing_is_tighter_than_unpaired_spread():
    rng = np.random.default_rng(4)
    a = _system(rng, 2, 100, shift=0.1)
    b = _system(rng, 2, 100)
    paired = paired_bootstrap_diff(a, b, n_boot=500)
    single = bootstrap_mean(a, n_boot=500)
    assert (paired.hi - paired.lo) < (single.hi - single.lo) / 5


def test_seed_noise_widens_the_interval():
    rng = np.random.default_rng(5)
    items = np.zeros(50)
    quiet = items[None, :] + rng.normal(0, 0.01, size=(4, 1))  # each seed shifts all items
    noisy = items[None, :] + np.array([[-1.0], [1.0], [-1.0], [1.0]])
    ref = np.zeros((4, 50))
    w_quiet = paired_bootstrap_diff(quiet, ref, n_boot=500)
    w_noisy = paired_bootstrap_diff(noisy, ref, n_boot=500)
    assert (w_noisy.hi - w_noisy.lo) > 10 * (w_quiet.hi - w_quiet.lo)


def test_weights_make_a_token_weighted_mean():
    scores = np.array([[1.0, 3.0]])
    assert weighted_metric(scores, [3, 1])[0] == pytest.approx(1.5)
    ci = bootstrap_mean(scores, [1, 0], n_boot=200, name="x")  # zero weight: only the first item counts
    assert ci.estimate == pytest.approx(1.0)


def test_fewer_than_two_seeds_is_a_clear_error():
    one = np.zeros((1, 10))
    two = np.zeros((2, 10))
    with pytest.raises(TomelabError, match=r"1 seed\(s\).*>= 2"):
        paired_bootstrap_diff(one, two, names=("dedup", "random"))
    # a deterministic system (the untouched base model) may opt out for its own side
    ci = paired_bootstrap_diff(one, two, min_seeds_a=1, n_boot=100)
    assert ci.estimate == 0.0 and ci.lo == 0.0 and ci.hi == 0.0


def test_mismatched_items_are_refused():
    with pytest.raises(TomelabError, match="same test items"):
        paired_bootstrap_diff(np.zeros((2, 5)), np.zeros((2, 6)))


def test_seed_spread():
    s = seed_spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["min"] == 1.0 and s["max"] == 3.0
    assert np.isnan(seed_spread([1.0])["std"])
