"""Where the training memory goes: peak RSS and tok/s of one tomelab run per micro-batching setting.

    CAP=512 .venv/bin/python bench/train_memory.py 8     # optimiser batch 8, micro-batches capped at 512 tokens
    CAP=0   .venv/bin/python bench/train_memory.py 4     # fixed micro-batch 4 x accumulation 2, no cap

The same 64 Alpaca rows, max_length 512 and recipe as `bench/training.py`'s tomelab side, in this process.
A thread samples the resident set every 10 ms and notes which micro-batch shape was running when the peak
was reached, so the peak can be traced to a batch shape. Prints wall seconds, ru_maxrss (MB), the phase of
the peak and the RSS after each phase; tok/s is in the run's metrics.json under $TOMELAB_HOME/runs/.
This is the harness behind the README's micro-batching table (one setting per process, idle machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HOME = Path(os.environ.get("TOMELAB_HOME") or tempfile.mkdtemp(prefix="tomelab-trainmem-"))
os.environ["TOMELAB_HOME"] = str(HOME)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    micro = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    cap = int(os.environ.get("CAP", "0"))
    peak: dict = {"v": 0.0, "phase": "import", "at": None}
    phases: list[tuple[str, int, int]] = []

    def sample() -> None:
        while True:
            r = _rss_mb()
            if r > peak["v"]:
                peak["v"], peak["at"] = r, peak["phase"]
            time.sleep(0.01)

    def mark(phase: str) -> None:
        phases.append((phase, round(_rss_mb()), round(peak["v"])))
        peak["phase"] = phase

    threading.Thread(target=sample, daemon=True).start()
    from training import train as T
    from training.config import load_train_config

    spec = importlib.util.spec_from_file_location("bench_training", REPO / "bench" / "training.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)  # type: ignore[union-attr]
    tokens = bt._prepare(argparse.Namespace(rows=64, val_rows=32, base="smollm2-135m-instruct", max_length=512), HOME)
    cfg = replace(load_train_config(None), token_budget=tokens, epochs_cap=1.0, max_length=512, batch_size=micro,
                  grad_accum=8 // micro, eval_every=0, save_every=0, micro_batch_tokens=cap)
    mark("prepared")
    collate = T.collate

    def marked_collate(examples, pad):  # note the shape of each micro-batch as it starts
        b = collate(examples, pad)
        mark(f"micro-batch {tuple(b['input_ids'].shape)}")
        return b

    T.collate = marked_collate
    t0 = time.time()
    run = T.train_run("bench-alpaca", "smollm2-135m-instruct", 0, cfg, force=True)
    mark("done")
    print(f"micro-batch {micro} x accum {8 // micro}, cap {cap}: wall {time.time() - t0:.1f}s, "
          f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB, peak during {peak['at']}; "
          f"metrics: {run / 'metrics.json'}")
    for p in phases:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
