"""`tomelab`: one CLI with a subcommand per stage.

Each stage's package owns its subcommands in a small `cli.py` exposing `register(subparsers)`;
this module only wires them together, handles logging, and turns user errors (TomelabError)
into one clear line with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from tomelab import __version__
from tomelab.errors import TomelabError

# Modules that contribute subcommands, in the order `tomelab --help` lists them.
COMMAND_MODULES = (
    "tomelab.commands",  # models, sources
    "curation.cli",  # curate
    "training.cli",  # train, export
    "eval.cli",  # eval, ablate
    "curation.review_cli",  # review
    "tomelab.chat_cli",  # chat
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tomelab",
        description="Data-centric fine-tuning lab: curate -> train -> eval/ablate -> review -> chat.",
    )
    parser.add_argument("--version", action="version", version=f"tomelab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc = args.func(args)
    except TomelabError as e:
        print(f"tomelab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tomelab {args.command}: interrupted; finished outputs are kept and a re-run resumes.", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"tomelab {args.command}: out of memory. Lower batch_size or max_length in the config.", file=sys.stderr)
        return 3
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
