"""`tomelab eval RUN` and `tomelab ablate CONFIG`."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_EVAL_CONFIG = "configs/eval/default.toml"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run (or a base model) on held-out, IFEval and GSM8K")
    p.add_argument("run", help="run dir artifacts/runs/<variant>/<base>/<seed>, or a base model name")
    p.add_argument("--config", default=DEFAULT_EVAL_CONFIG, help="eval TOML (default: %(default)s)")
    p.add_argument("--heldout-dir", default=None,
                   help="held-out set folder (default: the one in the run's variant stats.json)")
    p.add_argument("--force", action="store_true", help="recompute even when cached outputs match")
    p.add_argument("--assist", action="store_true",
                   help="second worker for a running `tomelab eval` of the same model and config (engine = llama.cpp): "
                        "generates its pending items from the other end; the main process scores them")
    p.set_defaults(func=_eval)

    p = sub.add_parser("ablate", help="curate, train and evaluate every variant x seed; leaderboard and winner")
    p.add_argument("config", help="ablation TOML, e.g. configs/ablation.toml")
    p.add_argument("--reverse", action="store_true",
                   help="walk the runs last to first: start a second process with it to share the runs over two cores")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where the training and evaluation jobs run, overriding the config's `executor` (ray: one Ray "
                        "task per job, on --address / the config's `address` / $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--address", default=None,
                   help="Ray cluster for --executor ray: \"auto\", \"ray://HOST:PORT\" or \"HOST:PORT\" (default: the config's)")
    p.set_defaults(func=_ablate)


def _heldout_for(run: str) -> Path | None:
    """The held-out dir recorded by the run's variant (run dir -> its variant's stats.json); for a base
    model, the one held-out dir every curated variant shares (None when they differ)."""
    from tomelab.artifacts import Run, Variant

    rd = Path(run)
    if not rd.is_dir():
        dirs = {v.heldout_dir() for v in Variant.all()} - {None}
        return dirs.pop() if len(dirs) == 1 else None
    return Variant(Run(rd.resolve()).variant).heldout_dir()


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from eval.config import EvalConfig
    from eval.evaluate import evals_dir, evaluate, run_key
    from tomelab.config import load_config
    from tomelab.errors import TomelabError

    cfg = load_config(args.config, EvalConfig)
    if args.assist:
        from eval.evaluate import assist_generation

        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        n = assist_generation(args.run, cfg)
        print(f"assist: {n} items answered (by both workers); the main `tomelab eval` process scores them")
        return 0
    rd = Path(args.run)
    if ("/" in args.run or rd.exists()) and not rd.is_dir() and args.run.count("/") != 1:
        raise TomelabError(f"run {args.run} does not exist. List runs with `ls artifacts/runs/*/*/`.")
    heldout = Path(args.heldout_dir) if args.heldout_dir else _heldout_for(args.run)
    if "heldout" in cfg.enabled_sets() and heldout is None:
        raise TomelabError("no held-out set known for this run: pass --heldout-dir artifacts/heldout/<key> "
                           "or curate a variant first (`tomelab curate configs/variants/random.toml`).")
    res = evaluate(args.run, cfg, heldout_dir=heldout, force=args.force)
    t = Table(title=f"eval {res['run_key']} ({args.config})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in res["metrics"].items():
        t.add_row(k, "n/a" if v is None else f"{v:.4f}")
    Console().print(t)
    print(f"per-item outputs: {evals_dir() / run_key(args.run)}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    from eval.ablate import run_ablation

    out = run_ablation(args.config, reverse=args.reverse, executor=args.executor, address=args.address)
    print(f"leaderboard: {out / 'leaderboard.md'}\nwinner: {out / 'winner.json'}")
    return 0
