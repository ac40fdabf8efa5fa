"""Curation stages on small fixtures: each stage's decisions, its reason codes and row conservation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation import dedup, filters
from curation.card import render_card
from curation.decontam import decontaminate, load_test_set, ngram_hashes
from curation.frame import prepare
from curation.mixing import plan_budget, row_tokens, sample_budget, sample_token_budget, source_targets
from curation.recipe import (
    DecontamConfig,
    ExactDedupConfig,
    FiltersConfig,
    MinHashConfig,
    SemanticDedupConfig,
    load_recipe,
)
from curation.recipe import (
    TestSetConfig as SetConfig,
)
from tomelab.errors import ConfigError, DataError
from tomelab.schema import make_row, rows_to_table

REPO = Path(__file__).resolve().parent.parent

LONG_ANSWER = ("Photosynthesis is the process by which green plants, algae and some bacteria turn light energy "
               "into chemical energy. Chlorophyll absorbs light, water is split, oxygen is released, and carbon "
               "dioxide is fixed into sugars in the Calvin cycle. The sugars feed the plant and, through food "
               "chains, almost every other living thing on the planet.")


def rows(pairs: list[tuple[str, str]], source: str = "s", scores: list[float | None] | None = None) -> pl.DataFrame:
    out = []
    for n, (q, a) in enumerate(pairs):
        meta = {"row": n}
        if scores is not None and scores[n] is not None:
            meta["score"] = scores[n]
        out.append(make_row(source, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], meta))
    return prepare(rows_to_table(out))


def conserved(res, n_in: int) -> None:
    assert res.stats.rows_in == n_in == len(res.kept) + len(res.dropped)
    assert res.stats.n_dropped == len(res.dropped)
    assert res.dropped["reason"].value_counts().sort("reason").rows() == sorted(res.stats.dropped.items())


# ------------------------------------------------------------------ dedup


def test_exact_dedup_normalises_case_space_unicode_and_keeps_the_better_row() -> None:
    df = rows([
        ("Explain photosynthesis.", LONG_ANSWER),
        ("EXPLAIN   photosynthesis.", LONG_ANSWER.upper()),  # case + whitespace
        ("Explain photosynthesis.", LONG_ANSWER.replace("Calvin", "Ｃａｌｖｉｎ")),  # fullwidth -> NFKC
        ("Explain respiration.", LONG_ANSWER),
    ], scores=[1.0, 5.0, 2.0, 1.0])
    res = dedup.exact_dedup(df, ExactDedupConfig(enabled=True))
    conserved(res, 4)
    # the copy with the highest score survives, the two others point at it
    kept_ids = set(res.kept["id"])
    assert df["id"][1] in kept_ids and df["id"][3] in kept_ids and len(kept_ids) == 2
    pairs = res.artefacts["exact_pairs"]
    assert set(pairs["kept_id"]) == {df["id"][1]} and set(pairs["dropped_id"]) == {df["id"][0], df["id"][2]}


def test_minhash_finds_light_edits_but_not_different_texts() -> None:
    edited = LONG_ANSWER.replace("almost every", "nearly every")
    other = ("The French Revolution began in 1789 with the storming of the Bastille and ended the absolute "
             "monarchy. It spread ideas of liberty and equality, led to the Terror, and closed with Napoleon "
             "taking power in 1799, reshaping Europe for the next century and beyond in many ways.")
    df = rows([("Explain photosynthesis.", LONG_ANSWER), ("Explain photosynthesis.", edited),
               ("Summarise the French Revolution.", other)])
    res = dedup.minhash_dedup(df, MinHashConfig(enabled=True, threshold=0.7))
    conserved(res, 3)
    assert res.stats.dropped == {"near_duplicate": 1}
    assert df["id"][2] in set(res.kept["id"])
    pair = res.artefacts["minhash_pairs"].row(0, named=True)
    assert pair["similarity"] >= 0.7 and {pair["dropped_id"], pair["kept_id"]} == {df["id"][0], df["id"][1]}


class FixedEmbedder:
    """A test double with the Embedder interface: fixed vectors per text, counting calls."""

    name = "fixed"

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def encode(self, ids, texts, *, progress=False):
        v = np.array([self.table[t] for t in texts], dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_semantic_dedup_keeps_best_row_and_does_not_chain() -> None:
    # A~B (0.99), B~C (0.99) but A·C < threshold: greedy best-first keeps A, drops B, keeps C.
    a, b, c, d = [1.0, 0.0, 0.0], [0.99, 0.141, 0.0], [0.96, 0.28, 0.0], [0.0, 0.0, 1.0]
    df = rows([("qa", "A answer text"), ("qb", "B answer text"), ("qc", "C answer text"), ("qd", "D answer text")],
              scores=[3.0, 2.0, 1.0, 0.5])
    table = {t: v for t, v in zip(df["conversation"].to_list(), (a, b, c, d))}
    res = dedup.semantic_dedup(df, SemanticDedupConfig(enabled=True, threshold=0.98, k=3), FixedEmbedder(table))
    conserved(res, 4)
    assert res.kept["id"].to_list() == [df["id"][0], df["id"][2], df["id"][3]]
    pairs = res.artefacts["semantic_pairs"]
    assert pairs["dropped_id"].to_list() == [df["id"][1]] and pairs["kept_id"].to_list() == [df["id"][0]]
    # reversing the quality order keeps C (now best) and drops B, and A survives (A·C below threshold)
    df2 = df.with_columns(quality_score=pl.Series([1.0, 2.0, 3.0, 0.5]))
    res2 = dedup.semantic_dedup(df2, SemanticDedupConfig(enabled=True, threshold=0.98, k=3), FixedEmbedder(table))
    assert set(res2.dropped["id"]) == {df["id"][1]}


# ------------------------------------------------------------------ filters


def test_each_filter_drops_its_case_with_its_reason() -> None:
    ok = ("How do plants make food?", LONG_ANSWER)
    cases = {
        "length_prompt_short": ("Hi", LONG_ANSWER),
        "length_response_short": ("How do plants make food?", "Sunlight."),
        "broken_turn": ("How do plants make food from light?", "??? !!! ... ---  ***  ###"),
        "refusal": ("Tell me the weather in Paris today.",
                    "As an AI language model, I cannot browse the internet, so I do not know the weather today."),
        "truncated": ("Describe the water cycle in detail.",
                      "Water evaporates from the oceans, rises, cools and condenses into clouds, and then it falls"),
        "repetition": ("Write a poem about the sea.", "the sea is blue and " * 40 + "the end."),
        "language": ("¿Cómo hacen las plantas su alimento?",
                     "Las plantas usan la luz del sol para convertir el agua y el dióxido de carbono en azúcares."),
    }
    df = rows([ok, *cases.values()])
    cfg = FiltersConfig(enabled=list(filters.APPLY_ORDER))
    res = filters.heuristic_filters(df, cfg)
    conserved(res, len(df))
    assert res.kept["id"].to_list() == [df["id"][0]]
    got = dict(zip(res.dropped["id"].to_list(), res.dropped["reason"].to_list()))
    assert [got[i] for i in df["id"][1:].to_list()] == list(cases)
    # a filter that is not enabled does not run
    only_len = filters.heuristic_filters(df, FiltersConfig(enabled=["length"]))
    assert set(only_len.stats.dropped) == {"length_prompt_short", "length_response_short"}
    assert res.stats.extra["per_filter"]["language"]["examined"] == 2  # only rows every earlier filter kept


def test_repetition_is_judged_per_turn_not_across_revisions() -> None:
    answer = LONG_ANSWER
    msgs = [{"role": "user", "content": "Explain photosynthesis."}, {"role": "assistant", "content": answer},
            {"role": "user", "content": "Say it again, please."}, {"role": "assistant", "content": answer}]
    df = prepare(rows_to_table([make_row("s", msgs, {})]))
    assert filters.heuristic_filters(df, FiltersConfig(enabled=["repetition"])).stats.kept == 1


def test_unknown_filter_name_is_a_config_error(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('budget_rows = 5\n[[sources]]\nname = "a"\nkind = "alpaca"\n[filters]\nenabled = ["lenght"]\n')
    with pytest.raises(ConfigError, match="unknown filter.*lenght"):
        load_recipe(p)


# ------------------------------------------------------------------ decontamination


def test_ngram_hashes_match_across_texts_and_never_straddle_rows() -> None:
    r, h, off = ngram_hashes(["a b c d", "e f", "c d e f"], 3)
    assert r.tolist() == [0, 0, 2, 2] and off.tolist() == [0, 1, 0, 1]
    # "c d e" only exists in text 2: the words of texts 0 and 1 are not glued together
    assert len(set(h[r == 2].tolist()) & set(h[r == 0].tolist())) == 0
    _, h2, _ = ngram_hashes(["C, D: e!"], 3)
    assert h2[0] == h[2]  # case and punctuation do not matter


def test_decontam_counts_rows_per_test_set(shared_data: Path) -> None:
    gsm = [json.loads(ln) for ln in (shared_data / "gsm8k/test.jsonl").read_text().splitlines()[:3]]
    ife = [json.loads(ln) for ln in (shared_data / "ifeval/input_data.jsonl").read_text().splitlines()[:2]]
    df = rows([
        (gsm[0]["question"], "Let me think step by step about it and give the answer."),  # gsm8k question verbatim
        ("Solve this for me:\n" + gsm[1]["question"].upper(), "Here is my worked solution to it."),  # upper-cased
        ("Please help", gsm[2]["answer"]),  # the answer text (gsm8k test answers are a decontam field)
        (ife[0]["prompt"], LONG_ANSWER),  # an IFEval prompt
        ("Explain photosynthesis in simple words for children.", LONG_ANSWER),  # clean
    ])
    cfg = DecontamConfig(ngram=13, embed_threshold=1.0, include_heldout=False, test_sets=[
        SetConfig("gsm8k_test", "shared:gsm8k/test.jsonl", ["question", "answer"]),
        SetConfig("ifeval", "shared:ifeval/input_data.jsonl", ["prompt"])])
    items = load_test_set("gsm8k_test", shared_data / "gsm8k/test.jsonl", ["question", "answer"])
    items += load_test_set("ifeval", shared_data / "ifeval/input_data.jsonl", ["prompt"])
    res = decontaminate(df, cfg, items)
    conserved(res, 5)
    assert res.stats.extra["by_test_set"] == {"gsm8k_test": 3, "ifeval": 1}
    assert res.kept["id"].to_list() == [df["id"][4]]
    assert all("-gram" in d for d in res.dropped["detail"])


def test_decontam_embedding_catches_a_paraphrase_without_shared_ngrams() -> None:
    df = rows([("What's the capital city of France?", "Paris is the capital of France, on the Seine."),
               ("Explain photosynthesis.", LONG_ANSWER)])
    from curation.decontam import TestItem

    items = [TestItem("heldout", "heldout:x:prompt", "Which city is the capital of France?")]
    table = {"What's the capital city of France?": [1.0, 0.1], "Explain photosynthesis.": [0.0, 1.0],
             "Which city is the capital of France?": [1.0, 0.12]}
    res = decontaminate(df, DecontamConfig(embed_threshold=0.95), items, FixedEmbedder(table))
    assert res.stats.extra["by_test_set"] == {"heldout": 1} and res.stats.extra["by_embedding"] == 1
    assert res.kept["id"].to_list() == [df["id"][1]]


def test_missing_test_set_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*path"):
        load_test_set("mine", tmp_path / "nope.jsonl", ["prompt"])
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(DataError, match="row 1 has no field 'prompt'.*question"):
        load_test_set("mine", bad, ["prompt"])


# ------------------------------------------------------------------ mixing and budget


def test_source_targets_follow_shares_and_refill_a_short_source(tmp_path: Path) -> None:
    p = tmp_path / "r.toml"
    p.write_text('budget_rows = 100\n[mix]\na = 0.5\nb = 0.3\nc = 0.2\n'
                 + "".join(f'[[sources]]\nname = "{n}"\nkind = "alpaca"\n' for n in "abc"))
    recipe = load_recipe(p)
    t, notes = source_targets(recipe, {"a": 1000, "b": 1000, "c": 1000})
    assert t == {"a": 50, "b": 30, "c": 20} and notes == []
    t, notes = source_targets(recipe, {"a": 1000, "b": 1000, "c": 5})
    assert t["c"] == 5 and sum(t.values()) == 100 and t["a"] > 50 and any("source c has 5" in n for n in notes)
    t, notes = source_targets(recipe, {"a": 10, "b": 10, "c": 10})
    assert sum(t.values()) == 30 and any("fewer than budget_rows" in n for n in notes)


def test_budget_sample_is_seeded_and_conserves_rows() -> None:
    df = pl.concat([rows([(f"question {i}", f"answer {i} " * 5) for i in range(20)], source="a"),
                    rows([(f"q {i}", f"a {i} " * 5) for i in range(10)], source="b")])
    r1 = sample_budget(df, {"a": 5, "b": 3}, seed=7, notes=[])
    r2 = sample_budget(df, {"a": 5, "b": 3}, seed=7, notes=[])
    r3 = sample_budget(df, {"a": 5, "b": 3}, seed=8, notes=[])
    conserved(r1, 30)
    assert r1.kept["id"].to_list() == r2.kept["id"].to_list() != r3.kept["id"].to_list()
    assert r1.kept.group_by("source").len().sort("source").rows() == [("a", 5), ("b", 3)]


# ------------------------------------------------------------------ token budget


def token_recipe(tmp_path: Path, budget_tokens: int, budget_rows: int = 10_000):
    p = tmp_path / "r.toml"
    p.write_text(f"budget_rows = {budget_rows}\nbudget_tokens = {budget_tokens}\nseed = 5\n"
                 "[mix]\na = 0.5\nb = 0.3\nc = 0.2\n"
                 + "".join(f'[[sources]]\nname = "{n}"\nkind = "alpaca"\n' for n in "abcd"))
    return load_recipe(p)


def token_pool(c_rows: int = 80) -> pl.DataFrame:
    """Sources of different row lengths (a long, b short, c medium) plus `d`, which is not in the mix."""
    return pl.concat([rows([(f"question {i} about plants", "word " * (30 + i % 17)) for i in range(60)], source="a"),
                      rows([(f"q {i}", "w " * (3 + i % 5)) for i in range(200)], source="b"),
                      rows([(f"ask {i}", "some " * (10 + i % 7)) for i in range(c_rows)], source="c"),
                      rows([(f"other {i}", "x " * 9) for i in range(15)], source="d")])


def tokens_by_source(df: pl.DataFrame) -> dict[str, tuple[int, int]]:
    """source -> (token sum, longest row)."""
    agg = df.with_columns(row_tokens(df)).group_by("source").agg(
        pl.col("tokens").sum(), pl.col("tokens").max().alias("longest"))
    return {s: (int(t), int(m)) for s, t, m in agg.iter_rows()}


def test_token_budget_follows_shares_within_one_row(tmp_path: Path) -> None:
    recipe, df = token_recipe(tmp_path, 2000), token_pool()
    plan = plan_budget(recipe, df)
    assert plan.unit == "tokens" and plan.token_targets == {"a": 1000, "b": 600, "c": 400} and plan.notes == []
    pool = tokens_by_source(df)
    n_rows = dict(df.group_by("source").len().iter_rows())
    # quality sizes its candidates in rows: ceil(token target / mean tokens per row of the source)
    assert plan.row_targets == {s: -(-t * n_rows[s] // pool[s][0]) for s, t in plan.token_targets.items()}
    res = sample_token_budget(df, plan.token_targets, recipe.seed, plan.notes, max_rows=recipe.budget_rows)
    taken = tokens_by_source(res.kept)
    for s, target in plan.token_targets.items():
        assert target <= taken[s][0] < target + taken[s][1], s  # reached, overshot by less than one row
    assert res.stats.extra["tokens_taken"] == {s: taken[s][0] for s in "abc"} | {"d": 0}
    assert res.stats.extra["token_targets"] == plan.token_targets and res.stats.extra["warnings"] == []
    detail = res.dropped.filter(pl.col("source") == "a")["detail"][0]
    assert detail.startswith(f"a: {taken['a'][0]:,} of 1,000 tokens target reached with ")
    assert detail.endswith(" of 60 rows")


def test_token_budget_is_seeded(tmp_path: Path) -> None:
    recipe, df = token_recipe(tmp_path, 2000), token_pool()
    targets = plan_budget(recipe, df).token_targets
    r1, r2, r3 = (sample_token_budget(df, targets, seed, [], max_rows=10_000) for seed in (7, 7, 8))
    assert r1.kept["id"].to_list() == r2.kept["id"].to_list() != r3.kept["id"].to_list()


def test_token_budget_refills_a_short_source_and_warns(tmp_path: Path) -> None:
    df = token_pool(c_rows=5)  # c: ~70 tokens for a share of 400
    c_tokens = tokens_by_source(df)["c"][0]
    plan = plan_budget(token_recipe(tmp_path, 2000), df)
    assert plan.token_targets["c"] == c_tokens and sum(plan.token_targets.values()) == 2000
    assert plan.token_targets["a"] > 1000 and plan.token_targets["b"] > 600
    assert any(f"source c has {c_tokens} tokens for a share of 400" in n for n in plan.notes)
    res = sample_token_budget(df, plan.token_targets, 5, plan.notes, max_rows=10_000)
    assert res.kept.filter(pl.col("source") == "c").height == 5
    # the whole pool below the budget: a loud warning naming the key
    big = plan_budget(token_recipe(tmp_path, 10**7), df)
    assert any(n.startswith("WARNING") and "budget_tokens = 10,000,000" in n for n in big.notes)
    assert big.token_targets == {s: t for s, (t, _) in tokens_by_source(df).items() if s != "d"}


def test_token_budget_conserves_rows_and_budget_rows_caps_them(tmp_path: Path) -> None:
    df = token_pool()
    plan = plan_budget(token_recipe(tmp_path, 2000), df)
    res = sample_token_budget(df, plan.token_targets, 5, [], max_rows=10_000)
    conserved(res, len(df))
    assert set(res.stats.dropped) == {"over_budget", "not_in_mix"} and res.stats.dropped["not_in_mix"] == 15
    capped = sample_token_budget(df, plan.token_targets, 5, [], max_rows=50)
    conserved(capped, len(df))
    assert capped.stats.kept == 50
    assert any("budget_rows = 50 caps the rows" in n for n in capped.stats.extra["warnings"])
    # the cap keeps a prefix of each source's seeded order: a subset of the uncapped rows
    assert set(capped.kept["id"]) < set(res.kept["id"])


def test_bad_budget_tokens_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="budget_tokens must be >= 0.*budget_tokens = 0"):
        token_recipe(tmp_path, -1)


def test_card_states_the_budget_unit(tmp_path: Path) -> None:
    recipe, df = token_recipe(tmp_path, 2000), token_pool()
    stats = {"variant": "t", "description": "", "config_hash": "abc", "recipe_file": "r.toml", "heldout_dir": "/x/h",
             "budget_rows": 10_000, "budget_tokens": 2000, "budget_unit": "tokens", "rows": 3, "sources": {},
             "mix": {"a": 2, "b": 1}, "targets": {"a": 30, "b": 90}, "token_targets": {"a": 1000, "b": 600},
             "tokens": {"a": 1010, "b": 603}, "warnings": [], "seconds": 1.0, "stages": []}
    card = render_card(recipe, stats, df, "f.png")
    assert "Budget in **tokens**" in card and "| a | 2 | 1,010 | 62.6% | 1,000 |" in card
    assert "token budget 2,000, at most 10,000 rows" in card
    rows_card = render_card(recipe, {**stats, "budget_unit": "rows", "budget_tokens": 0}, df, "f.png")
    assert "Budget in **rows**" in rows_card and "| a | 2 | 66.7% | 30 |" in rows_card


# ------------------------------------------------------------------ the shipped recipes


def test_shipped_variants_share_budget_heldout_and_decontam() -> None:
    """All variants of one ablation must differ only in curation, never in budget or test rows."""
    full = ["random", "dedup", "dedup-filter", "dedup-filter-ifd", "mix"]
    for group in (full, [f"demo-{n}" for n in full]):
        recipes = [load_recipe(REPO / "configs/variants" / f"{n}.toml") for n in group]
        assert len({r.budget_rows for r in recipes}) == 1, group
        assert len({json.dumps(r.heldout.__dict__, sort_keys=True) for r in recipes}) == 1
        assert len({r.decontam.ngram for r in recipes}) == 1
        assert [r.name for r in recipes] == group
    mix = load_recipe(REPO / "configs/variants/mix.toml")
    assert set(mix.shares()) == {"sharegpt", "gsm8k", "alpaca", "self_instruct"}
    assert abs(sum(mix.shares().values()) - 1) < 1e-9
    assert mix.budget_unit == "rows"
    tokens = load_recipe(REPO / "configs/variants/mix-tokens.toml")
    assert tokens.name == "mix-tokens" and tokens.budget_unit == "tokens" and tokens.budget_tokens == 250_000
    assert tokens.shares() == mix.shares() and tokens.budget_rows == 1000 > mix.budget_rows  # a looser row cap
