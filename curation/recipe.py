"""Variant recipes: typed dataclasses loaded from TOML, with `extends` for a shared base.

All variants of one ablation extend one base file (sources, held-out split, budget, decontamination),
so they differ only in the curation stages they switch on. `extends` merges tables recursively;
a list in the child replaces the base's list.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from curation.sources import SourceConfig
from tomelab import paths
from tomelab.config import from_dict, read_config_dict, safe_name_problem, to_dict
from tomelab.ray_cluster import address_problem

FILTER_NAMES = ("length", "language", "repetition", "refusal", "broken_turns", "truncated")
RUN_ONLY = ("executor", "address")  # Recipe fields that say where to run, not what to keep


def _at_least(obj: Any, low: int | float, *names: str) -> None:
    """Each named setting must be >= low (stage code would crash or silently misbehave below it)."""
    for n in names:
        v = getattr(obj, n)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= low):
            raise ValueError(f"`{n}` must be >= {low}, got {v}")


def _fraction(obj: Any, *names: str) -> None:
    """Each named setting must be a similarity/ratio in (0, 1]."""
    for n in names:
        v = getattr(obj, n)
        if not 0 < v <= 1:
            raise ValueError(f"`{n}` must be in (0, 1], got {v}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"`{n}` must be a finite number > 0, got {v}")


@dataclass
class HeldoutSplitConfig:
    """Held-out rows split from the raw pool of `sources` before any curation, fixed by `seed`.
    An empty `sources` means the recipe's first pool source."""

    sources: list[str] = field(default_factory=list)
    test_rows: int = 300
    val_rows: int = 100
    seed: int = 1234
    # reference sets: per source, rows kept out of every pool (scored by NLL only, never trained on),
    # e.g. {alpaca = 300}; the source must be one of the recipe's [[sources]]
    reference_rows: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.test_rows < 1 or self.val_rows < 0:
            raise ValueError("test_rows must be >= 1 and val_rows >= 0")
        if any(not isinstance(v, int) or v < 1 for v in self.reference_rows.values()):
            raise ValueError(f"heldout.reference_rows values must be integers >= 1, got {self.reference_rows}")
        _at_least(self, 0, "seed")


@dataclass
class ExactDedupConfig:
    enabled: bool = False


@dataclass
class MinHashConfig:
    """Near-dup MinHash/LSH (rensa). Defaults follow datatrove: word 5-gram shingles, 0.8 Jaccard."""

    enabled: bool = False
    num_perm: int = 128
    threshold: float = 0.8
    ngram: int = 5
    seed: int = 42
    max_chars: int = 4000  # shingle only the first N characters (long tails add cost, not signal)

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_perm", "ngram", "max_chars")
        _at_least(self, 0, "seed")
        _fraction(self, "threshold")


@dataclass
class SemanticDedupConfig:
    """Embeddings + faiss kNN; rows with cosine >= threshold to a better kept row are dropped."""

    enabled: bool = False
    model: str = "m2v"
    threshold: float = 0.95
    k: int = 10
    text: Literal["conversation", "prompt"] = "conversation"

    def __post_init__(self) -> None:
        _at_least(self, 1, "k")
        _fraction(self, "threshold")


@dataclass
class FiltersConfig:
    """Heuristic filters; each one named in `enabled` is applied, in the order of FILTER_NAMES."""

    enabled: list[str] = field(default_factory=list)
    min_prompt_tokens: int = 3
    max_prompt_tokens: int = 2048
    min_response_tokens: int = 5
    max_response_tokens: int = 4096
    languages: list[str] = field(default_factory=lambda: ["en"])
    language_chars: int = 400
    max_dup_ngram_ratio: float = 0.50  # share of repeated word 3-grams within one assistant turn
    max_dup_line_ratio: float = 0.50  # share of repeated lines (> 10 chars) within one assistant turn
    language_min_words: int = 5  # shorter texts (code, numbers, "thanks") are not judged
    # Rust-regex syntax (searched case-insensitively by polars; no look-around).
    refusal_patterns: list[str] = field(default_factory=lambda: [
        r"as an ai language model", r"as an ai model", r"as a language model", r"i['’]?m (just )?an ai\b",
        r"i (cannot|can['’]t|am unable to|am not able to) (provide|assist|fulfill|browse|access)",
        r"i (cannot|can['’]t) help (you )?with", r"i['’]?m sorry, but i (cannot|can['’]t)",
        r"my knowledge cutoff", r"(trained|developed|created) by openai",
    ])

    def __post_init__(self) -> None:
        _at_least(self, 0, "min_prompt_tokens", "min_response_tokens", "language_min_words")
        _at_least(self, 1, "language_chars")
        for lo, hi in (("min_prompt_tokens", "max_prompt_tokens"), ("min_response_tokens", "max_response_tokens")):
            if getattr(self, hi) < getattr(self, lo):
                raise ValueError(f"`{hi}` ({getattr(self, hi)}) must be >= `{lo}` ({getattr(self, lo)})")
        _fraction(self, "max_dup_ngram_ratio", "max_dup_line_ratio")
        unknown = [f for f in self.enabled if f not in FILTER_NAMES]
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; choose from {list(FILTER_NAMES)}")

        for p in self.refusal_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"refusal_patterns entry {p!r} is not a valid regex ({e})") from None


@dataclass
class QualityConfig:
    """Model-based quality on candidates only: IFD and response NLL with the small base model.

    IFD = ppl(answer | instruction) / ppl(answer alone) when ifd_kind = "ppl" (Cherry LLM's code),
    or the ratio of mean token losses when ifd_kind = "loss". Rows with IFD >= max_ifd (the
    instruction does not help) are dropped, then the top rows by `select_by` are kept per source.
    """

    enabled: bool = False
    model: str = "smollm2-135m-instruct"
    ifd_kind: Literal["ppl", "loss"] = "ppl"
    select_by: Literal["ifd", "nll", "score"] = "ifd"
    candidates_factor: float = 2.0  # score at most this many x the per-source budget
    max_ifd: float = 1.0
    min_score: float | None = None  # FineTome's own `score` threshold, when the source has one
    max_prompt_tokens: int = 128
    max_answer_tokens: int = 64
    batch_size: int = 8

    def __post_init__(self) -> None:
        _at_least(self, 1, "batch_size", "max_prompt_tokens", "max_answer_tokens")
        _positive(self, "candidates_factor", "max_ifd")
        if self.min_score is not None and not math.isfinite(self.min_score):
            raise ValueError(f"`min_score` must be a finite number, got {self.min_score}")


@dataclass
class TestSetConfig:
    """An evaluation set to decontaminate against. `path` may start with `shared:` for ../shared/data."""

    name: str
    path: str
    fields: list[str] = field(default_factory=lambda: ["prompt"])


@dataclass
class DecontamConfig:
    """Drop training rows that share an n-gram or a near-identical prompt embedding with a test item."""

    enabled: bool = True
    ngram: int = 13
    embed_threshold: float = 0.92
    model: str = "m2v"
    include_heldout: bool = True
    test_sets: list[TestSetConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        _at_least(self, 1, "ngram")
        _fraction(self, "embed_threshold")


@dataclass
class Recipe:
    """One dataset variant. `budget_rows` is the same for all variants of one ablation.

    `budget_tokens` > 0 budgets by tokens instead (prompt + response tokens per source share), so
    sources with long rows do not take more compute than their share; `budget_rows` then only caps
    the total rows, since every variant inherits it from the ablation's base.
    """

    name: str
    budget_rows: int
    sources: list[SourceConfig]
    budget_tokens: int = 0  # 0 = budget by rows
    description: str = ""
    seed: int = 0
    pool: list[str] = field(default_factory=list)  # sources sampled from; empty = all in `mix` or the first
    mix: dict[str, float] = field(default_factory=dict)  # source -> share of the budget
    heldout: HeldoutSplitConfig = field(default_factory=HeldoutSplitConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    semantic_dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    # a block's own sample of the raw pool: after the held-out split, keep `draw_rows` rows per pool source,
    # drawn with `draw_seed` (0 rows: the whole pool). Set per block by an ablation with draw_rows > 0
    draw_rows: int = 0
    draw_seed: int = 0
    # how the budget stage picks rows: "random" (seeded sample) or "longest" (the longest complete answers
    # whose conversation fits `fit_tokens`: "Long Is More for Alignment", Zhao et al. 2024)
    select: Literal["random", "longest"] = "random"
    fit_tokens: int = 0  # "longest": only rows of at most this many (approximate) tokens; 0 = no cap
    # where the stages run (RUN_ONLY: not part of the variant, the same rows come out either way):
    # "local" (this process) or "ray" (Ray Data on `address`: "ray://host:10001" or "auto" for an
    # existing cluster; "" = $RAY_ADDRESS, else a local Ray on this machine's cores)
    executor: Literal["local", "ray"] = "local"
    address: str = ""

    def __post_init__(self) -> None:
        problem = address_problem(self.address)
        if problem:
            raise ValueError(f"`address` {problem}")
        problem = safe_name_problem(self.name)
        if problem:  # the name becomes folder and file names under artifacts/ and data_cards/
            raise ValueError(f"`name` {problem}. Set `name` (or rename the file) to e.g. \"my-variant\"")
        _at_least(self, 0, "seed")
        if self.budget_rows < 1:
            raise ValueError("budget_rows must be >= 1")
        if self.budget_tokens < 0:
            raise ValueError(f"budget_tokens must be >= 0, got {self.budget_tokens}: set budget_tokens = 0 "
                             f"to budget by rows, or a positive token count to budget by tokens")
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("list at least one [[sources]]")
        if len(set(names)) != len(names):
            raise ValueError(f"[[sources]] names must be unique, got {names}")
        if self.draw_rows < 0 or self.draw_seed < 0 or self.fit_tokens < 0:
            raise ValueError("draw_rows, draw_seed and fit_tokens must be >= 0")
        for key, listed in (("pool", self.pool), ("mix", list(self.mix)), ("heldout.sources", self.heldout.sources),
                            ("heldout.reference_rows", list(self.heldout.reference_rows))):
            bad = [n for n in listed if n not in names]
            if bad:
                raise ValueError(f"`{key}` names unknown source(s) {bad}; the recipe's sources are {names}")
        if self.mix:
            if any(v < 0 for v in self.mix.values()) or sum(self.mix.values()) <= 0:
                raise ValueError("`mix` shares must be >= 0 and sum to more than 0")
        if not self.heldout.sources:
            self.heldout.sources = [self.pool_sources[0]]

    @property
    def pool_sources(self) -> list[str]:
        if self.mix:
            return [n for n, v in self.mix.items() if v > 0]
        return self.pool or [self.sources[0].name]

    @property
    def budget_unit(self) -> Literal["rows", "tokens"]:
        return "tokens" if self.budget_tokens > 0 else "rows"

    def shares(self) -> dict[str, float]:
        """Each pool source's share of the budget (sums to 1)."""
        if self.mix:
            total = sum(self.mix.values())
            return {n: v / total for n, v in self.mix.items() if v > 0}
        return {}


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as data without its RUN_ONLY fields: what the variant's config hash and stats describe,
    so where a variant was curated never changes its hash (variants made before these fields keep theirs)."""
    return {k: v for k, v in to_dict(recipe).items() if k not in RUN_ONLY}


def read_recipe_dict(path: str | Path) -> dict[str, Any]:
    """The recipe's TOML with its `extends` chain merged in (base first)."""
    return read_config_dict(path)


def resolve_data_path(s: str) -> Path:
    """`shared:gsm8k/test.jsonl` -> ../shared/data/gsm8k/test.jsonl; anything else as given."""
    if s.startswith("shared:"):
        return paths.shared_data_dir() / s[len("shared:"):]
    return Path(s).expanduser()


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Load and validate a recipe; the variant name defaults to the file name. `overrides` replace
    top-level keys (an ablation block sets name, seed, draw_rows and draw_seed this way)."""
    data = read_recipe_dict(path)
    data.setdefault("name", Path(path).stem)
    data.update(overrides or {})
    return from_dict(Recipe, data, file=str(path))
