"""`tomelab review` (placeholder until the Argilla issue lands)."""

import argparse

from tomelab.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("review", help="human review in Argilla: push, pull, apply")
    p.set_defaults(func=not_built("review", "issue #7"))
