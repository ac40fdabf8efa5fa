"""RayExecutor == LocalExecutor: a 2-CPU local Ray cluster runs every stage kind on real shared data.

Row stages (filters, n-gram + embedding decontamination with the embedder loaded once per actor),
map_reduce (MinHash: signatures -> shuffle by band key -> candidate pairs -> greedy on the driver),
global with a row-local map (semantic dedup: embeddings on actors, kNN on the driver) and plain
global stages (exact dedup, the budget) must keep the same rows and drop them with the same reasons.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from curation.frame import prepare
from curation.recipe import (FILTER_NAMES, DecontamConfig, ExactDedupConfig, FiltersConfig, MinHashConfig,
                             SemanticDedupConfig, TestSetConfig)
from curation.sources import SourceConfig, load_source
from tests.test_curation_pipeline import finetome_fixture


def make_stages():
    """Fresh stage objects (each executor sets its own up)."""
    from curation.decontam import DecontamStage
    from curation.dedup import ExactDedupStage, MinHashStage, SemanticDedupStage
    from curation.filters import FiltersStage
    from curation.mixing import BudgetConfig, BudgetStage

    gsm = TestSetConfig(name="gsm8k_test", path="shared:gsm8k/test.jsonl", fields=["question", "answer"])
    return [
        MinHashStage(MinHashConfig(enabled=True, threshold=0.5)),
        ExactDedupStage(ExactDedupConfig(enabled=True)),
        FiltersStage(FiltersConfig(enabled=list(FILTER_NAMES))),
        DecontamStage(DecontamConfig(embed_threshold=0.95, model="m2v", include_heldout=False, test_sets=[gsm]), None),
        SemanticDedupStage(SemanticDedupConfig(enabled=True, model="m2v", threshold=0.9)),
        BudgetStage(BudgetConfig(budget_rows=60, targets={"ft": 60}, seed=3)),
    ]


def run_all(executor, frame: pl.DataFrame) -> list[tuple[str, list[int], list[tuple[str, str, str]]]]:
    out = []
    for stage in make_stages():
        res = executor.run(stage, frame)
        frame = res.kept.drop([c for c in res.kept.columns if c.startswith("__")])
        assert res.stats.rows_in == res.stats.kept + res.stats.n_dropped
        out.append((stage.name, frame["_row"].to_list(),
                    [tuple(r) for r in res.dropped.select("id", "reason", "detail").iter_rows()]))
    return out


@pytest.mark.e2e
@pytest.mark.slow  # not yet run on this machine (starved CPUs): drop this mark once it has passed
def test_ray_executor_keeps_and_drops_like_local(curation_home: Path, shared_data: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from curation.executors import LocalExecutor, RayExecutor

    data = finetome_fixture(shared_data, tmp_path / "ft.parquet")
    frame = prepare(load_source(SourceConfig(name="ft", kind="finetome", path=str(data))).table)
    local = run_all(LocalExecutor(), frame)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ex = RayExecutor(workers=2, block_rows=40)  # several blocks per stage, spread over 2 actors
        distributed = run_all(ex, frame)
        ex.close()
    finally:
        ray.shutdown()
    assert [s for s, _, _ in distributed] == [s for s, _, _ in local]
    for (name, kept_l, drop_l), (_, kept_r, drop_r) in zip(local, distributed):
        assert kept_r == kept_l, name
        assert [(i, r) for i, r, _ in drop_r] == [(i, r) for i, r, _ in drop_l], name
        if name != "minhash_dedup":  # MinHash ties between two kept rows may name another (equal) row
            assert drop_r == drop_l, name
    reasons = {r for _, _, d in local for _, r, _ in d}
    # every stage kind dropped something, so the comparison is not vacuous
    assert {"near_duplicate", "refusal", "contaminated:gsm8k_test", "over_budget"} <= reasons, reasons
