"""Paired bootstrap statistics over (seeds x items) score matrices; pure numpy, no I/O.

Two systems are compared on the *same* test items, so each bootstrap replicate draws one set of
item indices shared by both (pairing removes item difficulty from the noise), and independently
redraws each system's seeds (so seed-to-seed training noise is part of the interval).
A metric is a weighted mean over items: weights are token counts for NLL or instruction counts for
IFEval instruction-level accuracy, and 1 for plain per-item accuracies.
"""

from __future__ import annotations

import math
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

    @property
    def mde(self) -> float:
        """Minimum detectable effect at 80% power and 5% two-sided: (1.96 + 0.84) x SE, with the SE read off the
        interval's width (hi - lo = 2 x 1.96 SE)."""
        return 2.8 * (self.hi - self.lo) / 3.92

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


def _paired_matrices(a: np.ndarray | list, b: np.ndarray | list, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    sa, sb = _as_matrix(a, names[0]), _as_matrix(b, names[1])
    if sa.shape[1] != sb.shape[1]:
        raise TomelabError(f"{names[0]} has {sa.shape[1]} items but {names[1]} has {sb.shape[1]}: a paired "
                           "comparison needs the same test items. Re-run both with the same eval config.")
    return sa, sb


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
    sa, sb = _paired_matrices(a, b, names)
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


# --- calibrated block x item comparisons ------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """metric(a) - metric(b) over blocks x items, with a t interval from a crossed random-effects model.

    `se` is the standard error of the estimate, `df` its (Satterthwaite) degrees of freedom, `mde` the
    smallest true difference this design detects 80% of the time at two-sided level `level`, and `p`
    the two-sided p-value of "no difference". `bound` is what a null result rules out: no effect
    larger than max(|lo|, |hi|).
    """

    estimate: float
    lo: float
    hi: float
    se: float
    df: float
    mde: float
    p: float
    n_items: int
    n_blocks: int
    method: str

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    @property
    def bound(self) -> float:
        return max(abs(self.lo), abs(self.hi))

    def to_dict(self) -> dict:
        return {**asdict(self), "bound": self.bound}


def _t_quantile(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, min(df, 1e9)))


def _t_sf2(x: float, df: float) -> float:
    from scipy.stats import t

    return float(2 * t.sf(abs(x), df))


def crossed_variance(d: np.ndarray) -> tuple[float, float, str]:
    """Variance of the grand mean of a (blocks x items) matrix, and its degrees of freedom.

    Model: d[b, i] = mu + g[b] + u[i] + e[b, i], with g the block effect (a training seed and data draw
    shifts every item of that block: the "global shift" noise), u the item effect (items are a sample of
    the test population) and e the block x item residual ("seed x item" noise). The method-of-moments
    (two-way ANOVA) estimate of Var(mean) = s2_g/S + s2_u/N + s2_e/(S N) is (MS_B + MS_I - MS_E)/(S N)
    with Satterthwaite degrees of freedom, floored at max(MS_B, MS_I)/(S N) (each alone is a lower bound in
    expectation). The block term is never pooled away: with 2-5 blocks an F test for it has almost no power,
    and pooling a real draw-to-draw effect made an A/A comparison of two random draws "significant". Why not the bootstrap: resampling
    3-5 blocks underestimates a block-level variance (nominal 95% covered 77-85% in simulation), while
    the t interval with few degrees of freedom stays calibrated (tests/test_stats_coverage.py).
    """
    s, n = d.shape
    if s == 1 or n == 1:  # one block: only item noise is measurable (no training-noise estimate)
        v = d.ravel()
        k = v.size
        return float(v.var(ddof=1) / k) if k > 1 else float("nan"), float(k - 1), "items only (1 block)"
    m = d.mean()
    rb, ci = d.mean(axis=1), d.mean(axis=0)
    ms_b = n * float(((rb - m) ** 2).sum()) / (s - 1)
    ms_i = s * float(((ci - m) ** 2).sum()) / (n - 1)
    resid = d - rb[:, None] - ci[None, :] + m
    ms_e = float((resid**2).sum()) / ((s - 1) * (n - 1))
    combo = ms_b + ms_i - ms_e
    floor, floor_df = max((ms_b, s - 1), (ms_i, n - 1))
    if combo <= floor:  # each mean square alone is a lower bound in expectation
        return floor / (s * n), float(floor_df), "crossed blocks x items (floored)"
    den = ms_b**2 / (s - 1) + ms_i**2 / (n - 1) + ms_e**2 / ((s - 1) * (n - 1))
    df = combo**2 / den if den > 0 else float("inf")
    return combo / (s * n), float(df), "crossed blocks x items"


def _comparison(d: np.ndarray, w: np.ndarray, *, level: float, power: float) -> Comparison:
    """Weighted mean of a (blocks x items) matrix with its crossed-model t interval.

    With unequal item weights (token counts) the mean is a ratio estimator, so the variance is that of
    its linearisation z[b, i] = c_i (d[b, i] - estimate) with c_i = w_i N / sum(w): a plain ANOVA on the
    weighted scores would count the spread of the weights themselves as item noise (too wide)."""
    c = w * w.size / w.sum()
    est = float((d * c[None, :]).mean())
    var, df, method = crossed_variance(c[None, :] * (d - est))
    se = math.sqrt(var) if var == var and var > 0 else 0.0
    if se == 0.0 or not df > 0:
        nan = float("nan")
        return Comparison(est, est, est, 0.0, df, nan, 0.0 if est else 1.0, d.shape[1], d.shape[0], method + ", no variance")
    crit = _t_quantile(1 - (1 - level) / 2, df)
    mde = (crit + _t_quantile(power, df)) * se
    return Comparison(est, est - crit * se, est + crit * se, se, df, mde, _t_sf2(est / se, df), d.shape[1], d.shape[0], method)


def block_diff(
    a: np.ndarray | list,
    b: np.ndarray | list,
    weights: np.ndarray | list | None = None,
    *,
    level: float = 0.95,
    power: float = 0.8,
    names: tuple[str, str] = ("variant", "baseline"),
) -> Comparison:
    """metric(a) - metric(b), both (blocks x items) on the same items; row k of a and of b is block k
    (the same data draw and training seed), so differences are paired by block and by item.
    A deterministic system (the untouched base model) passes one row, repeated for every block."""
    sa, sb = _paired_matrices(a, b, names)
    if sa.shape[0] == 1 and sb.shape[0] > 1:
        sa = np.repeat(sa, sb.shape[0], axis=0)
    if sb.shape[0] == 1 and sa.shape[0] > 1:
        sb = np.repeat(sb, sa.shape[0], axis=0)
    if sa.shape[0] != sb.shape[0]:
        raise TomelabError(f"{names[0]} has {sa.shape[0]} blocks but {names[1]} has {sb.shape[0]}: paired blocks "
                           "need the same blocks (seeds) for both. Finish the missing runs or list fewer seeds.")
    w = _weights(weights, sa.shape[1])
    return _comparison(sa - sb, w, level=level, power=power)


def block_mean(scores: np.ndarray | list, weights: np.ndarray | list | None = None, *, level: float = 0.95,
               power: float = 0.8, name: str = "system") -> Comparison:
    """One system's metric (mean over blocks) with the same crossed-model interval as `block_diff`."""
    s = _as_matrix(scores, name)
    w = _weights(weights, s.shape[1])
    return _comparison(s, w, level=level, power=power)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over every comparison listed), same order."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adj = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adj[i] = running
    return adj
