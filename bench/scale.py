"""`tomelab curate` on N rows, LocalExecutor vs RayExecutor (2 workers), in one run: ratio, per-stage cost, peak memory.

    .venv/bin/python bench/scale.py [--rows 100000] [--workers 2]

The pool is bench/curation.py's (real ShareGPT/Alpaca/GSM8K turn pairs plus injected duplicates). One
recipe runs every stage kind but the model-based quality (IFD costs ~1 s per row here): held-out
removal, heuristic filters and n-gram + embedding decontamination (row-local), MinHash (map -> shuffle
-> reduce), exact and semantic dedup and the budget (global; semantic dedup embeds on the workers).
Each side curates in its own fresh artefact home (artifacts/bench/scale-<side>/), so neither reuses
the other's checkpoints or embedding cache. Prints per stage its kind, seconds and microseconds per row
under each executor and the Ray/local ratio; per side the stage seconds, rows/s and peak RSS (this
process plus its descendants, which include a local Ray's raylet and workers; Ray's shared-memory object
store is counted in every process that maps it, so the Ray figure is an upper bound); whether both kept
the same rows with the same drop reasons; and a linear 1M-row projection from the local per-row costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class PeakRSS:
    """Samples the RSS of this process and all its descendants every 0.2 s; `peak` in MiB."""

    def __init__(self) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0.0, threading.Event()

    def _total(self) -> float:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total / 2**20

    def __enter__(self) -> PeakRSS:
        def loop() -> None:
            while not self._stop.wait(0.2):
                self.peak = max(self.peak, self._total())

        self.peak = self._total()
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def fresh_home(real: Path, side: str) -> Path:
    """<home>/bench/scale-<side>/artifacts, sharing only the converted models and the distilled m2v."""
    from curation.embed import Embedder

    Embedder("m2v", cache_dir=real / "cache")  # distils once into the real cache if it is not there yet
    home = real / "bench" / f"scale-{side}" / "artifacts"
    shutil.rmtree(home.parent, ignore_errors=True)
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "models").symlink_to(real / "cache" / "models", target_is_directory=True)
    if (real / "models").exists():
        (home / "models").symlink_to(real / "models", target_is_directory=True)
    return home


def curate_side(real: Path, side: str, recipe: Path, executor) -> dict:
    from curation.pipeline import curate

    os.environ["TOMELAB_HOME"] = str(fresh_home(real, side))
    with PeakRSS() as mem:
        out = curate(recipe, progress=False, executor=executor)
    stats = json.loads((out / "stats.json").read_text())
    import polars as pl

    dropped = pl.read_parquet(out / "dropped.parquet").select("id", "stage", "reason").rows()
    stages = [s for s in stats["stages"] if not s["stage"].startswith("load:")]
    return {"stages": stages, "seconds": sum(s["seconds"] for s in stages), "wall": stats["seconds"],
            "peak": mem.peak, "train": pl.read_parquet(out / "train.parquet")["id"].to_list(), "dropped": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    from bench.curation import build_pool, recipe_text
    from curation.decontam import DecontamStage
    from curation.dedup import ExactDedupStage, MinHashStage, SemanticDedupStage
    from curation.executors import LocalExecutor, RayExecutor
    from curation.filters import FiltersStage
    from curation.heldout import HeldoutStage
    from curation.mixing import BudgetStage
    from tomelab import paths

    kinds = {c.name: c.kind for c in (HeldoutStage, ExactDedupStage, MinHashStage, FiltersStage, DecontamStage,
                                      SemanticDedupStage, BudgetStage)}
    real = paths.home()
    bench = real / "bench"
    max_base = 0 if args.rows >= 100_000 else int(args.rows * 0.9)
    data, _ = build_pool(args.rows, args.seed, bench / f"pool-{args.rows}-{max_base}.parquet", max_base=max_base)
    recipe = bench / "scale.toml"
    recipe.write_text(recipe_text("scale", data, max(1, args.rows // 5)))  # bench/curation.py's recipe

    local = curate_side(real, "local", recipe, LocalExecutor())
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback cluster: no token written to ~/.ray
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        ex = RayExecutor(workers=args.workers)
        dist = curate_side(real, "ray", recipe, ex)
        ex.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.rows:,} rows, recipe {recipe}\n")
    print("| stage | kind | rows in | local s | local us/row | ray s | ray us/row | ray/local |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(local["stages"], dist["stages"]):
        n = max(1, a["rows_in"])
        print(f"| {a['stage']} | {kinds.get(a['stage'], '?')} | {a['rows_in']:,} | {a['seconds']:.2f} | "
              f"{1e6 * a['seconds'] / n:.1f} | {b['seconds']:.2f} | {1e6 * b['seconds'] / n:.1f} | "
              f"{b['seconds'] / max(a['seconds'], 1e-9):.2f} |")
    for side, r in (("local", local), (f"ray ({args.workers} workers)", dist)):
        print(f"{side}: stages {r['seconds']:.1f} s ({args.rows / max(r['seconds'], 1e-9):,.0f} rows/s), "
              f"curate wall {r['wall']:.1f} s, peak RSS {r['peak']:,.0f} MiB")
    print(f"ray/local (stage seconds) = {dist['seconds'] / max(local['seconds'], 1e-9):.2f}; "
          f"same kept rows: {local['train'] == dist['train']}; "
          f"same dropped (id, stage, reason): {local['dropped'] == dist['dropped']}")
    proj = sum(1e6 * a["seconds"] / max(1, a["rows_in"]) for a in local["stages"])  # us/row x 1M rows = s
    glob = ", ".join(a["stage"] for a in local["stages"] if kinds.get(a["stage"]) != "row")
    print(f"1M-row projection (linear in the local per-row costs): {proj:,.0f} s in one process; the "
          f"non-row-local stages ({glob}) grow faster than linearly and hold the whole frame on the driver")


if __name__ == "__main__":
    main()
