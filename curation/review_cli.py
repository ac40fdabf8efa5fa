"""`tomelab review server|push|pull|apply`: human review of a variant in Argilla."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "argilla.sh"


# Help of the ReviewConfig fields that are flags. Types, choices and defaults come from ReviewConfig itself
# (tomelab.cli_flags); this text can move into its fields' metadata (`option(...)`) with the review package.
FLAG_HELP = {
    "workspace": "Argilla workspace (default: the user's first)",
    "timeout_s": "server check timeout in seconds",
    "n": "how many rows",
    "strategy": "which rows: random, lowest score, near-duplicate pairs, or where the scores disagree",
    "seed": "random seed of the row selection (push) or the propagation holdout (apply)",
    "embed_model": "embedding model for similarity search and label propagation",
    "extend_k": "extend labels to unlabelled rows by k nearest labelled neighbours (0 = off)",
    "extend_min_similarity": "cosine similarity a neighbour needs to vote",
    "holdout_share": "share of labelled rows held out to measure propagation agreement",
}


def _config(args: argparse.Namespace):
    from curation.review.config import ReviewConfig, load_review_config
    from tomelab.cli_flags import dataclass_overrides

    cfg = load_review_config(args.config)
    try:
        return dataclasses.replace(cfg, **dataclass_overrides(args, ReviewConfig))
    except ValueError as e:  # ReviewConfig.__post_init__
        from tomelab.errors import ConfigError

        raise ConfigError(f"bad review option: {e}") from None


def _print(st) -> int:
    print(json.dumps(st.to_dict(), indent=2, default=str))
    return 0


def _server(args: argparse.Namespace) -> int:
    return subprocess.call(["bash", str(SCRIPT), args.action])


def _push(args: argparse.Namespace) -> int:
    from curation.review.push import push

    return _print(push(args.variant, _config(args)))


def _pull(args: argparse.Namespace) -> int:
    from curation.review.data import pushed_variants
    from curation.review.pull import pull
    from tomelab.errors import TomelabError

    names = [args.variant] if args.variant else pushed_variants()
    if not names:
        raise TomelabError("no variant has been pushed yet: run `tomelab review push --variant NAME` first.")
    cfg = _config(args)
    for name in names:
        _print(pull(name, cfg))
    return 0


def _apply(args: argparse.Namespace) -> int:
    from curation.review.apply import apply_review

    return _print(apply_review(args.variant, _config(args), cards_dir=args.cards_dir, force=args.force))


def register(sub: argparse._SubParsersAction) -> None:
    from curation.review.config import ReviewConfig  # light: the package's __init__ imports nothing
    from tomelab.cli_flags import add_dataclass_args

    def flags(q: argparse.ArgumentParser, *names: str) -> None:
        add_dataclass_args(q, ReviewConfig, only=names, help_texts=FLAG_HELP)

    p = sub.add_parser(
        "review",
        help="human review in Argilla: server, push, pull, apply",
        description="Server: ARGILLA_API_URL + ARGILLA_API_KEY, else the local one from scripts/argilla.sh.",
    )
    rsub = p.add_subparsers(dest="review_command", metavar="ACTION", required=True)

    s = rsub.add_parser("server", help="start|stop|status the local Argilla (scripts/argilla.sh)")
    s.add_argument("action", choices=["start", "stop", "restart", "status", "env"])
    s.set_defaults(func=_server)

    def common(q: argparse.ArgumentParser, variant_required: bool = True) -> None:
        q.add_argument("--variant", required=variant_required, help="variant name under artifacts/variants/")
        q.add_argument("--config", type=Path, help="TOML with a [review] table (flags override it)")
        flags(q, "workspace", "timeout_s")

    q = rsub.add_parser("push", help="send rows of a variant to Argilla for labelling")
    common(q)
    flags(q, "n", "strategy", "seed", "embed_model")
    q.set_defaults(func=_push)

    q = rsub.add_parser("pull", help="store every submitted response under the variant (default: every pushed variant)")
    common(q, variant_required=False)
    q.set_defaults(func=_pull)

    q = rsub.add_parser("apply", help="write variant NAME-reviewed from the pulled labels (offline)")
    common(q)
    flags(q, "extend_k", "extend_min_similarity", "holdout_share", "seed", "embed_model")
    q.add_argument("--cards-dir", dest="cards_dir", type=Path, help="where the data card goes (default data_cards/)")
    q.add_argument("--force", action="store_true", help="rebuild even if up to date")
    q.set_defaults(func=_apply)
