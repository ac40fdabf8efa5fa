"""A finished tiny ablation on disk, as `tomelab ablate` and curation leave it, for the app's tests:
a results folder (winner.json with a home-relative run_dir, leaderboard.csv/md, a plot), two variants
(train.parquet, dropped.parquet) with their data cards and funnels, and the winner's run dir."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import polars as pl

BASE = "smollm2-135m-instruct"
WINNER, OTHER = "demo-random", "demo-dedup-filter"
RUN_REL = f"runs/{WINNER}/{BASE}/0"
RULE = "best mean heldout_nll across seeds (lower is better); ties broken by ifeval_prompt_strict"
LEADERBOARD = [  # system, metric, mean, ci_lo, ci_hi, delta, delta_lo, delta_hi, mde
    ("base (untouched)", "heldout_nll", 1.6090, 1.5221, 1.7149, 0.0301, 0.0210, 0.0392, 0.011),
    (WINNER, "heldout_nll", 1.5789, 1.4902, 1.6655, None, None, None, None),
    (OTHER, "heldout_nll", 1.5821, 1.4950, 1.6690, 0.0032, -0.0041, 0.0105, 0.011),
    ("random-aa", "heldout_nll", 1.5790, 1.4900, 1.6650, 0.0001, -0.0060, 0.0062, 0.011),
]
REFUSAL_DETAIL = "response contains 'as an AI language model'"


def _png(path: Path, color: tuple[int, int, int]) -> None:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (320, 160), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle([20, 40, 120, 140], fill=color)
    d.rectangle([160, 80, 260, 140], fill=color)
    im.save(path)


def _row(source: str, user: str, answer: str) -> dict:
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    rid = hashlib.sha256(json.dumps(msgs).encode()).hexdigest()[:16]
    return {"id": rid, "source": source, "messages": msgs, "meta": "{}"}


def write_variants(home: Path, cards: Path) -> dict[str, list[dict]]:
    """Two variants over one pool: WINNER dropped the refusals that OTHER kept; each dropped some rows over budget."""
    pool = [_row("sharegpt", f"Question {i}: how do I grow tomatoes in pot {i}?", f"Answer {i}: water them daily.")
            for i in range(12)]
    pool += [_row("sharegpt", f"Refusal prompt {i}", "As an AI language model, I cannot do that.") for i in range(3)]
    pool += [_row("oasst", f"oasst question {i} about the moon", f"oasst answer {i}: it orbits the earth.")
             for i in range(6)]
    kept = {WINNER: pool[:8] + pool[15:18], OTHER: pool[4:21]}  # the winner filtered the refusals out
    cards.mkdir(parents=True, exist_ok=True)
    for name, rows in kept.items():
        d = home / "variants" / name
        d.mkdir(parents=True)
        ids = {r["id"] for r in rows}
        df = pl.DataFrame(rows).with_columns(pl.Series("ifd", [0.5 + 0.01 * k for k in range(len(rows))]))
        df.write_parquet(d / "train.parquet")
        dropped = []
        for r in pool:
            if r["id"] in ids:
                continue
            refusal = r["messages"][1]["content"].startswith("As an AI")
            dropped.append({"id": r["id"], "source": r["source"], "stage": "filters" if refusal else "budget",
                            "reason": "refusal" if refusal else "over_budget",
                            "detail": REFUSAL_DETAIL if refusal else "not sampled into the 14-row budget"})
        pl.DataFrame(dropped, schema={c: pl.String for c in ("id", "source", "stage", "reason", "detail")}
                     ).write_parquet(d / "dropped.parquet")
        (cards / f"{name}.md").write_text(
            f"---\npretty_name: tomelab variant {name}\nlicense: other\n---\n\n# Dataset card: `{name}`\n\n"
            f"{len(rows)} training rows of the {name} recipe.\n\n## Funnel\n\n![funnel]({name}_funnel.png)\n\n"
            "| stage | rows in | kept | dropped |\n|---|---|---|---|\n| filters | 21 | 18 | 3 |\n")
        _png(cards / f"{name}_funnel.png", (40, 120, 200))
    return kept


def write_results(results: Path, *, run_dir: str = RUN_REL, ablation: str = "configs/ablation-demo.toml",
                  variant: str = WINNER, mtime: float | None = None) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    cols = ["system", "metric", "n_seeds", "n_items", "mean", "ci_lo", "ci_hi", "delta_vs_baseline", "delta_lo",
            "delta_hi", "mde", "p_holm"]
    with (results / "leaderboard.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s, m, mean, lo, hi, d, dlo, dhi, mde in LEADERBOARD:
            w.writerow([s, m, 1, 27, mean, lo, hi, "" if d is None else d, "" if dlo is None else dlo,
                        "" if dhi is None else dhi, "" if mde is None else mde, "" if d is None else 0.04])
    (results / "leaderboard.md").write_text(f"# Ablation {Path(ablation).stem}\n\n| system | heldout_nll |\n|---|---|\n"
                                            + "".join(f"| {r[0]} | {r[2]:.3f} |\n" for r in LEADERBOARD))
    _png(results / "metrics.png", (200, 80, 40))
    (results / "winner.json").write_text(json.dumps({
        "variant": variant, "base": BASE, "seed": 0, "run_dir": run_dir, "metrics": {"heldout_nll": 1.5789},
        "rule": RULE, "ablation_config": ablation, "eval_config": "configs/eval/ablation.toml"}))
    if mtime is not None:
        os.utime(results / "winner.json", (mtime, mtime))
    return results


def write_run(home: Path, model_dir: Path | None = None, rel: str = RUN_REL) -> Path:
    """The winner's run dir: the base model's files (served as a merged export) or just config + metrics."""
    run = home / rel
    run.mkdir(parents=True)
    if model_dir is not None:
        for f in model_dir.iterdir():
            if f.is_file() and f.name != "tomelab_model.json":
                (run / f.name).symlink_to(f.resolve())
    else:
        (run / "config.json").write_text(json.dumps({"variant": WINNER, "base": BASE, "seed": 0}))
    (run / "metrics.json").write_text(json.dumps({"heldout_nll": 1.5789}))
    return run
