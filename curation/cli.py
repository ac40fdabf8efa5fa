"""`tomelab curate configs/variants/NAME.toml [--force] [--executor local|ray]`: build one dataset variant from a recipe."""

from __future__ import annotations

import argparse


def _curate(args: argparse.Namespace) -> int:
    from curation.pipeline import curate

    for recipe in args.recipe:
        overrides = {"executor": args.executor} if args.executor else None
        out = curate(recipe, force=args.force, progress=not args.quiet, overrides=overrides)
        print(f"variant written to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="build dataset variant(s) from recipe TOML(s)")
    p.add_argument("recipe", nargs="+", help="configs/variants/NAME.toml (several build in order)")
    p.add_argument("--force", action="store_true", help="recompute every stage instead of resuming")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where the stages run, overriding the recipe's `executor` (ray: its `address`, "
                        "else $RAY_ADDRESS, else a local Ray on this machine's cores)")
    p.set_defaults(func=_curate)
