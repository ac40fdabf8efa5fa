"""Every stage's stats carry `seconds`, measured by the runner around the whole stage (what bench/scale.py
divides by the rows to size a cluster), also for a stage that does not time itself."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from curation.executors import LocalExecutor
from curation.frame import StageResult, split_result
from curation.pipeline import StageRunner, curate
from curation.stage import Stage
from tests.test_curation_pipeline import FULL, write_recipe

NAP = 0.05


class SlowGlobal(Stage):
    """Sleeps, drops the rows with `_row % m == k` (cfg = (m, k)) and reports 0 seconds, as a stage that
    forgot its timer would."""

    name = "slow_global"
    kind = "global"

    def run(self, frame: pl.DataFrame) -> StageResult:
        time.sleep(NAP)
        m, k = self.cfg
        return split_result(frame, self.name, ["toy" if r % m == k else None for r in frame["_row"].to_list()],
                            [""] * len(frame), seconds=0.0)


class SlowRow(SlowGlobal):
    name = "slow_row"
    kind = "row"


class Busy(SlowGlobal):
    """Burns NAP seconds of this process's CPU (however loaded the machine is), keeps every row."""

    name = "busy"

    def run(self, frame: pl.DataFrame) -> StageResult:
        t0 = time.process_time()
        while time.process_time() - t0 < NAP:
            pass
        return split_result(frame, self.name, [None] * len(frame), [""] * len(frame), seconds=0.0)


def test_runner_times_every_stage_and_a_reused_stage_keeps_its_seconds(tmp_path: Path) -> None:
    df = pl.DataFrame({"_row": list(range(40)), "id": [f"r{i}" for i in range(40)], "source": ["toy"] * 40})
    stages = [SlowRow((2, 1)), SlowGlobal((4, 0))]  # keeps 20, then 10
    first = StageRunner(tmp_path, "fp0", False, LocalExecutor(block_rows=10))  # 4 blocks: 4 naps
    first.run_all(stages, df)
    row, glob = first.stats
    assert row.stage == "slow_row" and row.seconds >= 4 * NAP and row.kept == 20
    assert glob.stage == "slow_global" and glob.seconds >= NAP and glob.kept == 10
    again = StageRunner(tmp_path, "fp0", False, LocalExecutor())
    again.run_all(stages, df)
    assert [(s.seconds, s.extra.get("resumed")) for s in again.stats] == [(row.seconds, True), (glob.seconds, True)]


def test_runner_records_the_cpu_seconds_of_a_stage(tmp_path: Path) -> None:
    df = pl.DataFrame({"_row": list(range(8)), "id": [f"r{i}" for i in range(8)], "source": ["toy"] * 8})
    runner = StageRunner(tmp_path, "fp1", False, LocalExecutor())
    runner.run_all([SlowGlobal((2, 1)), Busy((1, 1))], df)
    sleepy, busy = runner.stats
    assert 0 <= sleepy.extra["cpu_seconds"] < NAP <= sleepy.seconds  # asleep: wall time, hardly any CPU
    assert busy.extra["cpu_seconds"] >= NAP and busy.seconds >= NAP


def test_each_stage_stat_of_a_curate_carries_non_negative_seconds(curation_home: Path, shared_data: Path,
                                                                   tmp_path: Path) -> None:
    from tests.test_curation_pipeline import finetome_fixture

    data = finetome_fixture(shared_data, tmp_path / "finetome.parquet")
    out = curate(write_recipe(tmp_path, "t-timing", data, FULL), progress=False)
    stats = json.loads((out / "stats.json").read_text())
    stages = [s for s in stats["stages"] if not s["stage"].startswith("load:")]
    assert [s["stage"] for s in stages] == ["heldout", "exact_dedup", "minhash_dedup", "filters", "decontam",
                                           "semantic_dedup", "quality", "budget"]
    for s in stats["stages"]:
        assert isinstance(s["seconds"], float) and s["seconds"] >= 0, s
    for s in stages:
        assert isinstance(s["extra"]["cpu_seconds"], float) and s["extra"]["cpu_seconds"] >= 0, s
    assert 0 < sum(s["seconds"] for s in stages) <= stats["seconds"]
