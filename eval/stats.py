"""Paired bootstrap statistics over (seeds x items) score matrices; pure numpy, no I/O.

Two systems are compared on the *same* test items, so each bootstrap replicate draws one set of
item indices shared by both (pairing removes item difficulty from the noise), and independently
redraws each system's seeds (so seed-to-seed training noise is part of the interval).
A metric is a weighted mean over items: weights are token counts for NLL or instruction counts for
IFEval instruction-level accuracy, and 1 for plain per-item accuracies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tomelab.errors import TomelabError


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval."""

    estimate: float
    lo: float
    hi: float
    n_items: int
    n_seeds_a: int
    n_seeds_b: int = 0

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return asdict(self)


def _as_matrix(x: np.ndarray | list, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise TomelabError(f"{name}: expected a (seeds x items) score matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise TomelabError(f"{name}: scores contain NaN or inf; drop or fix those items first")
    return a


def _weights(weights: np.ndarray | list | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise TomelabError(f"weights must be {n} non-negative numbers with a positive sum")
    return w


def weighted_metric(scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-seed metric: weighted mean over items of a (seeds x items) matrix."""
    s = _as_matrix(scores, "scores")
    w = _weights(weights, s.shape[1])
    return (s * w).sum(axis=1) / w.sum()


def seed_spread(per_seed: np.ndarray | list) -> dict[str, float]:
    """Seed-to-seed spread of a per-seed metric: mean, sample std (ddof=1), min, max."""
    v = np.asarray(per_seed, dtype=np.float64).ravel()
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else float("nan"),
        "min": float(v.min()),
        "max": float(v.max()),
        "n_seeds": int(v.size),
    }


def _check_seeds(n: int, name: str, min_seeds: int) -> None:
    if n < min_seeds:
        raise TomelabError(
            f"{name} has {n} seed(s); a bootstrap CI that resamples seeds needs >= {min_seeds}. "
            "Train more seeds (seeds = [0, 1, 2] in the ablation config) or set ci = false."
        )


def _boot_means(s: np.ndarray, w: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mean-over-resampled-seeds of the metric on resampled items, one value per replicate."""
    sw = s * w  # (S, N)
    num = sw[:, items].sum(axis=2)  # (S, B)
    den = w[items].sum(axis=1)  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = num / den  # (S, B); a replicate drawing only zero-weight items is NaN and ignored
    n_seeds, n_boot = per_seed.shape
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))  # redraw seeds per replicate
    return per_seed[seeds, np.arange(n_boot)[:, None]].mean(axis=1)


def bootstrap_mean(
    scores: np.ndarray | list,
    weights: np.ndarray | list | None = None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    min_seeds: int = 1,
    name: str = "system",
) -> Interval:
    """Bootstrap CI of one system's metric (mean over seeds), resampling items and seeds."""
    s = _as_matrix(scores, name)
    _check_seeds(s.shape[0], name, min_seeds)
    w = _weights(weights, s.shape[1])
    rng = np.random.default_rng(seed)
    items = rng.integers(0, s.shape[1], size=(n_boot, s.shape[1]))
    boot = _boot_means(s, w, items, rng)
    alpha = (1 - level) / 2
    return Interval(
        estimate=float(weighted_metric(s, w).mean()),
        lo=float(np.nanquantile(boot, alpha)),
        hi=float(np.nanquantile(boot, 1 - alpha)),
        n_items=s.shape[1],
        n_seeds_a=s.shape[0],
    )


def paired_bootstrap_diff(
    a: np.ndarray | list,
    b: np.ndarray | list,
    weights: np.ndarray | list | None = None,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    min_seeds_a: int = 2,
    min_seeds_b: int = 2,
    names: tuple[str, str] = ("variant", "baseline"),
) -> Interval:
    """95% CI of metric(a) - metric(b), both (seeds x items) on the same items in the same order.

    Items are resampled once per replicate and shared by a and b (paired); seeds are redrawn per
    system. A deterministic system (the untouched base model) passes min_seeds_a=1.
    """
    sa, sb = _as_matrix(a, names[0]), _as_matrix(b, names[1])
    if sa.shape[1] != sb.shape[1]:
        raise TomelabError(
            f"{names[0]} has {sa.shape[1]} items but {names[1]} has {sb.shape[1]}: a paired comparison needs "
            "the same test items. Re-run both with the same eval config."
        )
    _check_seeds(sa.shape[0], names[0], min_seeds_a)
    _check_seeds(sb.shape[0], names[1], min_seeds_b)
    w = _weights(weights, sa.shape[1])
    rng = np.random.default_rng(seed)
    items = rng.integers(0, sa.shape[1], size=(n_boot, sa.shape[1]))
    diff = _boot_means(sa, w, items, rng) - _boot_means(sb, w, items, rng)
    alpha = (1 - level) / 2
    return Interval(
        estimate=float(weighted_metric(sa, w).mean() - weighted_metric(sb, w).mean()),
        lo=float(np.nanquantile(diff, alpha)),
        hi=float(np.nanquantile(diff, 1 - alpha)),
        n_items=sa.shape[1],
        n_seeds_a=sa.shape[0],
        n_seeds_b=sb.shape[0],
    )
