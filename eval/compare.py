"""Comparison and winner: the leaderboard's numbers from cached per-item eval outputs (pure, no training).

A system is one leaderboard row: a variant's runs (one per block/seed), a control, or the untouched
base model. Two systems are compared on the same items, paired by block (row k of both is block k: the
same data draw and training seed) with `eval.stats.block_diff`; every row reports its minimum
detectable effect and a Holm-adjusted p-value over every (system, metric) cell compared.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eval.config import METRICS, WinnerRule
from eval.evaluate import read_item_scores
from eval.stats import Comparison, block_diff, block_mean, holm, seed_spread, weighted_metric
from tomelab.errors import TomelabError

log = logging.getLogger(__name__)

BASE_ROW = "base (untouched)"


@dataclass
class System:
    """One leaderboard row: a variant's runs (one per seed/block), a control, or the untouched base model."""

    name: str
    refs: list[str]  # eval refs: run dirs, or the base model name
    seeds: list[int | None]
    trained: bool = True
    run_dirs: dict[int, str] = field(default_factory=dict)
    base: str = ""
    train_variant: str = ""  # the variant folder train_run reads (an alias for sweep arms with overrides)
    train_config: Any = None
    role: str = "variant"  # variant | baseline | negative control | positive control | base
    block_variants: dict[int, str] = field(default_factory=dict)  # seed -> variant folder (blocked ablations)

    def variant_for(self, seed: int) -> str:
        return self.block_variants.get(seed) or self.train_variant or self.name


@dataclass
class MetricRow:
    system: str
    metric: str
    n_seeds: int
    n_items: int
    mean: float
    spread: dict[str, float]
    per_seed: list[float]
    ci: Comparison | None = None  # of the mean over blocks
    delta: Comparison | None = None  # system - baseline, paired by block and item
    p_holm: float | None = None  # delta's p-value, Holm-adjusted over every cell compared
    role: str = "variant"
    extra: dict[str, Any] = field(default_factory=dict)  # trained tokens, precision

    def to_csv(self) -> dict[str, Any]:
        d, c = self.delta, self.ci
        return {
            "system": self.system, "role": self.role, "metric": self.metric, "n_seeds": self.n_seeds,
            "n_items": self.n_items, "mean": self.mean, "seed_std": self.spread["std"],
            "seed_min": self.spread["min"], "seed_max": self.spread["max"],
            "ci_lo": c.lo if c else None, "ci_hi": c.hi if c else None,
            "delta_vs_baseline": d.estimate if d else None, "delta_lo": d.lo if d else None,
            "delta_hi": d.hi if d else None, "delta_se": d.se if d else None, "delta_df": d.df if d else None,
            "mde": d.mde if d else None, "p": d.p if d else None, "p_holm": self.p_holm,
            "bound": d.bound if d else None,
            **{k: self.extra.get(k) for k in ("answer_tokens", "prompt_tokens", "precision")},
        }


def item_filter(metric: str, labels: dict[str, bool] | None) -> Any:
    """Which items of the metric's eval set count: its split, and for `:clean`/`:rejected` the labels."""
    subset = METRICS[metric][4]
    if subset is None:
        return lambda i, sc: True
    split, _, part = subset.partition(":")
    if part and labels is None:
        raise TomelabError(f"{metric} needs held-out labels: set clean_recipe in the ablation config.")

    def keep(i: str, sc: dict) -> bool:
        if sc.get("split", "test") != split:
            return False
        return not part or (labels.get(i) is (part == "clean"))  # type: ignore[union-attr]

    return keep


def score_matrix(systems: list[System], metric: str, labels: dict[str, bool] | None = None
                 ) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """Per system a (seeds x items) matrix over the items every run scored, plus item weights."""
    set_name, key, weight_key, _, _ = METRICS[metric]
    per_ref = {ref: read_item_scores(ref, set_name) for s in systems for ref in s.refs}
    keep = item_filter(metric, labels)

    def usable(i: str, sc: dict | None) -> bool:
        return sc is not None and sc.get(key) is not None and not (isinstance(sc[key], float) and math.isnan(sc[key])) \
            and (weight_key is None or (sc.get(weight_key) or 0) > 0) and keep(i, sc)

    ids = sorted(set.intersection(*[{i for i, sc in d.items() if usable(i, sc)} for d in per_ref.values()]))
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


def run_facts(s: System) -> dict[str, Any]:
    """Mean trained answer / prompt tokens per run and the resolved precision, from the runs' records."""
    if not s.trained:
        return {}
    ans, prm, prec = [], [], set()
    for rd in s.refs:
        m = Path(rd) / "metrics.json"
        c = Path(rd) / "config.json"
        if m.is_file():
            rec = json.loads(m.read_text(encoding="utf-8"))
            ans.append(rec.get("loss_tokens_seen", 0))
            prm.append(rec.get("prompt_tokens_seen", rec.get("tokens_seen", 0) - rec.get("loss_tokens_seen", 0)))
            prec.add(rec.get("precision") or rec.get("base_dtype"))
        elif c.is_file():
            prec.add(json.loads(c.read_text(encoding="utf-8")).get("base_dtype"))
    return {"answer_tokens": round(float(np.mean(ans))) if ans else None,
            "prompt_tokens": round(float(np.mean(prm))) if prm else None,
            "precision": ",".join(sorted(p for p in prec if p)) or None}


def check_precision(systems: list[System]) -> str | None:
    """The one resolved precision of every trained run; refuses a comparison that mixes precisions."""
    seen: dict[str, list[str]] = {}
    for s in systems:
        for rd in s.refs if s.trained else []:
            for f in ("metrics.json", "config.json"):
                p = Path(rd) / f
                if p.is_file():
                    rec = json.loads(p.read_text(encoding="utf-8"))
                    v = rec.get("precision") or rec.get("base_dtype")
                    if v:
                        seen.setdefault(v, []).append(rd)
                        break
    if len(seen) > 1:
        ex = "; ".join(f"{k}: {v[0]}" for k, v in seen.items())
        raise TomelabError(f"runs were trained at different precisions ({ex}), so their differences mix data and "
                           "numerics. Pin `precision` in the ablation's [train] (or TOMELAB_PRECISION) and retrain.")
    return next(iter(seen), None)


def compare(systems: list[System], baseline: str, metrics: list[str], *, ci: bool,
            labels: dict[str, bool] | None = None) -> list[MetricRow]:
    """Mean over seeds, seed spread and (when ci) intervals of each metric and of its paired difference to
    the baseline; Holm's correction over every (system, metric) difference computed."""
    rows: list[MetricRow] = []
    facts = {s.name: run_facts(s) for s in systems}
    for metric in metrics:
        try:
            ids, mats, w = score_matrix(systems, metric, labels)
        except TomelabError as e:
            log.warning("skipping %s: %s", metric, e)
            continue
        for s in systems:
            m = mats[s.name]
            per_seed = weighted_metric(m, w)
            row = MetricRow(s.name, metric, m.shape[0], len(ids), float(per_seed.mean()), seed_spread(per_seed),
                            [float(x) for x in per_seed], role=s.role, extra=facts[s.name])
            if ci:
                row.ci = block_mean(m, w, name=s.name)
                if s.name != baseline:
                    row.delta = block_diff(m, mats[baseline], w, names=(s.name, baseline))
            rows.append(row)
    cells = [r for r in rows if r.delta is not None]
    for r, p in zip(cells, holm([r.delta.p for r in cells])):  # type: ignore[union-attr]
        r.p_holm = p
    return rows


def pick_winner(rows: list[MetricRow], systems: list[System], rule: WinnerRule) -> tuple[System, int, dict[str, float]]:
    """Best trained variant by the rule (validation metrics only), then its best seed by the same rule.
    Controls never win."""
    higher = {m: METRICS[m][3] for m in METRICS}
    by = {(r.system, r.metric): r for r in rows}
    trained = [s for s in systems if s.trained and "control" not in s.role]
    for m in (rule.metric, rule.tie_breaker):
        missing = [s.name for s in trained if (s.name, m) not in by]
        if missing:
            raise TomelabError(f"winner rule needs {m} but it was not evaluated for {missing}; enable its eval set "
                               "([heldout] val = true in the eval config) and list it in the ablation's metrics.")

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
