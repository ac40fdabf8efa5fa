"""`tomelab train` / `tomelab export` (placeholders until the training issue lands)."""

import argparse

from tomelab.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="LoRA/QLoRA fine-tune one variant with one seed")
    p.set_defaults(func=not_built("train", "issue #5"))
    p = sub.add_parser("export", help="merge a run's adapter into full safetensors")
    p.set_defaults(func=not_built("export", "issue #5"))
