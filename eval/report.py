"""Reports of an ablation: leaderboard (markdown with its verdict lines, CSV) and plots (PNG).

The markdown's first lines say whether the ablation could see anything: was the positive control
detected, did the A/A control's interval cover 0, and what is the smallest effect each comparison
could detect (MDE). A null result is written as a bound ("no effect larger than X"), never as "no effect".
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from eval.compare import BASE_ROW, MetricRow, System
from eval.config import METRICS
from tomelab.io import pyplot, save_figure, write_text


def _fmt(x: float | None, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}" if metric.endswith("nll") else f"{100 * x:.1f}"


def _delta_text(r: MetricRow) -> str:
    d = r.delta
    assert d is not None
    sign = "+" if d.estimate >= 0 else ""
    return f"{sign}{_fmt(d.estimate, r.metric)} [{_fmt(d.lo, r.metric)}, {_fmt(d.hi, r.metric)}]"


def blocks_needed(rows: list[MetricRow], metric: str, target: float) -> tuple[float, int] | None:
    """(median MDE now, blocks for an MDE of `target`) on `metric`, from the variants' comparisons.

    The standard error shrinks as 1/sqrt(blocks) when training noise dominates, and the MDE is computed
    as the comparisons compute it, (t_0.975 + t_0.80) x SE, with blocks - 1 degrees of freedom (about
    the crossed model's df when the block term dominates), so the projection never promises what the t
    quantiles of a few blocks cannot deliver."""
    from eval.stats import _t_quantile

    ds = sorted((r.delta.mde, r.delta.se, r.n_seeds) for r in rows
                if r.metric == metric and r.delta is not None and r.role in ("variant", "negative control"))
    if not ds or target <= 0:
        return None
    mde, se, n = ds[len(ds) // 2]
    for blocks in range(max(n, 2), 1000):
        if (_t_quantile(0.975, blocks - 1) + _t_quantile(0.8, blocks - 1)) * se * math.sqrt(n / blocks) <= target:
            return mde, blocks
    return mde, 1000


def verdict_lines(rows: list[MetricRow], systems: list[System], baseline: str, primary: str,
                  target_mde: float = 0.0) -> list[str]:
    """What the ablation can and cannot say on the primary metric, controls first."""
    by = {(r.system, r.metric): r for r in rows}
    out: list[str] = []
    lower = not METRICS[primary][3]
    worse = "higher" if lower else "lower"
    pos = [s for s in systems if s.role == "positive control"]
    neg = [s for s in systems if s.role == "negative control"]
    for s in pos:
        r = by.get((s.name, primary))
        if r is None or r.delta is None:
            out.append(f"**Positive control `{s.name}` was not evaluated on {primary}: power unknown.**")
            continue
        detected = (r.delta.lo > 0) if lower else (r.delta.hi < 0)
        out.append(f"**Positive control `{s.name}` {'detected' if detected else 'NOT detected'}** on {primary}: "
                   f"{_delta_text(r)} vs `{baseline}` (it must be {worse})."
                   + ("" if detected else " **This ablation is underpowered: a null below does not mean no effect.**"))
    for s in neg:
        r = by.get((s.name, primary))
        if r is None or r.delta is None:
            continue
        ok = not r.delta.excludes_zero()
        out.append(f"**Negative control (A/A) `{s.name}` {'covers 0' if ok else 'does NOT cover 0'}** on {primary}: "
                   f"{_delta_text(r)}" + ("." if ok else ": the intervals are too narrow or the draws differ; "
                                          "do not trust the CIs below."))
        off = [x for x in rows if x.system == s.name and x.metric != primary and x.delta and x.delta.excludes_zero()]
        if off:
            out.append("A/A excludes 0 on " + ", ".join(f"{x.metric} ({_delta_text(x)})" for x in off)
                       + ": read those columns' intervals as too narrow.")
    need = blocks_needed(rows, primary, target_mde)
    if need:
        met = need[0] <= target_mde
        out.append(f"Median MDE of the comparisons on {primary}: {_fmt(need[0], primary)}: "
                   + (f"the target of {_fmt(target_mde, primary)} is met." if met else
                      f"an MDE of {_fmt(target_mde, primary)} (the target) needs about {need[1]} blocks at this budget."))
    for s in systems:
        r = by.get((s.name, primary))
        if s.role != "variant" or r is None or r.delta is None:
            continue
        d = r.delta
        if d.excludes_zero():
            better = (d.estimate < 0) == lower
            out.append(f"`{s.name}` vs `{baseline}`: {_delta_text(r)}, {'better' if better else 'worse'} "
                       f"(Holm-adjusted p = {r.p_holm:.3g}; MDE {_fmt(d.mde, primary)}).")
        else:
            out.append(f"`{s.name}` vs `{baseline}`: no effect larger than {_fmt(d.bound, primary)} on {primary} "
                       f"(95% CI {_delta_text(r)}; MDE {_fmt(d.mde, primary)}).")
    return out


def leaderboard_markdown(rows: list[MetricRow], systems: list[System], baseline: str, metrics: list[str], *, title: str,
                         ci: bool, primary: str = "", notes: list[str] | None = None, target_mde: float = 0.0) -> str:
    by = {(r.system, r.metric): r for r in rows}
    shown = [m for m in metrics if any(r.metric == m for r in rows)]
    out = io.StringIO()
    out.write(f"# {title}\n\n")
    if ci and primary in shown:
        for line in verdict_lines(rows, systems, baseline, primary, target_mde):
            out.write(f"- {line}\n")
        out.write("\n")
    for n in notes or []:
        out.write(f"{n}\n\n")
    out.write("Mean over blocks (seeds) ± block-to-block std. NLL is nats per scored answer token (lower is better); "
              "the other metrics are percentages (higher is better).")
    if ci:
        out.write(f" Second line: difference to `{baseline}`, paired by block and item, with a 95% t interval from a "
                  "crossed blocks x items variance model (eval/stats.py); **bold** when it excludes 0. Third line: "
                  "the minimum detectable effect (80% power) and the Holm-adjusted p-value over every cell compared.")
    out.write("\n\n| system | role | seeds | answer tok | " + " | ".join(shown) + " |\n|---|---|---|---|"
              + "---|" * len(shown) + "\n")
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
                d = _delta_text(r)
                cell += "<br>" + (f"**{d}**" if r.delta.excludes_zero() else d)
                cell += f"<br>MDE {_fmt(r.delta.mde, m)}, p_Holm {r.p_holm:.2g}" if r.p_holm is not None else ""
            cells.append(cell)
        facts = next((r.extra for r in rows if r.system == s.name), {})
        tok = facts.get("answer_tokens")
        out.write(f"| {s.name} | {s.role} | {len([x for x in s.seeds if x is not None]) or '-'} | "
                  f"{tok if tok is not None else '-'} | " + " | ".join(cells) + " |\n")
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
    plt = pyplot()

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
    save_figure(fig, path)
    plt.close(fig)


def plot_curve(path: Path, rows: list[MetricRow], systems: list[System], metrics: list[str], key: str) -> None:
    """One panel per metric against the training key `key` the sweep varies (e.g. trained tokens),
    error bars = bootstrap 95% CI of the mean; the untouched base model sits at 0 for token_budget."""
    plt = pyplot()

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
    save_figure(fig, path)
    plt.close(fig)


def plot_loss_curves(path: Path, systems: list[System]) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for c, s in enumerate(x for x in systems if x.trained):
        for j, (_seed, rd) in enumerate(sorted(s.run_dirs.items())):
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
    save_figure(fig, path)
    plt.close(fig)


def plot_funnels(path: Path, variant_stats: dict[str, dict]) -> None:
    """Rows kept after each curation stage, one panel per variant."""
    plt = pyplot()

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
    save_figure(fig, path)
    plt.close(fig)




def plot_deltas(path: Path, rows: list[MetricRow], metric: str, baseline: str) -> None:
    """Forest plot of each system's paired difference to the baseline on one metric: the 95% interval,
    the +-MDE band (what this design could detect), and the zero line. Controls are drawn in grey."""
    plt = pyplot()
    rs = [r for r in rows if r.metric == metric and r.delta is not None]
    if not rs:
        return
    fig, ax = plt.subplots(figsize=(7, 0.55 * len(rs) + 1.4))
    for y, r in enumerate(rs):
        d = r.delta
        colour = "#888" if "control" in r.role or r.role == "base" else "C0"
        ax.errorbar([d.estimate], [y], xerr=[[d.estimate - d.lo], [d.hi - d.estimate]], fmt="o", color=colour, capsize=4)
        if d.mde == d.mde:  # not NaN
            ax.plot([-d.mde, d.mde], [y, y], color="C1", alpha=0.25, lw=8, solid_capstyle="butt")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rs)), [f"{r.system} ({r.role})" for r in rs], fontsize=8)
    ax.invert_yaxis()
    better = "lower" if not METRICS[metric][3] else "higher"
    ax.set_xlabel(f"{metric}: difference to {baseline} ({better} is better); orange band: +-MDE (80% power)", fontsize=8)
    ax.set_title("paired by block and item, 95% t intervals", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
