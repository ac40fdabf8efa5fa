"""What the app can serve: results folders, their winners, and the runs those winners name.

A results folder (`results/`, `results/demo/`, `<home>/results/...`) holds `winner.json`,
`leaderboard.{md,csv}` and plots written by `tomelab ablate`. `winner.json` names its run relative
to the artefact home (`runs/<variant>/<base>/<seed>`); old files hold an absolute path from the
machine that trained it. `load_winner` never raises: a missing, malformed or unresolvable winner
comes back with the true reason and the command that rebuilds it, so the app can say why it
serves the base model instead.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tomelab import paths
from tomelab.artifacts import HOME_PREFIX, Results, Run, resolve_results_dir  # noqa: F401  (re-exported)
from tomelab.errors import TomelabError
from tomelab.io import read_json


def ablation_results_dir(config: str | Path) -> Path:
    """The results folder an ablation config writes to (its `results_dir`, default `results`)."""
    p = Path(config)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TomelabError(f"{p}: cannot read the ablation config ({e}).") from None
    return resolve_results_dir(data.get("results_dir", "results"))


def display_path(p: Path | str) -> str:
    """`p` relative to the working directory when it is under it (shorter and machine-independent)."""
    p = Path(p)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(p)


@dataclass
class Winner:
    """One results folder's winner.json, resolved on this machine (or the reason it is not)."""

    results_dir: Path
    data: dict = field(default_factory=dict)
    run: Path | None = None  # what to load (merged export or run dir), None when not servable here
    reason: str | None = None  # why it cannot be served; None when it can
    mtime: float = 0.0

    @property
    def ok(self) -> bool:
        return self.run is not None

    @property
    def file(self) -> Path:
        return Results(self.results_dir).winner_path

    @property
    def system(self) -> str | None:
        """Its leaderboard row: the arm or recipe name (sweeps and blocked ablations), not the run's folder."""
        return Results.winner_system(self.data)

    @property
    def ablation(self) -> str:
        """The ablation that picked it: its config's stem, else the results folder's name."""
        cfg = self.data.get("ablation_config")
        return Path(cfg).stem if isinstance(cfg, str) and cfg else self.results_dir.name

    @property
    def rebuild(self) -> str:
        cfg = self.data.get("ablation_config")
        return f"tomelab ablate {cfg}" if isinstance(cfg, str) and cfg else "tomelab ablate <the ablation config>"

    @property
    def label(self) -> str:
        d = self.data
        return f"winner of {self.ablation}: {d.get('variant')} / {d.get('base')} / seed {d.get('seed')}"


def _servable(p: Path) -> bool:
    """A run dir with its adapter (or config), or a merged export / model folder."""
    return p.is_dir() and any((p / n).exists() for n in ("adapter", "config.json", "model.safetensors"))


def locate(value: str, home: Path | None = None) -> tuple[Path | None, list[Path]]:
    """Where a recorded run or model path is on this machine, and every place that was tried.

    Relative values are under the artefact home; absolute ones are tried as they are, then (another
    machine's checkout) the part after `/runs/` under this home's runs/."""
    home = home or paths.home()
    p = Path(value)
    tried = [p] if p.is_absolute() else [home / p]
    if p.is_absolute():
        posix = p.as_posix()
        if "/runs/" in posix:
            tried.append(home / "runs" / posix.rsplit("/runs/", 1)[1])
    tried = list(dict.fromkeys(tried))
    for t in tried:
        if _servable(t):
            return t, tried
    return None, tried


def load_winner(results_dir: str | Path) -> Winner:
    """`results_dir/winner.json` resolved on this machine; problems become `reason`, never exceptions."""
    rd = Path(results_dir)
    w = Winner(rd)
    f = w.file
    shown = display_path(f)
    if not f.is_file():
        w.reason = (f"`{shown}` does not exist: that results folder has no winner yet. "
                    f"Run the ablation that writes it (`make demo`, or `tomelab ablate CONFIG`).")
        return w
    w.mtime = f.stat().st_mtime
    try:
        data: Any = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        w.reason = f"`{shown}` is not valid JSON ({e}). Rewrite it with `tomelab ablate CONFIG`."
        return w
    if not isinstance(data, dict):
        w.reason = (f"`{shown}` holds a JSON {type(data).__name__}, not an object with variant, base and run_dir. "
                    f"Rewrite it with `tomelab ablate CONFIG`.")
        return w
    w.data = data
    bad = [k for k in ("variant", "base", "run_dir") if not isinstance(data.get(k), str) or not data.get(k)]
    if bad:
        what = ", ".join(f"`{k}` ({'missing' if k not in data else json.dumps(data[k])})" for k in bad)
        w.reason = f"`{shown}` has no usable {what}. Rewrite it with `{w.rebuild}`."
        return w
    for key in ("model_dir", "run_dir"):  # a merged export first: it loads without merging
        value = data.get(key)
        if isinstance(value, str) and value:
            found, tried = locate(value)
            if found is not None:
                w.run = found
                return w
    _, tried = locate(data["run_dir"])
    w.reason = (f"`{shown}` names run `{data['run_dir']}`, which is not on this machine (looked in "
                + ", ".join(f"`{display_path(t)}`" for t in tried) + f"). Rebuild it with `{w.rebuild}`.")
    return w


def default_roots(results: str | Path = "results") -> list[Path]:
    """Where to look for results folders: the repo's results/ and the artefact home's results/."""
    roots = [Path(results), paths.home() / "results"]
    out: list[Path] = []
    for r in roots:
        if r.is_dir() and all(r.resolve() != o.resolve() for o in out):
            out.append(r)
    return out


def find_results_dirs(roots: list[Path]) -> list[Path]:
    """Every folder under `roots` with a winner.json or leaderboard.csv, newest winner first."""
    seen: dict[Path, Path] = {}
    for root in roots:
        for name in ("winner.json", "leaderboard.csv"):
            for f in sorted(root.rglob(name)):
                if "runs" in f.relative_to(root).parts[:-1]:
                    continue  # run folders are not results folders
                seen.setdefault(f.parent.resolve(), f.parent)

    def key(d: Path) -> tuple[float, str]:
        w = d / "winner.json"
        return (-(w.stat().st_mtime if w.is_file() else 0.0), str(d))

    return sorted(seen.values(), key=key)


def discover_winners(roots: list[Path]) -> list[Winner]:
    """Every winner.json under `roots`, resolved, newest first (a fresh clone: by path)."""
    return [load_winner(d) for d in find_results_dirs(roots) if Results(d).winner_path.is_file()]


@dataclass
class ModelEntry:
    """One model the picker offers: a display key, what to load, and what to show about it."""

    key: str
    ref: str
    kind: str  # winner | run | base
    variant: str | None = None
    base: str | None = None
    seed: Any = None
    metrics: dict = field(default_factory=dict)
    results_dir: Path | None = None  # the leaderboard this model has a row in
    winner: Winner | None = None
    system: str | None = None  # its row in that leaderboard (None: look it up by `variant`)

    @property
    def leaderboard_system(self) -> str | None:
        return self.system or self.variant


def finished_runs(runs_dir: Path) -> list[ModelEntry]:
    """Run dirs `<variant>/<base>/<seed>/` that hold metrics.json (training + eval finished)."""
    out = []
    for run in Run.finished(runs_dir):
        try:
            metrics = read_json(run.metrics_path)
        except (OSError, ValueError):
            continue
        variant, base, seed = run.variant, run.base_key, run.seed
        out.append(ModelEntry(f"run: {variant} / {base} / seed {seed}", str(run.dir), "run", variant, base, seed,
                              metrics if isinstance(metrics, dict) else {}))
    return out


def model_entries(winners: list[Winner], default_base: str, runs_dir: Path | None = None) -> list[ModelEntry]:
    """The picker's list: servable winners (newest first), the base model(s), then every other finished run."""
    entries: list[ModelEntry] = []
    used: set[Path] = set()
    for w in winners:
        if not w.ok or w.run is None or w.run.resolve() in used:
            continue
        used.add(w.run.resolve())
        d = w.data
        entries.append(ModelEntry(w.label, str(w.run), "winner", d["variant"], d["base"], d.get("seed"),
                                  d.get("metrics") if isinstance(d.get("metrics"), dict) else {}, w.results_dir, w,
                                  system=w.system))
    first = next((w for w in winners if w.ok), None)
    bases = [first.data["base"]] if first else []
    bases += [b for b in [default_base] if b not in bases]
    lb = first.results_dir if first else next((w.results_dir for w in winners), None)
    entries += [ModelEntry(f"base: {b}", b, "base", None, b, results_dir=lb) for b in bases]
    for e in finished_runs(runs_dir or paths.runs_dir()):
        if Path(e.ref).resolve() not in used:
            entries.append(e)
    return entries


def banner(winners: list[Winner], served: ModelEntry, explicit: Path | None) -> str:
    """The banner's markdown: what is served, and the true reason when it is the base model."""
    if served.kind == "winner" and served.winner is not None:
        w = served.winner
        out = (f"### Serving the winner of `{w.ablation}`: `{w.data['variant']}` on `{w.data['base']}` "
               f"(seed {w.data.get('seed')})\nFrom `{display_path(w.file)}`. Chosen by: {w.data.get('rule', 'n/a')}")
        others = [x for x in winners if not x.ok]
        if others and explicit is None:
            out += f"\n\n{len(others)} other winner(s) cannot be served here: see the Lab tab."
        return out
    head = f"### ⚠️ Serving the base model `{served.ref}`, not a fine-tuned winner\n"
    if explicit is not None:
        w = next((x for x in winners if x.results_dir == explicit), None) or load_winner(explicit)
        return head + (w.reason or "")
    if not winners:
        return head + ("No `winner.json` under " + " or ".join(f"`{display_path(r)}`" for r in default_roots())
                       + ". Run `make demo` (or `tomelab ablate CONFIG`) to train and pick one.")
    first, rest = winners[0], winners[1:]
    out = head + f"Newest winner: {first.reason}"
    if rest:
        out += (f"\n\n<details><summary>{len(rest)} other winner(s) cannot be served either</summary>\n\n"
                + "\n".join(f"- {w.reason}" for w in rest) + "\n</details>")
    return out


def cards_dirs(configured: str | Path) -> list[Path]:
    """Where data cards may be: the configured folder, then the one beside the artefact home."""
    out: list[Path] = []
    for d in (Path(configured), paths.home().parent / "data_cards", paths.home() / "data_cards"):
        if d.is_dir() and all(d.resolve() != o.resolve() for o in out):
            out.append(d)
    return out


def argilla_url() -> str:
    return (os.environ.get("ARGILLA_API_URL") or "http://127.0.0.1:6900").rstrip("/")


def serve_command(ablation_config: str | Path, python: str = ".venv/bin/python") -> str:
    """The exact command that serves an ablation's winner (what `make demo` prints last)."""
    import shlex

    return f"{python} app.py --results {shlex.quote(display_path(ablation_results_dir(ablation_config)))}"


if __name__ == "__main__":  # `python -m tomelab.serving CONFIG`: the results folder, then the serving command
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tomelab.serving ABLATION_CONFIG")
    try:
        print(display_path(ablation_results_dir(sys.argv[1])))
        print(serve_command(sys.argv[1]))
    except TomelabError as e:
        print(f"tomelab.serving: error: {e}", file=sys.stderr)
        sys.exit(2)
