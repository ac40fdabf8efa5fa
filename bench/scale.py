"""Curation stages, local vs Ray Data (2 workers), on the bench pool: ratio, per-stage cost per row, peak memory.

    .venv/bin/python bench/scale.py [--rows 100000] [--workers 2]

The pool is bench/curation.py's (real ShareGPT/Alpaca/GSM8K turn pairs plus injected duplicates).
Both executors run the same stage list on the same prepared frame, in one run: heuristic filters and
n-gram + embedding decontamination (row-local), MinHash (map -> shuffle -> reduce), exact and semantic
dedup and the budget (global, on the driver). Prints per stage its kind, seconds and microseconds per
row under each executor, the Ray/local ratio, whether both kept the same rows, peak RSS (this process
plus its children, which include a local Ray's workers) and a linear 1M-row projection from the
measured per-row costs (global stages grow faster than linearly; the projection says so).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
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

    def __enter__(self) -> "PeakRSS":
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


def stages(n_rows: int):
    from curation.decontam import DecontamStage
    from curation.dedup import ExactDedupStage, MinHashStage, SemanticDedupStage
    from curation.filters import FiltersStage
    from curation.mixing import BudgetConfig, BudgetStage
    from curation.recipe import (FILTER_NAMES, DecontamConfig, ExactDedupConfig, FiltersConfig, MinHashConfig,
                                 SemanticDedupConfig, TestSetConfig)

    tests = [TestSetConfig(name="gsm8k_test", path="shared:gsm8k/test.jsonl", fields=["question", "answer"]),
             TestSetConfig(name="ifeval", path="shared:ifeval/input_data.jsonl", fields=["prompt"])]
    budget = max(1, n_rows // 5)
    return [ExactDedupStage(ExactDedupConfig(enabled=True)), MinHashStage(MinHashConfig(enabled=True)),
            FiltersStage(FiltersConfig(enabled=list(FILTER_NAMES))),
            DecontamStage(DecontamConfig(model="m2v", include_heldout=False, test_sets=tests), None),
            SemanticDedupStage(SemanticDedupConfig(enabled=True, model="m2v")),
            BudgetStage(BudgetConfig(budget_rows=budget, targets={"pool": budget}, seed=0))]


def run(executor, frame) -> tuple[list[dict], list[int], float]:
    out = []
    t_all = time.perf_counter()
    for st in stages(len(frame)):
        t0 = time.perf_counter()
        res = executor.run(st, frame)
        sec = time.perf_counter() - t0
        out.append({"stage": st.name, "kind": st.kind, "rows": len(frame), "s": sec,
                    "us_per_row": 1e6 * sec / max(1, len(frame))})
        frame = res.kept.drop([c for c in res.kept.columns if c.startswith("__")])
    return out, frame["_row"].to_list(), time.perf_counter() - t_all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import ray

    from bench.curation import build_pool
    from curation.executors import LocalExecutor, RayExecutor
    from curation.frame import prepare
    from curation.sources import SourceConfig, load_source

    max_base = 0 if args.rows >= 100_000 else int(args.rows * 0.9)
    data, _ = build_pool(args.rows, args.seed, REPO / "artifacts" / "bench" / f"pool-{args.rows}-{max_base}.parquet",
                         max_base=max_base)
    from curation.sources import ColumnMapping

    src = SourceConfig(name="pool", kind="generic", path=str(data),
                       columns=ColumnMapping(messages="messages", meta=["bench_origin"]))
    frame = prepare(load_source(src).table)
    print(f"frame: {len(frame):,} rows", flush=True)

    with PeakRSS() as mem_local:
        local, kept_local, wall_local = run(LocalExecutor(), frame)
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        with PeakRSS() as mem_ray:
            ex = RayExecutor(workers=args.workers)
            dist, kept_ray, wall_ray = run(ex, frame)
    finally:
        ray.shutdown()

    print(f"\n| stage | kind | rows in | local s | local us/row | ray s | ray us/row | ray/local |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(local, dist):
        print(f"| {a['stage']} | {a['kind']} | {a['rows']:,} | {a['s']:.2f} | {a['us_per_row']:.1f} | {b['s']:.2f} | "
              f"{b['us_per_row']:.1f} | {b['s'] / max(a['s'], 1e-9):.2f} |")
    print(f"\ntotal: local {wall_local:.1f} s, ray ({args.workers} workers) {wall_ray:.1f} s, "
          f"ray/local = {wall_ray / wall_local:.2f}; same kept rows: {kept_local == kept_ray}")
    print(f"peak RSS (process + children): local {mem_local.peak:,.0f} MiB, ray {mem_ray.peak:,.0f} MiB")
    proj = sum(a["us_per_row"] for a in local)  # us per row x 1M rows = seconds
    print(f"1M-row projection (linear in the measured local per-row costs): {proj:,.0f} s on one process; "
          f"global stages ({', '.join(a['stage'] for a in local if a['kind'] != 'row')}) grow faster than "
          f"linearly and need the driver's memory for the whole frame")


if __name__ == "__main__":
    main()
