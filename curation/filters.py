"""Heuristic filters, each named and switched on in the recipe's `[filters] enabled` list.

A row is dropped by the first enabled filter it fails (cheap ones first, see APPLY_ORDER), with that filter's reason code:
- length: approximate token bounds for prompt and response (length_prompt_short/long, length_response_short/long)
- broken_turns: whitespace-only or symbol-only turns, or an answer that just echoes its prompt (broken_turn)
- refusal: refusals and AI boilerplate such as "As an AI language model" (refusal)
- truncated: an unclosed code fence, or a final answer that stops mid-sentence (truncated)
- repetition: repeated word 3-grams or repeated lines within one assistant turn (repetition)
- language: py3langid on the start of the prompt and of the response (language)

Length and refusal run vectorised in polars (Rust regex); the others look at one row at a time,
and only at rows every earlier filter kept, so the slow language detector sees the fewest rows.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import polars as pl

from curation.frame import StageResult, split_result
from curation.recipe import FILTER_NAMES, FiltersConfig
from tomelab.stats import Timer

_WORD = re.compile(r"\w+")
APPLY_ORDER = ("length", "broken_turns", "refusal", "truncated", "repetition", "language")
assert set(APPLY_ORDER) == set(FILTER_NAMES)
_END_OK = re.compile(r"""([.!?。！？:;)\]}"'`*>|~]|\d|```)\s*$""")
_HAS_LETTER = re.compile(r"\w")

Hit = tuple[str, str] | None


def _length(df: pl.DataFrame, cfg: FiltersConfig) -> list[Hit]:
    out: list[Hit] = []
    for p, r in zip(df["prompt_tokens"].to_list(), df["response_tokens"].to_list()):
        if p < cfg.min_prompt_tokens:
            out.append(("length_prompt_short", f"prompt has {p} tokens < {cfg.min_prompt_tokens}"))
        elif p > cfg.max_prompt_tokens:
            out.append(("length_prompt_long", f"prompt has {p} tokens > {cfg.max_prompt_tokens}"))
        elif r < cfg.min_response_tokens:
            out.append(("length_response_short", f"response has {r} tokens < {cfg.min_response_tokens}"))
        elif r > cfg.max_response_tokens:
            out.append(("length_response_long", f"response has {r} tokens > {cfg.max_response_tokens}"))
        else:
            out.append(None)
    return out


def _refusal(df: pl.DataFrame, cfg: FiltersConfig) -> list[Hit]:
    """One case-insensitive alternation of `refusal_patterns`, searched by polars over every response."""
    pattern = "(?i)" + "|".join(f"(?:{p})" for p in cfg.refusal_patterns)
    found = df["response"].str.extract(f"({pattern})", 1).to_list()
    return [("refusal", f"response contains {m!r}") if m else None for m in found]


def _broken(messages: list[dict]) -> Hit:
    for i, m in enumerate(messages):
        c = (m["content"] or "").strip()
        if not c or not _HAS_LETTER.search(c):
            return "broken_turn", f"turn {i} ({m['role']}) is empty or has no word characters"
    msgs = [m for m in messages if m["role"] != "system"]
    for u, a in zip(msgs[::2], msgs[1::2]):
        if u["content"].strip().lower() == a["content"].strip().lower():
            return "broken_turn", "the answer repeats the prompt verbatim"
    return None


def _truncated(messages: list[dict]) -> Hit:
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


def _repetition(messages: list[dict], cfg: FiltersConfig) -> Hit:
    """Per assistant turn: a multi-turn chat that revises one answer repeats itself across turns
    legitimately; a degenerate answer repeats itself within one turn."""
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


def _language(prompt: str, response: str, cfg: FiltersConfig) -> Hit:
    import py3langid

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


def _row_filter(fn: Callable[..., Hit], columns: tuple[str, ...], with_cfg: bool, label: str):
    """Lift a per-row check to a frame check, with a progress bar when asked."""
    def run(df: pl.DataFrame, cfg: FiltersConfig, progress: bool = False) -> list[Hit]:
        rows = zip(*(df[c].to_list() for c in columns))
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, total=len(df), desc=f"filter {label}", unit="row", leave=False)
        return [fn(*r, cfg) if with_cfg else fn(*r) for r in rows]

    return run


FILTERS: dict[str, Callable[..., list[Hit]]] = {
    "length": lambda df, cfg, progress=False: _length(df, cfg),
    "refusal": lambda df, cfg, progress=False: _refusal(df, cfg),
    "broken_turns": _row_filter(_broken, ("messages",), False, "broken_turns"),
    "truncated": _row_filter(_truncated, ("messages",), False, "truncated"),
    "repetition": _row_filter(_repetition, ("messages",), True, "repetition"),
    "language": _row_filter(_language, ("prompt", "response"), True, "language"),
}


def heuristic_filters(df: pl.DataFrame, cfg: FiltersConfig, *, progress: bool = False) -> StageResult:
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
                hits = FILTERS[name](sub, cfg, progress=progress)
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
