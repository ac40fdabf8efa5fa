"""`tomelab eval` / `tomelab ablate` (placeholders until the evaluation issue lands)."""

import argparse

from tomelab.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run on the held-out sets")
    p.set_defaults(func=not_built("eval", "issue #6"))
    p = sub.add_parser("ablate", help="curate, train and evaluate every variant x seed")
    p.set_defaults(func=not_built("ablate", "issue #6"))
