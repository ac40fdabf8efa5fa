"""`run_ablation(cfg_path)`: curate -> train (variant x seed) -> evaluate -> leaderboard, plots, winner.

Every step skips what already exists (curate caches variants, train_run skips finished runs, evaluate
caches per (run, set)), so a killed ablation re-run resumes where it stopped. The comparison is
against the configured baseline variant with a paired bootstrap over the same test items and seeds.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.config import METRICS, AblationConfig, EvalConfig, WinnerRule
from eval.evaluate import evaluate, read_item_scores
from eval.stats import Interval, bootstrap_mean, paired_bootstrap_diff, seed_spread, weighted_metric
from tomelab.config import load_config
from tomelab.errors import TomelabError
from tomelab.io import read_json, write_json, write_text

log = logging.getLogger(__name__)

BASE_ROW = "base (untouched)"


@dataclass
class System:
    """One leaderboard row: a variant's runs (one per seed), or the untouched base model."""

    name: str
    refs: list[str]  # eval refs: run dirs, or the base model name
    seeds: list[int | None]
    trained: bool = True
    run_dirs: dict[int, str] = field(default_factory=dict)
    base: str = ""
    train_variant: str = ""  # the variant folder train_run reads (an alias for sweep arms with overrides)
    train_config: Any = None


@dataclass
class MetricRow:
    system: str
    metric: str
    n_seeds: int
    n_items: int
    mean: float
    spread: dict[str, float]
    per_seed: list[float]
    ci: Interval | None = None  # of the mean, resampling items and seeds
    delta: Interval | None = None  # system - baseline, paired

    def to_csv(self) -> dict[str, Any]:
        return {
            "system": self.system, "metric": self.metric, "n_seeds": self.n_seeds, "n_items": self.n_items,
            "mean": self.mean, "seed_std": self.spread["std"], "seed_min": self.spread["min"], "seed_max": self.spread["max"],
            "ci_lo": self.ci.lo if self.ci else None, "ci_hi": self.ci.hi if self.ci else None,
            "delta_vs_baseline": self.delta.estimate if self.delta else None,
            "delta_lo": self.delta.lo if self.delta else None, "delta_hi": self.delta.hi if self.delta else None,
        }


# --- comparison (pure over the cached eval outputs) ---------------------------------------------


def _score_matrix(systems: list[System], metric: str) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """Per system a (seeds x items) matrix over the items every run scored, plus item weights."""
    set_name, key, weight_key, _ = METRICS[metric]
    per_ref = {ref: read_item_scores(ref, set_name) for s in systems for ref in s.refs}

    def usable(sc: dict | None) -> bool:
        return sc is not None and sc.get(key) is not None and not (isinstance(sc[key], float) and math.isnan(sc[key])) \
            and (weight_key is None or (sc.get(weight_key) or 0) > 0)

    ids = sorted(set.intersection(*[{i for i, sc in d.items() if usable(sc)} for d in per_ref.values()]))
    if not ids:
        raise TomelabError(f"{metric}: no test item was scored by every run; check that all runs used the same eval config.")
    mats = {s.name: np.array([[per_ref[r][i][key] for i in ids] for r in s.refs], dtype=float) for s in systems}
    # weights (token / instruction counts) come from the tokenizer and the item: identical across runs of one
    # base model, different across tokenizers, where per-token NLL is not comparable at all
    first = per_ref[systems[0].refs[0]]
    weights = np.array([first[i][weight_key] if weight_key else 1.0 for i in ids], dtype=float)
    if weight_key and any(d[i][weight_key] != first[i][weight_key] for d in per_ref.values() for i in ids):
        raise TomelabError(f"{metric}: systems count {weight_key} differently (different tokenizers), so the metric "
                           "is not comparable between them; compare base models on generation metrics instead.")
    return ids, mats, weights


def compare(systems: list[System], baseline: str, metrics: list[str], *, ci: bool, n_boot: int = 2000) -> list[MetricRow]:
    """Mean over seeds, seed spread and (when ci) bootstrap CIs of each metric and of its difference to the baseline."""
    rows: list[MetricRow] = []
    for metric in metrics:
        try:
            ids, mats, w = _score_matrix(systems, metric)
        except TomelabError as e:
            log.warning("skipping %s: %s", metric, e)
            continue
        for s in systems:
            m = mats[s.name]
            per_seed = weighted_metric(m, w)
            row = MetricRow(s.name, metric, m.shape[0], len(ids), float(per_seed.mean()), seed_spread(per_seed),
                            [float(x) for x in per_seed])
            if ci:
                min_seeds = 2 if s.trained else 1
                row.ci = bootstrap_mean(m, w, n_boot=n_boot, min_seeds=min_seeds, name=s.name)
                if s.name != baseline:
                    row.delta = paired_bootstrap_diff(m, mats[baseline], w, n_boot=n_boot, min_seeds_a=min_seeds,
                                                      names=(s.name, baseline))
            rows.append(row)
    return rows


def pick_winner(rows: list[MetricRow], systems: list[System], rule: WinnerRule) -> tuple[System, int, dict[str, float]]:
    """Best trained variant by the rule, then its best seed by the same rule."""
    higher = {m: METRICS[m][3] for m in METRICS}
    by = {(r.system, r.metric): r for r in rows}
    trained = [s for s in systems if s.trained]
    for m in (rule.metric, rule.tie_breaker):
        missing = [s.name for s in trained if (s.name, m) not in by]
        if missing:
            raise TomelabError(f"winner rule needs {m} but it was not evaluated for {missing}; enable its eval set.")

    def ordered(values: list[tuple[Any, float, float]]) -> Any:
        sign1 = 1 if higher[rule.metric] else -1
        best = max(v[1] * sign1 for v in values)
        tied = [v for v in values if abs(v[1] * sign1 - best) <= rule.tie_tolerance]
        sign2 = 1 if higher[rule.tie_breaker] else -1
        return max(tied, key=lambda v: v[2] * sign2)[0]

    win = ordered([(s, by[(s.name, rule.metric)].mean, by[(s.name, rule.tie_breaker)].mean) for s in trained])
    k = ordered([(i, by[(win.name, rule.metric)].per_seed[i], by[(win.name, rule.tie_breaker)].per_seed[i])
                 for i in range(len(win.refs))])
    run_metrics = {r.metric: r.per_seed[k] for r in rows if r.system == win.name}
    return win, k, run_metrics


# --- reports ----------------------------------------------------------------------------------


def _fmt(x: float | None, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if metric.endswith("nll") else f"{100 * x:.1f}"


def leaderboard_markdown(rows: list[MetricRow], systems: list[System], baseline: str, metrics: list[str], *, title: str,
                         ci: bool) -> str:
    by = {(r.system, r.metric): r for r in rows}
    shown = [m for m in metrics if any(r.metric == m for r in rows)]
    out = io.StringIO()
    out.write(f"# {title}\n\n")
    out.write("Mean over seeds ± seed-to-seed std. NLL is nats per assistant token (lower is better); "
              "the other metrics are percentages (higher is better).")
    if ci:
        out.write(f" Second line: difference to `{baseline}` with a paired bootstrap 95% CI (items and seeds resampled); "
                  "**bold** when the CI excludes 0.")
    out.write("\n\n| system | seeds | " + " | ".join(shown) + " |\n|---|---|" + "---|" * len(shown) + "\n")
    for s in systems:
        cells = []
        for m in shown:
            r = by.get((s.name, m))
            if r is None:
                cells.append("n/a")
                continue
            cell = _fmt(r.mean, m)
            if r.n_seeds > 1:
                cell += f" ± {_fmt(r.spread['std'], m)}"
            if r.delta is not None:
                sign = "+" if r.delta.estimate >= 0 else ""
                d = f"{sign}{_fmt(r.delta.estimate, m)} [{_fmt(r.delta.lo, m)}, {_fmt(r.delta.hi, m)}]"
                cell += "<br>" + (f"**{d}**" if r.delta.excludes_zero() else d)
            cells.append(cell)
        n_items = max((by[(s.name, m)].n_items for m in shown if (s.name, m) in by), default=0)
        out.write(f"| {s.name} | {len([x for x in s.seeds if x is not None]) or '-'} | " + " | ".join(cells) + " |\n")
    out.write("\nItems per metric: " + ", ".join(f"{m} n={next(r.n_items for r in rows if r.metric == m)}" for m in shown) + ".\n")
    return out.getvalue()


def write_csv(path: Path, rows: list[MetricRow]) -> None:
    buf = io.StringIO()
    fields = list(MetricRow("", "", 0, 0, 0.0, {"std": 0, "min": 0, "max": 0}, []).to_csv())
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow(r.to_csv())
    write_text(path, buf.getvalue())


def plot_metrics(path: Path, rows: list[MetricRow], systems: list[System], metrics: list[str]) -> None:
    """One panel per metric: mean per system, error bars = bootstrap 95% CI (else seed std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(r.metric == m for r in rows)]
    by = {(r.system, r.metric): r for r in rows}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
    for ax, m in zip(axes[0], shown):
        names = [s.name for s in systems if (s.name, m) in by]
        rs = [by[(n, m)] for n in names]
        means = [r.mean for r in rs]
        lo = [r.mean - (r.ci.lo if r.ci else r.mean - (0 if math.isnan(r.spread["std"]) else r.spread["std"])) for r in rs]
        hi = [(r.ci.hi if r.ci else r.mean + (0 if math.isnan(r.spread["std"]) else r.spread["std"])) - r.mean for r in rs]
        ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=4, color=["#999" if n == BASE_ROW else "C0" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(m + (" (lower better)" if not METRICS[m][3] else ""), fontsize=9)
        if not m.endswith("nll"):
            lo_y = min(r.ci.lo if r.ci else r.mean for r in rs)
            ax.set_ylim(bottom=min(0, lo_y))
        else:
            ax.set_ylim(min(means) * 0.95, max(means) * 1.03)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(path: Path, rows: list[MetricRow], systems: list[System], metrics: list[str], key: str) -> None:
    """One panel per metric against the training key `key` the sweep varies (e.g. trained tokens),
    error bars = bootstrap 95% CI of the mean; the untouched base model sits at 0 for token_budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs: dict[str, float] = {}
    for s in systems:
        if s.trained and s.train_config is not None:
            xs[s.name] = float(getattr(s.train_config, key))
        elif not s.trained and key == "token_budget":
            xs[s.name] = 0.0
    shown = [m for m in metrics if any(r.metric == m and r.system in xs for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
    for ax, m in zip(axes[0], shown):
        pts = sorted((xs[r.system], r) for r in rows if r.metric == m and r.system in xs)
        x = [p for p, _ in pts]
        y = [r.mean for _, r in pts]
        err = [[r.mean - r.ci.lo if r.ci else 0 for _, r in pts], [r.ci.hi - r.mean if r.ci else 0 for _, r in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
        if min(x) >= 0 and max(x) > 10 * max(min((v for v in x if v > 0), default=1), 1):
            ax.set_xscale("symlog", linthresh=max(min((v for v in x if v > 0), default=1), 1))
        ax.set_xticks(sorted(set(x)), [f"{v:g}" for v in sorted(set(x))], fontsize=7, rotation=45)
        ax.minorticks_off()
        ax.set_xlabel(key, fontsize=8)
        ax.set_title(m + (" (lower better)" if not METRICS[m][3] else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_curves(path: Path, systems: list[System]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for c, s in enumerate(x for x in systems if x.trained):
        for j, (seed, rd) in enumerate(sorted(s.run_dirs.items())):
            logf = Path(rd) / "train_log.jsonl"
            if not logf.is_file():
                continue
            recs = [json.loads(line) for line in logf.read_text().splitlines() if line.strip()]
            tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
            va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
            label = s.name if j == 0 else None
            if tr:
                ax.plot(*zip(*tr), color=f"C{c}", alpha=0.6, lw=1, label=label)
            if va:
                ax.plot(*zip(*va), color=f"C{c}", ls="--", marker="o", ms=3, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (solid: train, dashed: validation)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_funnels(path: Path, variant_stats: dict[str, dict]) -> None:
    """Rows kept after each curation stage, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(variant_stats)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, (name, st) in zip(axes[0], variant_stats.items()):
        stages = st.get("stages", [])
        labels = [x["stage"] for x in stages]
        kept = [x["kept"] for x in stages]
        ax.barh(range(len(kept)), kept, color="C2")
        ax.set_yticks(range(len(kept)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("rows kept (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- orchestration ----------------------------------------------------------------------------


def _recipe_path(cfg: AblationConfig, entry: str) -> Path:
    p = Path(entry)
    if p.suffix == ".toml":
        return p
    return Path(cfg.variants_dir) / f"{entry}.toml"


def train_config_for(cfg: AblationConfig, overrides: dict[str, Any] | None = None) -> Any:
    """The ablation's TrainConfig: `train_config` with the ablation's `[train]` keys (then `overrides`) applied.

    Overrides go through the same typed loader as the file, so a typo or a wrong type fails with the key.
    """
    from tomelab.config import from_dict, read_toml
    from training.recipe import TrainConfig

    merged = {**read_toml(cfg.train_config), **cfg.train, **(overrides or {})}
    return from_dict(TrainConfig, merged, file=f"{cfg.train_config} + ablation [train]")


def _alias_variant(variant: str, alias: str) -> str:
    """A variant folder that points at `variant`'s data under another name, so a sweep arm's runs get
    their own run directories (`runs/<alias>/<base>/<seed>`) without copying or re-curating data."""
    from tomelab import paths

    src, dst = paths.variants_dir() / variant, paths.variants_dir() / alias
    dst.mkdir(parents=True, exist_ok=True)
    link = dst / "train.parquet"
    if not link.is_symlink():
        link.symlink_to((src / "train.parquet").resolve())
    write_json(dst / "stats.json", {**read_json(src / "stats.json"), "variant": alias, "alias_of": variant})
    return alias


def plan_systems(cfg: AblationConfig, cfg_path: Path, names: dict[str, str]) -> list[System]:
    """Leaderboard rows to train: one per variant, or (sweeps) one per arm with its base and overrides."""
    if not cfg.arms:
        tcfg = train_config_for(cfg)
        return [System(names[e], [], [], base=cfg.base, train_variant=names[e], train_config=tcfg) for e in cfg.variants]
    out = []
    for arm in cfg.arms:
        variant = names[arm.variant or cfg.variants[0]]
        train_variant = f"{variant}@{cfg_path.stem}.{arm.name}" if arm.train else variant
        out.append(System(arm.name, [], [], base=arm.base or cfg.base, train_variant=train_variant,
                          train_config=train_config_for(cfg, arm.train)))
    return out


def run_ablation(cfg_path: str | Path, *, reverse: bool = False) -> Path:
    """Curate, then per seed (outer loop) train and evaluate every row; then compare. Returns the results dir.

    Seeds are the outer loop so that an ablation cut short still holds whole seeds for every row:
    re-running with fewer seeds builds a leaderboard from the cache at once. `reverse` walks the
    runs from the last to the first: a second process started that way on the same config shares the
    work with the first (per-run locks in training and eval keep them off each other's runs), so
    single-threaded runs use two cores.
    """
    from curation.pipeline import curate
    from training.train import train_run

    cfg_path = Path(cfg_path)
    cfg = load_config(cfg_path, AblationConfig)
    ecfg = load_config(cfg.eval_config, EvalConfig)

    log.info("[1/4] curate %d variant(s) (cached ones are read back)", len(cfg.variants))
    names, stats = {}, {}
    for entry in cfg.variants:
        vdir = curate(_recipe_path(cfg, entry))
        st = read_json(vdir / "stats.json")
        names[entry] = st.get("variant", vdir.name)
        stats[names[entry]] = st
    heldouts = {st["heldout_dir"] for st in stats.values()}
    if len(heldouts) != 1:
        raise TomelabError(f"variants use different held-out sets {sorted(heldouts)}: every variant must share the recipe's "
                           "[heldout] section so all models are tested on the same items.")
    heldout_dir = Path(heldouts.pop())

    systems = plan_systems(cfg, cfg_path, names)
    for s in systems:
        if "@" in s.train_variant:
            _alias_variant(s.train_variant.split("@")[0], s.train_variant)
    bases = list(dict.fromkeys(s.base for s in systems))
    if cfg.include_base:
        log.info("[2/4] evaluate the untouched base model(s) %s", ", ".join(bases))
        for b in bases:
            evaluate(b, ecfg, heldout_dir=heldout_dir)
    total = len(systems) * len(cfg.seeds)
    log.info("[3/4] train + evaluate %d run(s) (finished runs and cached eval sets are skipped)", total)
    order = [(seed, sys_) for seed in cfg.seeds for sys_ in systems]
    for done, (seed, sys_) in enumerate(reversed(order) if reverse else order, start=1):
        log.info("run %d/%d: %s seed %d", done, total, sys_.name, seed)
        rd = train_run(sys_.train_variant, sys_.base, seed, sys_.train_config)
        evaluate(rd, ecfg, heldout_dir=heldout_dir)
        sys_.refs.append(str(rd))
        sys_.seeds.append(seed)
        sys_.run_dirs[seed] = str(rd)
    for sys_ in systems:  # seed order, whichever way the runs were walked
        pairs = sorted(zip(sys_.seeds, sys_.refs))
        sys_.seeds, sys_.refs = [a for a, _ in pairs], [b for _, b in pairs]
    if cfg.include_base:
        base_rows = [System(BASE_ROW if len(bases) == 1 else f"{BASE_ROW} {b}", [b], [None], trained=False, base=b)
                     for b in bases]
        systems = base_rows + systems
    log.info("[4/4] leaderboard, plots, winner -> %s", cfg.results_dir)
    baseline = cfg.baseline if cfg.arms else names[cfg.baseline]
    return write_results(cfg, cfg_path, systems, stats, baseline)


def write_results(cfg: AblationConfig, cfg_path: Path, systems: list[System], stats: dict[str, dict], baseline: str) -> Path:
    """Leaderboard (md + csv), plots and winner.json from the cached per-item eval outputs."""
    results = Path(cfg.results_dir)
    rows = compare(systems, baseline, cfg.metrics, ci=cfg.ci, n_boot=cfg.n_bootstrap)
    title = f"Ablation {cfg_path.stem}: {cfg.base}, seeds {cfg.seeds}, baseline `{baseline}`"
    write_text(results / "leaderboard.md", leaderboard_markdown(rows, systems, baseline, cfg.metrics, title=title, ci=cfg.ci))
    write_csv(results / "leaderboard.csv", rows)
    plot_metrics(results / "metrics.png", rows, systems, cfg.metrics)
    plot_loss_curves(results / "loss_curves.png", systems)
    if cfg.curve:
        plot_curve(results / "curve.png", rows, systems, cfg.metrics, cfg.curve)
    if stats:
        plot_funnels(results / "funnel.png", stats)
    win, k, run_metrics = pick_winner(rows, systems, cfg.winner)
    write_json(results / "winner.json", {
        "variant": win.train_variant or win.name, "base": win.base or cfg.base, "seed": win.seeds[k], "run_dir": win.refs[k], "model_dir": None,
        "metrics": run_metrics,
        "variant_mean": {r.metric: r.mean for r in rows if r.system == win.name},
        "rule": cfg.winner.describe(), "ablation_config": str(cfg_path), "eval_config": cfg.eval_config,
    })
    log.info("winner: %s seed %s (%s)", win.name, win.seeds[k], cfg.winner.describe())
    return results
