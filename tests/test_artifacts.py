"""tomelab.artifacts: the one decoder of the variant / run / results layout, and the two app bugs it fixed
(a hub-id base's run path, and a sweep winner's leaderboard row looked up by its variant folder)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tomelab import lab, serving
from tomelab.artifacts import Results, Run, Variant, base_key, evals_dir, home_relative, resolve_results_dir

HUB_BASE = "SomeOrg/Tiny-Chat-v2"  # not in the registry: its folder is a slug of the hub id


def _run(home: Path, variant: str, base: str, seed: int, metrics: dict | None = None) -> Run:
    run = Run.of(variant, base, seed)
    (run.adapter).mkdir(parents=True)
    (run.adapter / "adapter_config.json").write_text("{}")
    run.config_path.write_text(json.dumps({"variant": variant, "base": base, "seed": seed}))
    run.metrics_path.write_text(json.dumps(metrics or {"final_val_loss": 2.5}))
    return run


def test_run_layout_round_trips(tmp_home: Path) -> None:
    assert base_key(HUB_BASE) == "Tiny-Chat-v2" and base_key("smollm2-135m-instruct") == "smollm2-135m-instruct"
    run = _run(tmp_home, "demo-random", HUB_BASE, 3)
    assert run.dir == tmp_home / "runs" / "demo-random" / "Tiny-Chat-v2" / "3"
    assert (run.variant, run.base_key, run.seed, run.key) == ("demo-random", "Tiny-Chat-v2", "3", "demo-random/Tiny-Chat-v2/3")
    assert run.eval_dir == evals_dir() / run.key and run.config()["base"] == HUB_BASE
    # found from the dir, its adapter folder or its runs-relative key; anything else is not a run
    for ref in (run.dir, run.adapter, run.key):
        assert Run.find(ref) == Run(run.dir.resolve())
    assert Run.find(tmp_home / "runs" / "nope") is None and Run.find("smollm2-135m-instruct") is None
    assert [r.dir for r in Run.finished()] == [run.dir]
    assert home_relative(run.dir) == "runs/demo-random/Tiny-Chat-v2/3" and home_relative("/elsewhere/x") == "/elsewhere/x"
    outside = Run(Path("/tmp/not-under-home/7"))
    assert outside.key.startswith("path/") and outside.key.endswith("-7")


def test_variant_and_results_folders(tmp_home: Path) -> None:
    v = Variant("demo-random")
    assert v.heldout_dir() is None and Variant.all() == []
    v.dir.mkdir(parents=True)
    v.stats_path.write_text(json.dumps({"variant": v.name, "heldout_dir": "heldout/abc"}))
    (v.review_dir).mkdir()
    (v.review_dir / "pushed.parquet").write_text("")
    assert v.heldout_dir() == tmp_home / "heldout" / "abc"  # relative to the artefact home
    assert Variant.all() == [v] and Variant.all("review/pushed.parquet") == [v] and Variant.all("train.parquet") == []
    assert resolve_results_dir("home:results/demo") == tmp_home / "results" / "demo"
    assert resolve_results_dir("results/demo") == Path("results/demo")
    r = Results.at("home:results/demo")
    assert r.winner_path == tmp_home / "results" / "demo" / "winner.json"
    assert Results.winner_system({"variant": "v.b1", "system": "v"}) == "v"
    assert Results.winner_system({"variant": "v"}) == "v"  # files older than the `system` key


def test_hub_id_base_winner_resolves_to_its_run(tmp_home: Path, tmp_path: Path) -> None:
    """The run folder of a hub-id base is its slug: the app serves the recorded run, never one rebuilt from `base`."""
    run = _run(tmp_home, "demo-random", HUB_BASE, 0)
    results = tmp_path / "results"
    results.mkdir()
    for run_dir in (home_relative(run.dir), f"/machine-a/artifacts/{home_relative(run.dir)}"):  # this clone, another
        (results / "winner.json").write_text(json.dumps({"variant": "demo-random", "base": HUB_BASE, "seed": 0,
                                                         "run_dir": run_dir}))
        w = serving.load_winner(results)
        assert w.ok and w.run == run.dir, w.reason
    entries = serving.model_entries([w], "smollm2-135m-instruct", runs_dir=tmp_home / "runs")
    assert [e.kind for e in entries] == ["winner", "base", "base"] and Path(entries[0].ref) == run.dir


def _leaderboard(results: Path, rows: list[tuple[str, float]]) -> None:
    results.mkdir(parents=True)
    with (results / "leaderboard.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "metric", "n_seeds", "mean"])
        w.writerows([s, "val_nll", 2, m] for s, m in rows)


def test_sweep_winner_shows_its_arms_leaderboard_row(tmp_home: Path, tmp_path: Path) -> None:
    """A sweep's winner trains in `<variant>@<sweep>.<arm>`, but its leaderboard row is the arm's name."""
    from tomelab.chat_cli import load_app_module

    app = load_app_module()
    variant = "demo-random@sweep-lr.lr-high"
    run = _run(tmp_home, variant, "smollm2-135m-instruct", 0)
    results = tmp_path / "results" / "sweeps" / "sweep-lr"
    _leaderboard(results, [("lr-low", 1.9876), ("lr-high", 1.2345)])
    (results / "winner.json").write_text(json.dumps({"variant": variant, "system": "lr-high", "base": "smollm2-135m-instruct",
                                                     "seed": 0, "run_dir": home_relative(run.dir)}))
    entry = serving.model_entries([serving.load_winner(results)], "smollm2-135m-instruct")[0]
    assert lab.leaderboard_rows(results, entry.variant) == []  # the old lookup found nothing
    assert entry.leaderboard_system == "lr-high"
    info = app.info_markdown(entry, app.AppConfig(data_cards_dir=str(tmp_path / "cards")), [])
    assert "row `lr-high`" in info and "**1.234**" in info and "1.988" not in info
