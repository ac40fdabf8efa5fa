"""HF-style data card (YAML front matter + markdown) and a funnel PNG for each variant.

The card is the committed record of a variant: lineage (sources, their content fingerprints,
the config hash), the funnel per stage and per drop reason, the source mix, token-length
statistics and the rows each test set removed in decontamination. A reviewed variant
(`tomelab review apply`) gets a shorter card: what each human decision changed (`review_card`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from curation.recipe import Recipe
from tomelab.io import pyplot, save_figure, write_text

if TYPE_CHECKING:
    from curation.review.config import ReviewConfig
    from tomelab.stats import StageStats

LICENSES = {"sharegpt": "other (ShareGPT terms)", "alpaca": "cc-by-nc-4.0", "gsm8k": "mit",
            "self_instruct": "apache-2.0", "finetome": "mit"}


def display_path(path: str) -> str:
    """A committed card should not show this machine's absolute paths: shorten the known roots."""
    from tomelab import paths

    for root, label in ((paths.shared_data_dir(), "../shared/data"), (paths.home(), "artifacts")):
        try:
            return f"{label}/{Path(path).resolve().relative_to(root)}"
        except ValueError:
            pass
    if "site-packages/" in path:
        return "site-packages/" + path.split("site-packages/", 1)[1]
    return path


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M"


def funnel_png(stats: dict[str, Any], path: Path) -> None:
    """Horizontal bars: rows remaining after each stage."""
    plt = pyplot()
    stages = [s for s in stats["stages"] if not s["stage"].startswith("load:")]
    loaded = sum(s["kept"] for s in stats["stages"] if s["stage"].startswith("load:"))
    labels = ["loaded"] + [s["stage"] for s in stages]
    values = [loaded] + [s["kept"] for s in stages]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color="#4C72B0")
    for b, v in zip(bars, values[::-1]):
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:,}", va="center", fontsize=8)
    ax.set_xlabel("rows remaining")
    ax.set_title(f"curation funnel: {stats['variant']}")
    ax.set_xlim(0, max(values) * 1.18 if values and max(values) else 1)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _length_table(train: pl.DataFrame) -> str:
    lines = ["| column | mean | p50 | p90 | max |", "|---|---|---|---|---|"]
    for col in ("prompt_tokens", "response_tokens"):
        if col in train.columns and len(train):
            s = train[col].cast(pl.Float64)
            lines.append(f"| {col} | {s.mean():.0f} | {s.quantile(0.5):.0f} | {s.quantile(0.9):.0f} | {s.max():.0f} |")
    return "\n".join(lines)


def render_card(recipe: Recipe, stats: dict[str, Any], train: pl.DataFrame, png_name: str) -> str:
    n = stats["rows"]
    srcs = stats["sources"]
    licenses = sorted({LICENSES.get(s, "other") for s in stats["mix"]})
    fm = ["---", f"pretty_name: tomelab variant {recipe.name}", "language:", "- en",
          "license: other" if len(licenses) != 1 else f"license: {licenses[0]}",
          "task_categories:", "- text-generation", "size_categories:", f"- {_size_category(n)}",
          "source_datasets:"] + [f"- {s}" for s in srcs] + [
          f"config_hash: {stats['config_hash']}", f"heldout: {Path(stats['heldout_dir']).name}", "---", ""]
    by_tokens = stats.get("budget_unit") == "tokens"
    budget = (f"token budget {stats['budget_tokens']:,}, at most {stats['budget_rows']:,} rows" if by_tokens
              else f"budget {stats['budget_rows']:,}")
    out = fm + [f"# Dataset card: `{recipe.name}`", "", recipe.description or "", "",
                f"{n:,} training rows ({budget}), built by "
                f"`tomelab curate {stats['recipe_file']}` in {stats['seconds']:.0f} s (stages marked \"checkpoint\" were "
                f"reused from an earlier run; their seconds are from that run).", ""]
    if stats["warnings"]:
        out += ["**Warnings**", ""] + [f"- {w}" for w in stats["warnings"]] + [""]
    out += ["## Lineage", "", "| source | origin | content fingerprint | rows loaded |", "|---|---|---|---|"]
    out += [f"| {s} | `{display_path(v['origin'])}` | `{v['fingerprint']}` | {v['rows']:,} |" for s, v in srcs.items()]
    out += ["", f"Config hash `{stats['config_hash']}`; held-out split `{display_path(stats['heldout_dir'])}` "
            f"(made from the raw pool before any curation, seed {recipe.heldout.seed}).", ""]
    out += ["## Funnel", "", f"![funnel]({png_name})", "",
            "| stage | rows in | kept | dropped | seconds | drop reasons |", "|---|---|---|---|---|---|"]
    for s in stats["stages"]:
        reasons = ", ".join(f"{k}: {v:,}" for k, v in s["dropped"].items()) or "-"
        secs = f"{s['seconds']:.1f}" + (" (checkpoint)" if s.get("extra", {}).get("resumed") else "")
        out.append(f"| {s['stage']} | {s['rows_in']:,} | {s['kept']:,} | {s['n_dropped']:,} | {secs} | {reasons} |")
    out += ["", "## Source mix", ""]
    if by_tokens:  # tokens taken against each source's token target; rows follow from row lengths
        total = sum(stats["tokens"].values())
        out += [f"Budget in **tokens** (prompt + response): `budget_tokens` = {stats['budget_tokens']:,}.", "",
                "| source | rows | tokens | token share | token target |", "|---|---|---|---|---|"]
        for s, c in sorted(stats["mix"].items()):
            tok = stats["tokens"].get(s, 0)
            out.append(f"| {s} | {c:,} | {tok:,} | {tok / max(total, 1):.1%} | {stats['token_targets'].get(s, 0):,} |")
    else:
        out += [f"Budget in **rows**: `budget_rows` = {stats['budget_rows']:,}.", "",
                "| source | rows | share | target |", "|---|---|---|---|"]
        for s, c in sorted(stats["mix"].items()):
            out.append(f"| {s} | {c:,} | {c / max(n, 1):.1%} | {stats['targets'].get(s, 0):,} |")
    out += ["", "## Token lengths", "", "Approximate tokens (words and punctuation marks).", "", _length_table(train), ""]
    dec = next((s for s in stats["stages"] if s["stage"] == "decontam"), None)
    out += ["## Decontamination", ""]
    if dec is None:
        out += ["Decontamination was switched off for this variant.", ""]
    else:
        ex = dec["extra"]
        out += [f"{ex['ngram']}-gram overlap or prompt-embedding cosine >= {ex['embed_threshold']} with any of "
                f"{ex['test_items']:,} test items ({ex['by_embedding']} rows by embedding only).", "",
                "| test set | rows removed |", "|---|---|"]
        out += [f"| {k} | {v:,} |" for k, v in ex["by_test_set"].items()] + [""]
    q = next((s for s in stats["stages"] if s["stage"] == "quality"), None)
    if q is not None and "ifd" in train.columns and len(train):
        s = train["ifd"].drop_nulls()
        if len(s):
            out += ["## Model-based quality", "",
                    f"IFD ({q['extra']['ifd_kind']} ratio) with `{q['extra']['model']}` on {q['extra']['scored']:,} "
                    f"candidates; kept rows: IFD mean {s.mean():.3f}, min {s.min():.3f}, max {s.max():.3f}.", ""]
    return "\n".join(out) + "\n"


def write_card(recipe: Recipe, stats: dict[str, Any], train: pl.DataFrame, cards_dir: Path) -> Path:
    png = cards_dir / f"{recipe.name}_funnel.png"
    funnel_png(stats, png)
    md = cards_dir / f"{recipe.name}.md"
    write_text(md, render_card(recipe, stats, train, png.name))
    return md


def review_card(name: str, parent: str, st: StageStats, changes: dict[str, int], agreement: dict[str, Any] | None,
                cfg: ReviewConfig) -> str:
    """A short HF-style card: what each human decision changed, and propagation agreement."""
    command = f"tomelab review apply --variant {parent}"
    if cfg.extend_k > 0:
        command += f" --extend-k {cfg.extend_k} --extend-min-similarity {cfg.extend_min_similarity} --holdout-share {cfg.holdout_share}"
    lines = [
        "---",
        "tags: [tomelab, human-review, argilla]",
        "---",
        f"# {name}",
        "",
        f"Variant `{parent}` after human review in Argilla (`{command}`).",
        f"Rows: {st.rows_in} in, {st.kept} kept, {st.n_dropped} dropped by review; "
        f"{st.extra['labelled_rows']} rows labelled by {st.extra['annotators']} annotator(s).",
        "",
        "## What each decision changed",
        "",
        "| decision | rows changed |",
        "|---|---|",
        f"| human: drop | {changes['human_drop']} |",
        f"| human: corrected response | {changes['human_correction']} |",
        f"| human: keep (unchanged) | {changes['human_keep_unchanged']} |",
        f"| human: quality rating only | {changes['quality_only']} |",
    ]
    if cfg.extend_k > 0:
        lines += [
            f"| propagated (k={cfg.extend_k}, cos>={cfg.extend_min_similarity}): drop | {changes['propagated_drop']} |",
            f"| propagated: keep | {changes['propagated_keep']} |",
            "",
            "## Label propagation agreement",
            "",
        ]
        if agreement and agreement.get("agreement") is not None:
            lines.append(
                f"On a held-out {cfg.holdout_share:.0%} of the human-labelled rows ({agreement['held_out']} rows, "
                f"{agreement['covered']} with a neighbour above the similarity threshold), the nearest-neighbour vote "
                f"agreed with the human label on **{agreement['agreement']:.1%}** (always-majority baseline: "
                f"{agreement['majority_baseline']:.1%})."
            )
        else:
            lines.append(f"Not measured: {(agreement or {}).get('note', 'no held-out row had a neighbour above the threshold')}.")
    lines += [
        "",
        "Dropped rows are in `dropped.parquet` with `stage = human_review`; corrected rows get a new id "
        "(the content hash) and keep the old one in `meta.review_parent_id`.",
        "",
    ]
    return "\n".join(lines)
