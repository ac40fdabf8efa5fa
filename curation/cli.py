"""`tomelab curate` (placeholder until the curation issue lands)."""

import argparse

from tomelab.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curate", help="build a dataset variant from a recipe TOML")
    p.add_argument("recipe", help="configs/variants/NAME.toml")
    p.set_defaults(func=not_built("curate", "issue #4"))
