"""The app's Lab view, read-only over the artefacts: why the winner won, before chatting with it.

Leaderboard (results folder: leaderboard.csv/md, plots, winner.json's rule), Data (each variant's
card and funnel), Rows (kept rows of `variants/<name>/train.parquet`, dropped rows of
`dropped.parquet` with stage, reason, detail), Side by side (two variants on one source) and
Review (the Argilla link). Nothing here is recomputed: every function reads files that curation
and `tomelab ablate` wrote. Parquet files are read once per (path, mtime).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import polars as pl

from tomelab.artifacts import Results, Variant
from tomelab.serving import argilla_url, display_path

PAGE = 25
BASE_ROW = "base (untouched)"  # eval.ablate's row for the untouched base model


@functools.lru_cache(maxsize=16)
def _parquet(path: str, mtime: float) -> pl.DataFrame:
    return pl.read_parquet(path)


def read_parquet(path: Path) -> pl.DataFrame | None:
    return _parquet(str(path), path.stat().st_mtime) if path.is_file() else None


# --------------------------------------------------------------------------- leaderboard


def leaderboard(results_dir: Path) -> pl.DataFrame | None:
    """leaderboard.csv with whatever columns it has (CIs, MDE, p-values...), numbers rounded for reading."""
    p = Results(results_dir).leaderboard_csv
    if not p.is_file():
        return None
    df = pl.read_csv(p, infer_schema_length=None, null_values=["", "nan", "NaN"])
    return df.with_columns(pl.col(c).round(4) for c, t in df.schema.items() if t.is_float())


def leaderboard_rows(results_dir: Path | None, system: str | None) -> list[dict[str, Any]]:
    """One system's rows of the long leaderboard (one row per system x metric)."""
    df = leaderboard(results_dir) if results_dir is not None and system else None
    if df is None or "system" not in df.columns:
        return []
    return df.filter(pl.col("system") == system).to_dicts()


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and v == v else "-"


def rows_markdown(rows: list[dict[str, Any]]) -> str:
    """One line per metric (fits a narrow panel): mean [95% CI], paired difference to the baseline
    [95% CI], the MDE when the ablation reports it, and the number of seeds."""
    out = []
    for r in rows:
        ci = f" [{_num(r.get('ci_lo'))}, {_num(r.get('ci_hi'))}]" if r.get("ci_lo") is not None else ""
        line = f"- `{r.get('metric')}` **{_num(r.get('mean'))}**{ci}"
        d = r.get("delta_vs_baseline")
        if d is not None:
            line += (f" · vs baseline {_num(d, '{:+.3f}')} [{_num(r.get('delta_lo'), '{:+.3f}')}, "
                     f"{_num(r.get('delta_hi'), '{:+.3f}')}]")
        if r.get("mde") is not None:
            line += f" · MDE {_num(r.get('mde'))}"
        out.append(line + f" · {r.get('n_seeds', '-')} seed(s)")
    return "\n".join(out)


def winner_markdown(results_dir: Path) -> str:
    """Which rule picked the winner, and the winner's own numbers, from winner.json (as written)."""
    from tomelab.serving import load_winner

    w = load_winner(results_dir)
    if not w.data:
        return f"**No winner:** {w.reason}"
    d = w.data
    lines = [f"**Winner:** `{d.get('variant')}` on `{d.get('base')}`, seed {d.get('seed')}"
             f" (ablation `{d.get('ablation_config', '?')}`, eval `{d.get('eval_config', '?')}`)",
             f"\n**Rule that picked it:** {d.get('rule', 'not recorded')}"]
    if not w.ok:
        lines.append(f"\n⚠️ {w.reason}")
    metrics = d.get("metrics")
    if isinstance(metrics, dict) and metrics:
        lines.append("\n**Served seed's metrics:** " + ", ".join(
            f"{k} {_num(v, '{:.4f}')}" for k, v in metrics.items() if isinstance(v, (int, float))))
    return "\n".join(lines)


def leaderboard_md(results_dir: Path) -> str:
    p = Results(results_dir).leaderboard_md
    if not p.is_file():
        return f"_No `{display_path(p)}`._"
    # its headings one level down, so they sit under the Lab's own
    return "\n".join("###" + line if line.startswith("#") else line for line in p.read_text(encoding="utf-8").splitlines())


def plots(results_dir: Path) -> list[tuple[str, str]]:
    """The results folder's PNG plots as (path, caption)."""
    return [(str(p), p.stem.replace("_", " ")) for p in sorted(results_dir.glob("*.png"))]


# --------------------------------------------------------------------------- data cards


def variants(results_dir: Path | None, cards: list[Path]) -> list[str]:
    """Variants with rows, a card or a leaderboard row (the base model's row excluded)."""
    names = {v.name for v in Variant.all("train.parquet")}
    for d in cards:
        names |= {p.stem for p in d.glob("*.md") if not p.stem.startswith("README")}
    df = leaderboard(results_dir) if results_dir is not None else None
    if df is not None and "system" in df.columns:
        names |= set(df["system"].unique().to_list())
    names.discard(BASE_ROW)
    lb = [] if df is None or "system" not in df.columns else [s for s in df["system"].unique(maintain_order=True) if s in names]
    return lb + sorted(names - set(lb))


def card(name: str | None, cards: list[Path]) -> tuple[str, str | None]:
    """(card body without front matter or image links, funnel PNG path) for a variant."""
    if not name:
        return "_Pick a variant._", None
    for d in cards:
        p = d / f"{name}.md"
        if p.is_file():
            lines = p.read_text(encoding="utf-8").splitlines()
            if lines and lines[0].strip() == "---":
                end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), 0)
                lines = lines[end + 1:]
            funnel = d / f"{name}_funnel.png"
            body = "\n".join("##" + line if line.startswith("#") else line  # headings under the view's own
                             for line in lines if not line.lstrip().startswith("!["))
            return body.strip(), str(funnel) if funnel.is_file() else None
    return f"_No data card `{name}.md` in {', '.join(f'`{display_path(d)}`' for d in cards) or 'data_cards/'}._", None


# --------------------------------------------------------------------------- rows


def _variant_file(name: str, file: str) -> Path:
    return Variant(name).dir / file


def _text_of(messages: Any, role: str, last: bool = False) -> str:
    msgs = [m for m in (messages or []) if m.get("role") == role]
    return (msgs[-1] if last else msgs[0])["content"] if msgs else ""


def _clip(s: str, n: int) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= n else s[: n - 1] + "…"


def kept_rows(name: str | None, search: str = "", source: str = "", page: int = 1) -> tuple[pl.DataFrame, str]:
    """A page of a variant's training rows: id, source, prompt, response (clipped), score columns."""
    df = read_parquet(_variant_file(name, "train.parquet")) if name else None
    if df is None:
        return _EMPTY_KEPT, _missing(name, "train.parquet")
    if source:
        df = df.filter(pl.col("source") == source)
    if search:
        text = pl.col("messages").list.eval(pl.element().struct.field("content")).list.join("\n")
        df = df.filter(text.str.contains("(?i)" + _escape(search)) | pl.col("id").str.contains(_escape(search)))
    total = df.height
    page_df = df.slice((max(1, int(page)) - 1) * PAGE, PAGE)
    scores = [c for c, t in page_df.schema.items() if t.is_numeric()]
    out = pl.DataFrame({
        "id": page_df["id"], "source": page_df["source"],
        "prompt": [_clip(_text_of(m, "user"), 160) for m in page_df["messages"].to_list()],
        "response": [_clip(_text_of(m, "assistant", last=True), 220) for m in page_df["messages"].to_list()],
        "turns": [len(m) for m in page_df["messages"].to_list()],
    }).hstack(page_df.select(pl.col(c).round(3) for c in scores)) if page_df.height else pl.DataFrame()
    return out, _page_note(total, page, "kept rows")


_EMPTY_KEPT = pl.DataFrame(schema={c: pl.String for c in ("id", "source", "prompt", "response")})
_EMPTY_DROPPED = pl.DataFrame(schema={c: pl.String for c in ("id", "source", "stage", "reason", "detail")})


def _missing(name: str | None, file: str) -> str:
    where = display_path(_variant_file(name or "?", file))
    return (f"_No rows: `{where}` is not on this machine (variants are artefacts, not committed). Build it with "
            f"`tomelab curate configs/variants/{name or 'NAME'}.toml`, or `make demo` for the demo variants._")


def _escape(s: str) -> str:
    import re

    return re.escape(s)


def _page_note(total: int, page: int, what: str) -> str:
    pages = max(1, -(-total // PAGE))
    return f"{total:,} {what} match; page {min(max(1, int(page)), pages)} of {pages} ({PAGE} a page). Click a row to read it."


def drop_reasons(name: str | None) -> list[str]:
    """`reason (stage): n` choices for the dropped-rows filter, most frequent first."""
    df = read_parquet(_variant_file(name, "dropped.parquet")) if name else None
    if df is None or df.height == 0:
        return []
    g = df.group_by("stage", "reason").len().sort("len", descending=True)
    return [f"{r} ({s}): {n}" for s, r, n in g.iter_rows()]


def dropped_rows(name: str | None, reason: str = "", search: str = "", page: int = 1) -> tuple[pl.DataFrame, str]:
    """A page of a variant's dropped rows with stage, reason and detail, filtered by reason and text."""
    df = read_parquet(_variant_file(name, "dropped.parquet")) if name else None
    if df is None:
        return _EMPTY_DROPPED, _missing(name, "dropped.parquet")
    if reason:
        r, _, stage = reason.partition(" (")
        df = df.filter(pl.col("reason") == r)
        if stage:
            df = df.filter(pl.col("stage") == stage.split(")")[0])
    if search:
        pat = "(?i)" + _escape(search)
        df = df.filter(pl.any_horizontal(pl.col(c).fill_null("").str.contains(pat) for c in ("id", "source", "stage", "reason", "detail")))
    total = df.height
    out = df.select("id", "source", "stage", "reason", "detail").slice((max(1, int(page)) - 1) * PAGE, PAGE)
    return out, _page_note(total, page, "dropped rows")


def row_markdown(name: str | None, row_id: str | None) -> str:
    """The whole conversation of a kept row, or what dropped.parquet recorded about a dropped one."""
    if not name or not row_id:
        return ""
    df = read_parquet(_variant_file(name, "train.parquet"))
    hit = df.filter(pl.col("id") == row_id) if df is not None else None
    if hit is not None and hit.height:
        r = hit.row(0, named=True)
        scores = {k: v for k, v in r.items() if isinstance(v, (int, float)) and k not in ("id",)}
        head = f"**`{row_id}`** · source `{r['source']}` · kept in `{name}`"
        if scores:
            head += " · " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
        turns = [f"**{m['role']}:**\n\n{m['content']}" for m in r["messages"]]
        return head + "\n\n" + "\n\n---\n\n".join(turns)
    d = read_parquet(_variant_file(name, "dropped.parquet"))
    hit = d.filter(pl.col("id") == row_id) if d is not None else None
    if hit is not None and hit.height:
        r = hit.row(0, named=True)
        return (f"**`{row_id}`** · source `{r['source']}` · dropped from `{name}` at stage `{r['stage']}`, "
                f"reason `{r['reason']}`\n\n> {r['detail']}\n\n_dropped.parquet records why, not the text._")
    return f"_`{row_id}` is in neither train.parquet nor dropped.parquet of `{name}`._"


def sources(names: list[str]) -> list[str]:
    out: set[str] = set()
    for n in names:
        df = read_parquet(_variant_file(n, "train.parquet")) if n else None
        if df is not None:
            out |= set(df["source"].unique().to_list())
    return sorted(out)


def fate(name: str, ids: list[str]) -> list[str]:
    """What `name` did with each row id: kept, dropped at stage (reason), or never in its pool."""
    train = read_parquet(_variant_file(name, "train.parquet"))
    dropped = read_parquet(_variant_file(name, "dropped.parquet"))
    kept = set(train["id"].to_list()) if train is not None else set()
    why: dict[str, str] = {}
    if dropped is not None:
        for i, s, r in dropped.filter(pl.col("id").is_in(ids)).select("id", "stage", "reason").iter_rows():
            why[i] = f"dropped: {s} ({r})"
    return ["kept" if i in kept else why.get(i, "not in its pool") for i in ids]


def side_by_side(a: str | None, b: str | None, source: str = "", n: int = PAGE) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """Each variant's rows from one source, with what the other variant did with the same row."""
    frames: list[pl.DataFrame] = []
    counts: dict[str, set] = {}
    missing: list[str] = []
    for this, other in ((a, b), (b, a)):
        df = read_parquet(_variant_file(this, "train.parquet")) if this else None
        if df is None:
            frames.append(pl.DataFrame(schema={c: pl.String for c in (f"in {other}", "prompt", "response", "id")}))
            missing.append(this or "?")
            continue
        if source:
            df = df.filter(pl.col("source") == source)
        counts[this] = set(df["id"].to_list())
        head = df.head(n)
        ids = head["id"].to_list()
        frames.append(pl.DataFrame({  # the other variant's verdict first: it is the point of the view
            f"in {other}": fate(other, ids) if other else ["-"] * len(ids),
            "prompt": [_clip(_text_of(m, "user"), 70) for m in head["messages"].to_list()],
            "response": [_clip(_text_of(m, "assistant", last=True), 90) for m in head["messages"].to_list()],
            "id": ids,
        }))
    note = ""
    if a and b and a in counts and b in counts:
        both = len(counts[a] & counts[b])
        note = (f"Source `{source or 'all'}`: `{a}` keeps {len(counts[a]):,} rows, `{b}` keeps {len(counts[b]):,}; "
                f"{both:,} rows are in both. Each table's last column says what the other variant did with that row.")
    if missing:
        note = " ".join(_missing(m, "train.parquet") for m in missing)
    return frames[0], frames[1], note


# --------------------------------------------------------------------------- review


def review_markdown(name: str | None = None, timeout_s: float = 1.5) -> str:
    """A link to the Argilla UI when the server answers (ARGILLA_API_URL, default 127.0.0.1:6900)."""
    import httpx

    url = argilla_url()
    try:
        r = httpx.get(f"{url}/api/v1/status", timeout=timeout_s, follow_redirects=True)
        up = r.status_code < 500
    except httpx.HTTPError as e:
        return (f"Argilla at {url} does not answer ({type(e).__name__}). Start it with `scripts/argilla.sh start` "
                f"(or set ARGILLA_API_URL), then push rows with `tomelab review push VARIANT`.")
    if not up:
        return f"Argilla at {url} answered HTTP {r.status_code}: not usable now."
    pushed = [v.name for v in Variant.all("review/pushed.parquet")]
    lines = [f"Argilla is up: **[open the review UI]({url})** ({url})."]
    for v in pushed:
        df = read_parquet(Variant(v).review_dir / "pushed.parquet")
        ds = df["dataset"][0] if df is not None and "dataset" in df.columns and df.height else f"?-{v}"
        lines.append(f"- `{v}`: {df.height if df is not None else 0} rows pushed to dataset **`{ds}`** "
                     f"([datasets]({url}/datasets))")
    if not pushed:
        lines.append("No variant has been pushed for review yet: `tomelab review push VARIANT`.")
    return "\n".join(lines)


def json_block(obj: Any) -> str:
    return "```json\n" + json.dumps(obj, indent=2, default=str) + "\n```"
