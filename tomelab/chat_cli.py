"""`tomelab chat` (placeholder until the app issue lands)."""

import argparse

from tomelab.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="serve the Gradio chat app (winner vs base)")
    p.set_defaults(func=not_built("chat", "issue #8"))
