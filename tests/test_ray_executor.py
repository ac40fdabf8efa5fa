"""RayExecutor == LocalExecutor: a 2-CPU local Ray cluster curates a recipe that uses every stage kind.

Row stages run as Ray Data `map_batches`: held-out removal and the heuristic filters as tasks,
n-gram + embedding decontamination on an actor pool (the embedder loaded once per actor); MinHash
(map_reduce) as signatures -> shuffle by band key -> candidate pairs -> greedy on the driver; semantic
dedup (global with a row-local map) as embeddings on the actors and kNN on the driver; exact dedup and
the budget (global) on the driver. The variant must keep the same rows and drop the same rows at the
same stages for the same reasons as `tomelab curate --executor local`.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.pipeline import curate
from curation.recipe import load_recipe, recipe_dict
from tests.test_curation_pipeline import finetome_fixture, write_recipe
from tomelab.cli import main as tomelab_main
from tomelab.config import config_hash
from tomelab.errors import ConfigError

EVERY_KIND = '''
[exact_dedup]
enabled = true
[minhash]
enabled = true
threshold = 0.5
[semantic_dedup]
enabled = true
model = "m2v"
threshold = 0.9
[filters]
enabled = ["length", "language", "repetition", "refusal", "broken_turns", "truncated"]
'''


def with_light_edits(path: Path, n: int = 3) -> Path:
    """The fixture plus a one-word edit of each of its `n` longest answers (worse score): near-duplicates
    that exact dedup keeps and MinHash drops."""
    rows = pq.read_table(path).to_pylist()
    longest = sorted(range(len(rows)), key=lambda i: -len(rows[i]["conversations"][1]["value"]))[:n]
    for i in longest:
        (h, g) = rows[i]["conversations"]
        words = g["value"].split(" ")
        words.insert(len(words) // 2, "really")
        rows.append({**rows[i], "conversations": [h, {**g, "value": " ".join(words)}], "score": 1.0})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _snapshot(out: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    dropped = pl.read_parquet(out / "dropped.parquet")
    return {"executor": stats["executor"],
            "train": pl.read_parquet(out / "train.parquet")["id"].to_list(),
            "dropped": [tuple(r) for r in dropped.select("id", "stage", "reason", "detail").iter_rows()],
            "funnel": [(s["stage"], s["rows_in"], s["kept"], s["dropped"]) for s in stats["stages"]]}


@pytest.mark.e2e
def test_ray_executor_curates_like_local(ray_cluster, curation_home: Path, shared_data: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = with_light_edits(finetome_fixture(shared_data, tmp_path / "ft.parquet"))
    recipe = write_recipe(tmp_path, "every-kind", data, EVERY_KIND, budget=40)
    recipe.write_text('executor = "ray"\n' + recipe.read_text())  # top-level keys go before the first table

    on_ray = _snapshot(curate(recipe, progress=False))  # cold embedding cache: the actors embed
    assert tomelab_main(["curate", str(recipe), "--executor", "local", "--force", "-q"]) == 0
    capsys.readouterr()
    local = _snapshot(curation_home / "variants" / "every-kind")

    assert (on_ray["executor"], local["executor"]) == ("ray", "local")
    assert on_ray["train"] == local["train"]
    assert on_ray["funnel"] == local["funnel"]
    assert [d[:3] for d in on_ray["dropped"]] == [d[:3] for d in local["dropped"]]
    # MinHash ties between two kept rows of equal similarity may name another (equal) row
    assert [d for d in on_ray["dropped"] if d[1] != "minhash_dedup"] == \
        [d for d in local["dropped"] if d[1] != "minhash_dedup"]
    # every stage kind dropped something, so the comparison is not vacuous
    reasons = {(d[1], d[2]) for d in local["dropped"]}
    assert {("heldout", "heldout"), ("exact_dedup", "exact_duplicate"), ("minhash_dedup", "near_duplicate"),
            ("decontam", "contaminated:gsm8k_test"), ("budget", "over_budget")} <= reasons, reasons
    assert "filters" in {s for s, _ in reasons} and "semantic_dedup" in [f[0] for f in local["funnel"]]


def test_executor_fields_are_validated_and_left_out_of_the_hash(tmp_path: Path) -> None:
    data = tmp_path / "none.parquet"  # never read: only the recipe is loaded
    plain = write_recipe(tmp_path, "plain", data, "")
    before = config_hash(recipe_dict(load_recipe(plain)))
    for top in ('executor = "ray"\naddress = "ray://head:10001"\n', 'executor = "local"\n', 'address = "auto"\n'):
        p = write_recipe(tmp_path, "plain", data, "")
        p.write_text(top + p.read_text())
        assert config_hash(recipe_dict(load_recipe(p))) == before, top  # where it runs is not what it keeps
    # the pre-executor hash: every Recipe field except the run-only ones, as config_hash(recipe) saw them
    assert "executor" not in recipe_dict(load_recipe(plain)) and "address" not in recipe_dict(load_recipe(plain))
    for top, key in (('executor = "rya"\n', "`executor` must be one of 'local', 'ray'"),
                     ('address = "http://x"\n', "`address` must be")):
        p = write_recipe(tmp_path, "bad", data, "")
        p.write_text(top + p.read_text())
        with pytest.raises(ConfigError, match=key) as e:
            load_recipe(p)
        assert "\n" not in str(e.value) and str(p) in str(e.value)
