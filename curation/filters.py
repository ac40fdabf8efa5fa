"""Heuristic filters, each named and switched on in the recipe's `[filters] enabled` list.

A row is dropped by the first enabled filter it fails (cheap ones first, see APPLY_ORDER), with that filter's reason code:
- length: approximate token bounds for prompt and response (length_prompt_short/long, length_response_short/long)
- broken_turns: whitespace-only or symbol-only turns, or an answer that just echoes its prompt (broken_turn)
- refusal: refusals and AI boilerplate such as "As an AI language model" (refusal)
- truncated: an unclosed code fence, or a final answer that stops mid-sentence (truncated)
- repetition: repeated word 3-grams or repeated lines within one assistant turn (repetition)
- language: py3langid on the start of the prompt and of the response (language)

Each filter is one small `RowFilter` class (as in datatrove): `filter(*row values)` returns None or
(reason, detail); `@register` adds it to FILTERS in apply order. Refusal runs vectorised in polars
(Rust regex); the others look at one row at a time, and only at rows every earlier filter kept, so
the slow language detector sees the fewest rows. `FiltersStage` is the stage contract's wrapper.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import FILTER_NAMES, FiltersConfig
from curation.stage import Stage, sum_extra
from tomelab.stats import Timer

_WORD = re.compile(r"\w+")
_END_OK = re.compile(r"""([.!?。！？:;)\]}"'`*>|~]|\d|```)\s*$""")
_HAS_LETTER = re.compile(r"\w")

Hit = tuple[str, str] | None


class RowFilter:
    """One heuristic filter, in the way of datatrove's BaseFilter: `filter(*values)` looks at one row's
    `columns` and returns None (keep) or (reason, detail). Adding a filter means writing one subclass
    (plus its name in curation.recipe.FILTER_NAMES, which the recipe validates against)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]] = ("messages",)

    def __init__(self, cfg: FiltersConfig) -> None:
        self.cfg = cfg

    def filter(self, *values: Any) -> Hit:
        raise NotImplementedError

    def filter_frame(self, df: pl.DataFrame) -> list[Hit]:
        """Every row of `df`; a filter may override this with a vectorised version."""
        return [self.filter(*r) for r in zip(*(df[c].to_list() for c in self.columns))]


FILTERS: dict[str, type[RowFilter]] = {}  # name -> class, in APPLY_ORDER (cheap ones first)


def register(cls: type[RowFilter]) -> type[RowFilter]:
    FILTERS[cls.name] = cls
    return cls


@register
class Length(RowFilter):
    name = "length"
    columns = ("prompt_tokens", "response_tokens")

    def filter(self, p: int, r: int) -> Hit:
        cfg = self.cfg
        if p < cfg.min_prompt_tokens:
            return "length_prompt_short", f"prompt has {p} tokens < {cfg.min_prompt_tokens}"
        if p > cfg.max_prompt_tokens:
            return "length_prompt_long", f"prompt has {p} tokens > {cfg.max_prompt_tokens}"
        if r < cfg.min_response_tokens:
            return "length_response_short", f"response has {r} tokens < {cfg.min_response_tokens}"
        if r > cfg.max_response_tokens:
            return "length_response_long", f"response has {r} tokens > {cfg.max_response_tokens}"
        return None


@register
class BrokenTurns(RowFilter):
    name = "broken_turns"

    def filter(self, messages: list[dict]) -> Hit:
        for i, m in enumerate(messages):
            c = (m["content"] or "").strip()
            if not c or not _HAS_LETTER.search(c):
                return "broken_turn", f"turn {i} ({m['role']}) is empty or has no word characters"
        msgs = [m for m in messages if m["role"] != "system"]
        for u, a in zip(msgs[::2], msgs[1::2]):
            if u["content"].strip().lower() == a["content"].strip().lower():
                return "broken_turn", "the answer repeats the prompt verbatim"
        return None


@register
class Refusal(RowFilter):
    """One case-insensitive alternation of `refusal_patterns` (Rust regex), searched by polars."""

    name = "refusal"
    columns = ("response",)

    def filter(self, response: str) -> Hit:
        return self.filter_frame(pl.DataFrame({"response": [response]}, schema={"response": pl.String}))[0]

    def filter_frame(self, df: pl.DataFrame) -> list[Hit]:
        pattern = "(?i)" + "|".join(f"(?:{p})" for p in self.cfg.refusal_patterns)
        found = df["response"].str.extract(f"({pattern})", 1).to_list()
        return [("refusal", f"response contains {m!r}") if m else None for m in found]


@register
class Truncated(RowFilter):
    name = "truncated"

    def filter(self, messages: list[dict]) -> Hit:
        last = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
        if last.count("```") % 2 == 1:
            return "truncated", "the last answer leaves a code fence open"
        tail = last.rstrip()
        if tail.endswith(("...", "…")) and len(tail) > 200:
            return "truncated", "the last answer trails off with an ellipsis"
        if not _END_OK.search(tail) and len(_WORD.findall(tail[-200:])) >= 5 and tail[-1:].isalpha():
            return "truncated", f"the last answer stops mid-sentence: …{tail[-40:]!r}"
        return None


def dup_ngram_ratio(text: str, n: int = 3) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (Gopher-style repetition)."""
    words = _WORD.findall(text.lower()[:8000])
    if len(words) < n + 10:
        return 0.0
    grams = Counter(zip(*(words[k:] for k in range(n))))
    total = len(words) - n + 1
    return (total - len(grams)) / total  # occurrences beyond the first of each n-gram


def dup_line_ratio(text: str) -> float:
    """Share of non-trivial lines (> 10 chars) that repeat an earlier line."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 10]
    if len(lines) < 4:
        return 0.0
    return 1 - len(set(lines)) / len(lines)


@register
class Repetition(RowFilter):
    """Per assistant turn: a multi-turn chat that revises one answer repeats itself across turns
    legitimately; a degenerate answer repeats itself within one turn."""

    name = "repetition"

    def filter(self, messages: list[dict]) -> Hit:
        cfg = self.cfg
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            r = dup_ngram_ratio(m["content"])
            if r > cfg.max_dup_ngram_ratio:
                return "repetition", f"turn {i}: {r:.0%} of word 3-grams repeat (> {cfg.max_dup_ngram_ratio:.0%})"
            lr = dup_line_ratio(m["content"])
            if lr > cfg.max_dup_line_ratio:
                return "repetition", f"turn {i}: {lr:.0%} of lines repeat (> {cfg.max_dup_line_ratio:.0%})"
        return None


# The most frequent English function words. Text where they make up >= 20% of the words is English
# (Gopher's stop-word rule); only the rest goes to the detector, which is ~1 ms per call.
_EN_STOPWORDS = frozenset("the be to of and a in that have i it for not on with he as you do at this but his by "
                          "from they we say her she or an will my one all would there their what so up out if "
                          "about who get which go me is are was were can your how".split())


@register
class Language(RowFilter):
    name = "language"
    columns = ("prompt", "response")

    def filter(self, prompt: str, response: str) -> Hit:
        import py3langid

        cfg = self.cfg
        for part, full in (("prompt", prompt), ("response", response)):
            text = full[: cfg.language_chars]
            words = _WORD.findall(text.lower())
            if len(words) < cfg.language_min_words:  # too short to judge (code, numbers): keep
                continue
            if "en" in cfg.languages and sum(w in _EN_STOPWORDS for w in words) >= 0.2 * len(words):
                continue
            lang, _ = py3langid.classify(text)
            if lang not in cfg.languages:
                return "language", f"{part} detected as {lang!r}, allowed {cfg.languages}"
        return None


APPLY_ORDER = tuple(FILTERS)
assert set(APPLY_ORDER) == set(FILTER_NAMES), (APPLY_ORDER, FILTER_NAMES)


def heuristic_filters(df: pl.DataFrame, cfg: FiltersConfig, *, progress: bool = False) -> StageResult:  # noqa: ARG001
    """Apply the enabled filters in APPLY_ORDER; each dropped row gets the first failing filter's reason.

    Each filter only sees rows the earlier ones kept; `extra.per_filter` records how many rows each
    one examined and dropped, and its seconds.
    """
    reason: list[str | None] = [None] * len(df)
    detail = [""] * len(df)
    per_filter: dict[str, dict[str, float]] = {}
    with Timer() as t:
        alive = list(range(len(df)))
        for name in (n for n in APPLY_ORDER if n in cfg.enabled):
            with Timer() as tf:
                sub = df[alive] if len(alive) < len(df) else df
                hits = FILTERS[name](cfg).filter_frame(sub)
                still = []
                for i, hit in zip(alive, hits):
                    if hit is None:
                        still.append(i)
                    else:
                        reason[i], detail[i] = hit
            per_filter[name] = {"examined": len(alive), "dropped": len(alive) - len(still),
                                "seconds": round(tf.seconds, 3)}
            alive = still
    return split_result(df, "filters", reason, detail, t.seconds,
                        extra={"enabled": list(cfg.enabled), "per_filter": per_filter})


class FiltersStage(Stage):
    """The `[filters]` stage: row-local, so any slice of the frame can be filtered anywhere."""

    name = "filters"
    kind = "row"
    fix = "Loosen the bounds in [filters] or remove a name from [filters] enabled."

    def run(self, frame: pl.DataFrame) -> StageResult:
        return heuristic_filters(frame, self.cfg)

    def merge_extra(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        return sum_extra(extras, "per_filter.*.examined", "per_filter.*.dropped", "per_filter.*.seconds")
