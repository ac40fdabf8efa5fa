"""The artefact home's layout in one place: a variant folder, a run folder and a results folder.

Every package reads these classes instead of joining path strings, so the layout in ARCHITECTURE.md
("On-disk layout") is decoded once:

    variants/<name>/{train,dropped}.parquet, stats.json, review/
    runs/<variant>/<base_key>/<seed>/{adapter/, config.json, metrics.json, train_log.jsonl, loss.png}
    evals/<run key>/<set>.jsonl
    <results>/{leaderboard.md, leaderboard.csv, winner.json, *.png}

Only file I/O lives here (no torch, no polars), so the core package stays light and any stage can use it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tomelab import paths
from tomelab.errors import TomelabError
from tomelab.io import read_json

RUN_CONFIG = "config.json"  # the resolved TrainConfig + lineage, written by training.train
ADAPTER_DIR = "adapter"
METRICS = "metrics.json"  # written last by training: its presence marks the run finished
TRAIN_LOG = "train_log.jsonl"
LOSS_PNG = "loss.png"
EXPORT_INFO = "tomelab_export.json"  # written by training.export into a merged folder
HOME_PREFIX = "home:"  # a results_dir value relative to the artefact home


def base_key(base: str) -> str:
    """The folder name of a base model inside a run path: the registry name, else a slug of the hub id/path."""
    from tomelab.models import find_spec

    spec = find_spec(base)
    if spec is not None:
        return spec.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(base).name or base).strip("-") or "base"


def evals_dir() -> Path:
    return paths.home() / "evals"


def home_relative(p: str | Path) -> str:
    """`p` relative to the artefact home (posix), so committed results resolve on another clone; else as given."""
    try:
        return Path(p).resolve().relative_to(paths.home().resolve()).as_posix()
    except ValueError:
        return str(p)


class _File:
    """A file or folder of an artefact folder: `Run(d).adapter` is `d / "adapter"`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type) -> Any:
        return self if obj is None else obj.dir / self.name


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """`variants/<name>/`: a curated variant (or an alias `<name>@half`, `<name>@<sweep>.<arm>`)."""

    name: str

    @property
    def dir(self) -> Path:
        return paths.variants_dir() / self.name

    train = _File("train.parquet")
    dropped = _File("dropped.parquet")
    stats_path = _File("stats.json")
    review_dir = _File("review")  # review state: pushed ids and pulled responses (curation.review)

    def stats(self) -> dict[str, Any]:
        return read_json(self.stats_path)

    def heldout_dir(self) -> Path | None:
        """The held-out folder recorded in stats.json (relative values are under the artefact home), or None."""
        if not self.stats_path.is_file():
            return None
        heldout = self.stats().get("heldout_dir")
        if not heldout:
            return None
        h = Path(heldout)
        if not h.is_absolute() and not h.is_dir():
            h = paths.home() / heldout
        return h

    @staticmethod
    def all(marker: str = "stats.json") -> list[Variant]:
        """Every variant folder holding `marker` (e.g. "train.parquet", "review/pushed.parquet"), by name."""
        d = paths.variants_dir()
        if not d.is_dir():
            return []
        depth = len(Path(marker).parts)
        return [Variant(p.parents[depth - 1].name) for p in sorted(d.glob(f"*/{marker}"))]


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Run:
    """`runs/<variant>/<base_key>/<seed>/`: one fine-tune (adapter, resolved config, metrics, log, loss plot)."""

    dir: Path

    @classmethod
    def of(cls, variant: str, base: str, seed: int) -> Run:
        return cls(paths.runs_dir() / variant / base_key(base) / str(seed))

    @classmethod
    def find(cls, ref: str | Path) -> Run | None:
        """The run `ref` points at (a run dir, its adapter folder, or `<variant>/<base>/<seed>` under runs/), else None."""
        candidates = [Path(ref).expanduser()]
        if not Path(ref).is_absolute():
            candidates.append(paths.runs_dir() / str(ref))
        for p in candidates:
            if (p / ADAPTER_DIR / "adapter_config.json").is_file():
                return cls(p.resolve())
            if (p / "adapter_config.json").is_file() and (p.parent / RUN_CONFIG).is_file():
                return cls(p.parent.resolve())
        return None

    @staticmethod
    def finished(runs_dir: Path | None = None) -> Iterator[Run]:
        """Every run under `runs_dir` (default: the home's) that holds metrics.json, in path order."""
        for m in sorted((runs_dir or paths.runs_dir()).glob(f"*/*/*/{METRICS}")):
            yield Run(m.parent)

    @property
    def variant(self) -> str:
        return self.dir.parent.parent.name

    @property
    def base_key(self) -> str:
        return self.dir.parent.name

    @property
    def seed(self) -> str:
        return self.dir.name

    adapter = _File(ADAPTER_DIR)
    config_path = _File(RUN_CONFIG)
    metrics_path = _File(METRICS)
    train_log = _File(TRAIN_LOG)
    loss_png = _File(LOSS_PNG)

    @property
    def is_finished(self) -> bool:
        return self.metrics_path.is_file()

    @property
    def key(self) -> str:
        """`<variant>/<base>/<seed>` under the home's runs/; a run elsewhere gets `path/<hash>-<name>`."""
        p = self.dir.resolve()
        try:
            return p.relative_to(paths.runs_dir().resolve()).as_posix()
        except ValueError:
            return "path/" + hashlib.sha256(str(p).encode()).hexdigest()[:12] + "-" + p.name

    @property
    def eval_dir(self) -> Path:
        return evals_dir() / self.key

    def config(self) -> dict[str, Any]:
        """config.json (the base model, variant, seed and resolved TrainConfig the run trained with)."""
        if not self.config_path.is_file():
            raise TomelabError(
                f"{self.dir} has an adapter but no {RUN_CONFIG}, so its base model is unknown. "
                f"Re-run `tomelab train` for this run, or load the base and adapter yourself."
            )
        return read_json(self.config_path)

    def metrics(self) -> dict[str, Any]:
        if not self.is_finished:
            raise TomelabError(f"run {self.dir} has no {METRICS}: training did not finish. Re-run `tomelab train` for it.")
        return read_json(self.metrics_path)


# --------------------------------------------------------------------------- results


def resolve_results_dir(value: str | Path) -> Path:
    """A config's `results_dir`: `home:x` is `<artefact home>/x`, anything else a path as given."""
    s = str(value)
    if s.startswith(HOME_PREFIX):
        return paths.home() / s[len(HOME_PREFIX):].lstrip("/")
    return Path(s)


@dataclass(frozen=True)
class Results:
    """A results folder written by `tomelab ablate`: leaderboard (md, csv), plots and winner.json."""

    dir: Path

    @classmethod
    def at(cls, value: str | Path) -> Results:
        return cls(resolve_results_dir(value))

    leaderboard_md = _File("leaderboard.md")
    leaderboard_csv = _File("leaderboard.csv")
    winner_path = _File("winner.json")

    @staticmethod
    def winner_system(winner: dict[str, Any]) -> str | None:
        """The leaderboard row (`system`) of a winner.json: the arm or recipe name, not the run's variant folder
        (`<recipe>.b<seed>`, `<variant>@<sweep>.<arm>`); files older than the `system` key fall back to `variant`."""
        s = winner.get("system") or winner.get("variant")
        return s if isinstance(s, str) and s else None
