"""Which rows each seed's batch plan reads, without training: the warm-up sweep's seed-agreement check (issue 15).

`python scripts/warmup_seed_overlap.py [--variant demo-dedup-filter] [--budgets 3000 12000 24000] [--seeds 0 1]`
tokenises a curated variant exactly as `tomelab train` does, builds `training.data.plan_batches` for every
(budget, seed) on top of `--config` (default configs/train/small.toml, the sweep's train config) and prints,
per budget: rows in the variant, optimiser steps, rows read per seed, the Jaccard overlap of the row sets of each
seed pair, the passes over the data, and how many steps / micro-batches are identical between seeds.
It reads the variant from $TOMELAB_HOME and writes nothing.
`--ranges` instead prints the held-out NLL seed range (max - min) of every row of the committed leaderboards
(results/small, results/sweeps/*), which needs no variant and no model. `--compare A B` reads two evaluated runs'
held-out items (`<eval dir>/heldout.jsonl`, split "test") and prints their token-weighted NLL, the difference, and
how far the per-item differences spread: a small difference with a wide item spread is cancellation, not two
near-identical models.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def print_ranges(root: Path) -> None:
    """Seed range of heldout_nll per leaderboard row: how far apart the seeds of each system landed."""
    import csv

    for f in sorted([root / "small" / "leaderboard.csv", *(root / "sweeps").glob("*/leaderboard.csv")]):
        for r in csv.DictReader(f.open()):
            if r["metric"] == "heldout_nll" and int(r["n_seeds"]) > 1:
                print(f"{f.parent.name:14} {r['system']:20} seeds {r['n_seeds']} items {r['n_items']} "
                      f"range {float(r['seed_max']) - float(r['seed_min']):.5f} ({float(r['seed_min']):.5f}-{float(r['seed_max']):.5f})")


def compare_items(a: Path, b: Path) -> None:
    """Per-item NLL difference of two evaluated runs on the held-out test items (token-weighted, as the metric)."""
    import json

    import numpy as np

    def load(d: Path) -> dict[str, tuple[float, int]]:
        recs = [json.loads(line) for line in (d / "heldout.jsonl").open()]
        return {r["id"]: (r["scores"]["nll"], r["scores"]["n_tokens"]) for r in recs
                if r["scores"].get("nll") is not None and r["scores"].get("split", "test") == "test"}

    ra, rb = load(a), load(b)
    ids = sorted(set(ra) & set(rb))
    na = np.array([ra[i][0] for i in ids])
    nb = np.array([rb[i][0] for i in ids])
    w = np.array([ra[i][1] for i in ids], dtype=float)
    w /= w.sum()
    d = na - nb
    mean = float(w @ d)
    se = float(np.sqrt(len(ids) / (len(ids) - 1) * np.sum(w**2 * (d - mean) ** 2)))  # item-resampling SE of `mean`
    print(f"{len(ids)} items: NLL {float(w @ na):.5f} vs {float(w @ nb):.5f}, difference {mean:+.5f}; per-item "
          f"differences: sd {float(np.std(d, ddof=1)):.4f}, max |d| {float(np.abs(d).max()):.4f}, "
          f"A lower on {int((d < 0).sum())}/{len(ids)}; item-resampling SE of the difference {se:.5f}")


def main() -> None:
    import numpy as np

    from training.config import load_train_config
    from training.data import plan_batches, read_conversations, tokenize_rows, variant_paths
    from training.load import load_base_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="demo-dedup-filter")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--config", default="configs/train/small.toml", help="train TOML the sweep resolves to")
    ap.add_argument("--budgets", type=int, nargs="+", default=[3000, 12000, 24000], help="token_budget values")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--ranges", action="store_true", help="print the committed leaderboards' seed ranges and exit")
    ap.add_argument("--compare", nargs=2, metavar="EVAL_DIR", type=Path, help="per-item NLL of two evaluated runs")
    args = ap.parse_args()
    if args.ranges:
        return print_ranges(Path(__file__).resolve().parent.parent / "results")
    if args.compare:
        return compare_items(*args.compare)

    base_cfg = load_train_config(args.config)
    train_path, _ = variant_paths(args.variant)
    examples, _ = tokenize_rows(load_base_tokenizer(args.base), read_conversations(train_path), base_cfg.max_length, "train")
    lengths = np.array([e.n_tokens for e in examples])
    print(f"{args.variant}: {len(examples)} rows, {int(lengths.sum()):,} tokens/epoch, "
          f"{int((lengths == base_cfg.max_length).sum())} rows at max_length {base_cfg.max_length}; "
          f"packing={base_cfg.packing} batch_size={base_cfg.batch_size} micro_batch_tokens={base_cfg.micro_batch_tokens}")
    for budget in args.budgets:
        cfg = dataclasses.replace(base_cfg, token_budget=budget)
        plans = {s: plan_batches(examples, seed=s, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                 token_budget=cfg.token_budget, epochs_cap=cfg.epochs_cap, packing=cfg.packing,
                                 micro_batch_tokens=cfg.micro_batch_tokens, budget_unit=cfg.budget_unit)
                 for s in args.seeds}
        print(f"\ntoken_budget {budget:,}:")
        for s, steps in plans.items():
            read = [j for step in steps for mb in step for j in mb]
            print(f"  seed {s}: {len(steps)} steps, {len(read)} rows read ({len(set(read))} distinct, "
                  f"{len(read) / len(examples):.2f} epochs), step sizes {[sum(len(mb) for mb in st) for st in steps]}")
        for a, b in itertools.combinations(args.seeds, 2):
            ra = {j for st in plans[a] for mb in st for j in mb}
            rb = {j for st in plans[b] for mb in st for j in mb}
            same_steps = sum(sorted(sum(x, [])) == sorted(sum(y, [])) for x, y in zip(plans[a], plans[b]))
            mbs_a = {tuple(sorted(mb)) for st in plans[a] for mb in st}
            mbs_b = {tuple(sorted(mb)) for st in plans[b] for mb in st}
            print(f"  seeds {a} vs {b}: Jaccard {len(ra & rb) / len(ra | rb):.3f} ({len(ra & rb)} shared of "
                  f"{len(ra | rb)}), identical plan: {plans[a] == plans[b]}, same rows in {same_steps}/"
                  f"{min(len(plans[a]), len(plans[b]))} steps, {len(mbs_a & mbs_b)} shared micro-batches")


if __name__ == "__main__":
    main()
