"""Ablation comparison, reports, winner and resume, on synthetic per-item eval outputs (no model).

The per-item files have exactly the shape `tomelab eval` writes, so `compare` and `write_results` run
unchanged; the model-side work (`_evaluate_set`, `train_run`, `curate`) is replaced by fakes that
count their calls, which is what resume must save.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from eval import ablate
from eval.ablate import BASE_ROW, System, compare, pick_winner, write_results
from eval.config import AblationConfig, Arm, WinnerRule
from eval.evaluate import evals_dir, run_key
from tomelab import paths
from tomelab.config import load_config
from tomelab.errors import ConfigError, TomelabError
from tomelab.io import write_jsonl

N_ITEMS = 60
SEEDS = [0, 1, 2]


def _write_eval(ref: str, nll: np.ndarray, ifeval: np.ndarray) -> None:
    """Per-item outputs for one model, as `evaluate` writes them (ids shared by every model)."""
    d = evals_dir() / run_key(ref)
    # test items and, with the same scores shifted by 0.01, validation items (where winners are chosen)
    write_jsonl(d / "heldout.jsonl", [{"id": f"h{i}", "scores": {"nll": float(v), "n_tokens": 10 + i % 7}}
                                      for i, v in enumerate(nll)]
                + [{"id": f"val:h{i}", "scores": {"nll": float(v) + 0.01, "n_tokens": 10 + i % 7, "split": "val"}}
                   for i, v in enumerate(nll)])
    write_jsonl(d / "ifeval.jsonl", [{"id": f"f{i}", "scores": {"prompt_strict": float(v), "inst_strict": float(v),
                                                                 "n_inst": 1 + i % 3}} for i, v in enumerate(ifeval)])


def _make_systems(home: Path) -> list[System]:
    """base (deterministic), random (baseline), better (NLL -0.2 on every item), same (noise only)."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(1.0, 3.0, N_ITEMS)  # large item-to-item spread, shared by all systems
    passes = rng.random(N_ITEMS) < 0.3
    systems = [System(BASE_ROW, ["smollm2-135m-instruct"], [None], trained=False)]
    _write_eval("smollm2-135m-instruct", difficulty + 0.5, passes.astype(float))
    for name, shift in (("random", 0.0), ("better", -0.2), ("same", 0.0)):
        s = System(name, [], [])
        for seed in SEEDS:
            rd = home / "runs" / name / "smollm2-135m-instruct" / str(seed)
            rd.mkdir(parents=True)
            flip = rng.random(N_ITEMS) < 0.05
            _write_eval(str(rd), difficulty + shift + rng.normal(0, 0.02, N_ITEMS), (passes ^ flip).astype(float))
            s.refs.append(str(rd))
            s.seeds.append(seed)
            s.run_dirs[seed] = str(rd)
        systems.append(s)
    return systems


def test_compare_finds_the_real_gain_and_not_the_noise(tmp_home: Path):
    systems = _make_systems(tmp_home)
    rows = {(r.system, r.metric): r for r in compare(systems, "random", ["heldout_nll", "ifeval_prompt_strict"], ci=True)}
    better, same = rows[("better", "heldout_nll")], rows[("same", "heldout_nll")]
    assert better.delta.estimate == pytest.approx(-0.2, abs=0.02)
    assert better.delta.hi < 0  # the CI excludes zero: a real gain
    assert same.delta.lo < 0 < same.delta.hi  # noise only: the CI covers zero
    assert better.n_seeds == 3 and better.n_items == N_ITEMS
    assert better.spread["std"] < 0.01  # seed-to-seed spread is the injected noise
    assert rows[(BASE_ROW, "heldout_nll")].n_seeds == 1  # the base model is a row of its own
    assert rows[("random", "heldout_nll")].delta is None  # the baseline is not compared with itself
    assert 0 < better.delta.mde < 0.1 and better.p_holm is not None and better.p_holm < 0.05
    assert same.delta.bound >= abs(same.delta.estimate)  # a null is stated as a bound


def test_nll_is_token_weighted(tmp_home: Path):
    systems = _make_systems(tmp_home)
    rows = {(r.system, r.metric): r for r in compare(systems, "random", ["heldout_nll"], ci=False)}
    per_item = [json.loads(x)["scores"] for x in (evals_dir() / run_key(systems[0].refs[0]) / "heldout.jsonl").open()]
    per_item = [s for s in per_item if s.get("split", "test") == "test"]  # heldout_nll: test items only
    w = np.array([s["n_tokens"] for s in per_item])
    v = np.array([s["nll"] for s in per_item])
    assert rows[(BASE_ROW, "heldout_nll")].mean == pytest.approx(float((v * w).sum() / w.sum()))


def test_leaderboard_csv_plots_and_winner(tmp_home: Path, tmp_path: Path):
    systems = _make_systems(tmp_home)
    cfg = AblationConfig(variants=["random", "better", "same"], train_config="x.toml", eval_config="y.toml",
                         baseline="random", seeds=SEEDS, results_dir=str(tmp_path / "results"),
                         metrics=["heldout_nll", "val_nll", "ifeval_prompt_strict", "ifeval_inst_strict"],
                         winner=WinnerRule(metric="val_nll", tie_breaker="val_nll"))
    out = write_results(cfg, Path("configs/ablation.toml"), systems, {}, "random")
    md = (out / "leaderboard.md").read_text()
    assert "| better | variant | 3 |" in md and f"| {BASE_ROW} | variant | - |" in md
    assert "**-0.2" in md  # the real gain is bold (its CI excludes 0)
    with (out / "leaderboard.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 * 4  # systems x metrics
    assert {"mde", "p_holm", "bound", "answer_tokens", "precision"} <= set(table[0])
    better = next(r for r in table if r["system"] == "better" and r["metric"] == "heldout_nll")
    assert float(better["delta_hi"]) < 0 and float(better["delta_lo"]) < float(better["delta_hi"])
    for png in ("metrics.png", "loss_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    win = json.loads((out / "winner.json").read_text())
    assert {"variant", "base", "seed", "run_dir", "model_dir", "metrics", "rule"} <= set(win)
    assert win["variant"] == "better" and win["seed"] in SEEDS
    assert Path(win["run_dir"]).name == str(win["seed"])
    assert not Path(win["run_dir"]).is_absolute() and win["run_dir"].startswith("runs/")  # relative to the home
    assert "val_nll" in win["rule"]


def test_curve_plot_places_arms_on_the_swept_training_key(tmp_home: Path, tmp_path: Path, monkeypatch):
    from training.config import TrainConfig

    systems = _make_systems(tmp_home)
    for s, budget in zip(systems[1:], (1000, 3000, 12000)):
        s.train_config = TrainConfig(token_budget=budget)
    cfg = AblationConfig(variants=["random"], train_config="x.toml", eval_config="y.toml", baseline="random",
                         seeds=SEEDS, results_dir=str(tmp_path / "results"),
                         metrics=["heldout_nll", "val_nll", "ifeval_prompt_strict"], curve="token_budget",
                         winner=WinnerRule(metric="val_nll", tie_breaker="val_nll"),
                         arms=[Arm(name) for name in ("random", "better", "same")])
    seen = {}
    real_errorbar = __import__("matplotlib.axes", fromlist=["Axes"]).Axes.errorbar

    def spy(ax, x, y, *a, **k):
        seen["x"] = [float(v) for v in x]  # the last call: the curve plot (bars draw error bars too)
        return real_errorbar(ax, x, y, *a, **k)

    monkeypatch.setattr("matplotlib.axes.Axes.errorbar", spy)
    out = write_results(cfg, Path("configs/sweeps/token-budget.toml"), systems, {}, "random")
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["x"] == [0.0, 1000.0, 3000.0, 12000.0]  # the untouched base model is the 0-token point
    with pytest.raises(ValueError, match="numeric training key"):
        AblationConfig(variants=["random"], train_config="x.toml", eval_config="y.toml", baseline="a", seeds=SEEDS,
                       curve="packing", arms=[Arm("a")])


def test_winner_tie_is_broken_by_the_tie_breaker(tmp_home: Path):
    systems = _make_systems(tmp_home)
    rows = compare(systems, "random", ["val_nll", "ifeval_prompt_strict"], ci=False)
    # On IFEval the three trained systems are within a few points: a wide tolerance makes them all tie,
    # so the tie-breaker (validation NLL, lower is better) decides.
    rule = WinnerRule(metric="ifeval_prompt_strict", tie_breaker="val_nll", tie_tolerance=1.0)
    assert not rule.on_validation  # chosen on test items: the leaderboard says so
    win, _, _ = pick_winner(rows, systems, rule)
    assert win.name == "better"
    # the untouched base model is never the winner, even when it is best on the rule's metric
    assert WinnerRule().on_validation
    assert pick_winner(rows, systems, WinnerRule(metric="val_nll", tie_breaker="val_nll"))[0].trained


def test_mismatched_items_are_only_compared_on_shared_items(tmp_home: Path):
    systems = _make_systems(tmp_home)
    # one run scored fewer items (e.g. an older, smaller eval config): the comparison uses the intersection
    d = evals_dir() / run_key(systems[1].refs[0])
    lines = (d / "heldout.jsonl").read_text().splitlines()[:40]
    (d / "heldout.jsonl").write_text("\n".join(lines) + "\n")
    rows = compare(systems, "random", ["heldout_nll"], ci=False)
    assert {r.n_items for r in rows} == {40}


def test_seed_count_below_two_with_ci_is_a_config_error(tmp_path: Path):
    bad = tmp_path / "abl.toml"
    bad.write_text('variants = ["random"]\nbaseline = "random"\nseeds = [0]\ntrain_config = "t.toml"\n'
                   'eval_config = "e.toml"\nci = true\n')
    with pytest.raises(ConfigError, match=r"ci = true needs >= 2 seeds"):
        load_config(bad, AblationConfig)


def test_unknown_train_override_names_the_key(tmp_path: Path):
    cfg = load_config("configs/ablation.toml", AblationConfig)
    cfg.train = {**cfg.train, "lora_rnak": 8}
    with pytest.raises(ConfigError, match="lora_rnak.*lora_r"):
        ablate.train_config_for(cfg)


# --- resume: a killed ablation re-run does only the missing work ------------------------------------


class _Fakes:
    """Stand-ins for curate / train_run / the model side of evaluate, counting real work done."""

    def __init__(self, home: Path, crash_on_train: int | None):
        self.home, self.crash_on_train = home, crash_on_train
        self.trained: list[str] = []
        self.evaluated: list[str] = []
        self.train_calls = 0

    def curate(self, recipe_path, force=False, progress=True, overrides=None):
        name = Path(recipe_path).stem
        vdir = paths.variants_dir() / name
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "stats.json").write_text(json.dumps({"variant": name, "heldout_dir": str(self.home / "heldout" / "k"),
                                                     "stages": [{"stage": "load", "kept": 10}, {"stage": "budget", "kept": 5}]}))
        return vdir

    def train_run(self, variant, base, seed, cfg, **kw):
        self.train_calls += 1
        if self.crash_on_train is not None and self.train_calls == self.crash_on_train:
            raise KeyboardInterrupt("killed")
        rd = paths.runs_dir() / variant / base / str(seed)
        if not (rd / "metrics.json").is_file():
            rd.mkdir(parents=True, exist_ok=True)
            (rd / "metrics.json").write_text(json.dumps({"seed": seed}))
            (rd / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0 + seed}) + "\n")
            self.trained.append(f"{variant}/{seed}")
        return rd

    def load_model(self, ref, dtype):
        return object(), object()

    def evaluate_set(self, name, items, cfg, model, tok, out_dir, tag, pool=None, engine=None):
        self.evaluated.append(f"{out_dir.name}:{name}")
        shift = 0.1 * ("dedup" in str(out_dir))
        return [{"id": f"i{i}", "output": "x", "reference": "y",
                 "scores": {"nll": 1.0 + i / 10 - shift, "n_tokens": 5}} for i in range(8)] + [
                {"id": f"val:i{i}", "output": None, "reference": "y",
                 "scores": {"nll": 1.0 + i / 10 - shift, "n_tokens": 5, "split": "val"}} for i in range(8)]


def _fake_world(monkeypatch, tmp_path: Path, fakes: _Fakes, n_items: int, head: str) -> Path:
    """Patch the model side with `fakes` and write an ablation config (`head`: its first keys)."""
    import curation.pipeline
    import training.train
    from eval import evaluate as ev

    def items(prefix: str, split: str | None) -> list:
        extra = {"conversation": [], **({"split": split} if split else {})}
        return [ev.EvalItem(f"{prefix}i{i}", [{"role": "user", "content": "q"}], "a", dict(extra)) for i in range(n_items)]

    monkeypatch.setattr(curation.pipeline, "curate", fakes.curate)
    monkeypatch.setattr(training.train, "train_run", fakes.train_run)
    monkeypatch.setattr(ev, "load_model_for_eval", fakes.load_model)
    monkeypatch.setattr(ev, "_evaluate_set", fakes.evaluate_set)
    monkeypatch.setattr(ev, "_load_set", lambda name, cfg, hd: ev.LoadedSet(items("", None), n_items, []))
    monkeypatch.setattr(ev, "load_nll_extras", lambda hd, sc: items("val:", "val"))
    (tmp_path / "eval.toml").write_text("[heldout]\nval = true\n[ifeval]\nenabled = false\n[gsm8k]\nenabled = false\n")
    (tmp_path / "train.toml").write_text("token_budget = 100\n")
    cfg = tmp_path / "abl.toml"
    cfg.write_text(head + f'train_config = "{tmp_path / "train.toml"}"\neval_config = "{tmp_path / "eval.toml"}"\n'
                   f'results_dir = "{tmp_path / "results"}"\nmetrics = ["heldout_nll", "val_nll"]\n'
                   f'[winner]\nmetric = "val_nll"\ntie_breaker = "val_nll"\n')
    return cfg


def _run(monkeypatch, tmp_path: Path, fakes: _Fakes, *, reverse: bool = False) -> Path:
    head = 'variants = ["random", "dedup"]\nbaseline = "random"\nseeds = [0, 1]\n'
    return ablate.run_ablation(_fake_world(monkeypatch, tmp_path, fakes, 8, head), reverse=reverse)


def test_killed_ablation_resumes_where_it_stopped(tmp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    first = _Fakes(tmp_home, crash_on_train=3)  # killed while training the 3rd of 4 runs (random, seed 1)
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, tmp_path, first)
    assert first.trained == ["random/0", "dedup/0"]
    assert sorted(first.evaluated) == ["0:heldout", "0:heldout", "smollm2-135m-instruct:heldout"]

    again = _Fakes(tmp_home, crash_on_train=None)
    out = _run(monkeypatch, tmp_path, again)
    assert again.trained == ["random/1", "dedup/1"]  # finished runs are not retrained
    assert again.evaluated == ["1:heldout", "1:heldout"]  # nor re-evaluated (base included)
    win = json.loads((out / "winner.json").read_text())
    assert win["variant"] == "dedup"  # lower NLL by construction
    assert (out / "funnel.png").is_file() and (out / "leaderboard.md").is_file()

    third = _Fakes(tmp_home, crash_on_train=None)
    _run(monkeypatch, tmp_path, third)
    assert third.trained == [] and third.evaluated == []  # a finished ablation re-run only rewrites reports


def test_reverse_worker_walks_runs_last_to_first_and_agrees(tmp_home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """`--reverse` (the second worker) starts at the last run; its leaderboard equals the forward one."""
    rev = _Fakes(tmp_home, crash_on_train=3)
    with pytest.raises(KeyboardInterrupt):
        _run(monkeypatch, tmp_path, rev, reverse=True)
    assert rev.trained == ["dedup/1", "random/1"]
    fwd = _Fakes(tmp_home, crash_on_train=None)
    out = _run(monkeypatch, tmp_path, fwd)
    assert fwd.trained == ["random/0", "dedup/0"]  # the reverse worker's runs are reused
    forward_board = (out / "leaderboard.csv").read_text()
    _run(monkeypatch, tmp_path, _Fakes(tmp_home, crash_on_train=None), reverse=True)
    assert (out / "leaderboard.csv").read_text() == forward_board  # seeds re-sorted: same table


def test_two_processes_take_turns_on_one_run(tmp_path: Path):
    """The per-run lock: a second holder waits until the first leaves."""
    import threading
    import time

    from tomelab.io import exclusive

    events: list[str] = []

    def worker(name: str, hold: float) -> None:
        with exclusive(tmp_path / "run", "train"):
            events.append(f"{name} in")
            time.sleep(hold)
            events.append(f"{name} out")

    a = threading.Thread(target=worker, args=("a", 0.3))
    a.start()
    time.sleep(0.05)
    b = threading.Thread(target=worker, args=("b", 0.0))
    b.start()
    a.join(), b.join()
    assert events == ["a in", "a out", "b in", "b out"]


def test_eval_of_a_missing_run_is_one_clear_line(tmp_home: Path, capsys: pytest.CaptureFixture):
    from tomelab.cli import main

    rc = main(["eval", str(tmp_home / "runs" / "nope" / "smollm2-135m-instruct" / "0"), "--config", "configs/eval/smoke.toml"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not exist" in err and "artifacts/runs" in err


def test_run_key_rejects_a_missing_path():
    with pytest.raises(TomelabError, match="does not exist"):
        run_key("artifacts/runs/nope/base/0")


# --- model-centric sweeps (issue 9): arms over the same machinery ----------------------------------


@pytest.mark.parametrize("path", sorted(Path("configs/sweeps").glob("*.toml")), ids=lambda p: p.stem)
def test_sweep_configs_load_and_plan(path: Path):
    cfg = load_config(path, AblationConfig)
    systems = ablate.plan_systems(cfg, path, {v: v for v in cfg.variants})
    assert [s.name for s in systems] == [a.name for a in cfg.arms] and cfg.baseline in [s.name for s in systems]
    base_arm = next(s for s in systems if s.name == cfg.baseline)
    for s, arm in zip(systems, cfg.arms):
        # arms with training overrides get their own run folders; others reuse the ablation's runs
        assert ("@" in s.train_variant) == bool(arm.train)
        for key, value in arm.train.items():
            assert getattr(s.train_config, key) == value
        if not arm.train and s.base == base_arm.base:
            assert s.train_config == base_arm.train_config
    if "base-model" in path.stem or "hub" in path.stem:
        assert "heldout_nll" not in cfg.metrics  # per-token NLL is not comparable across tokenizers


@pytest.mark.parametrize(("ablation", "sweep_name"), [("ablation-small", "lora-rank"), ("ablation-small", "learning-rate")])
def test_sweep_baseline_arm_reuses_the_ablation_runs(ablation: str, sweep_name: str):
    abl = load_config(f"configs/{ablation}.toml", AblationConfig)
    sweep = load_config(f"configs/sweeps/{sweep_name}.toml", AblationConfig)
    systems = ablate.plan_systems(sweep, Path(f"{sweep_name}.toml"), {v: v for v in sweep.variants})
    base_arm = next(s for s in systems if s.name == sweep.baseline)
    assert base_arm.train_config == ablate.train_config_for(abl)  # same config hash -> train_run skips it
    assert set(sweep.variants) <= set(abl.variants) and sweep.eval_config == abl.eval_config


def test_bad_arm_configs_are_config_errors(tmp_path: Path):
    p = tmp_path / "s.toml"
    head = 'variants = ["v"]\ntrain_config = "t.toml"\neval_config = "e.toml"\nseeds = [0, 1]\n'
    p.write_text(head + 'baseline = "nope"\n[[arms]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="baseline 'nope' must be one of the arm names"):
        load_config(p, AblationConfig)
    p.write_text(head + 'baseline = "a"\n[[arms]]\nname = "a"\n[[arms]]\nname = "a"\n')
    with pytest.raises(ConfigError, match="unique"):
        load_config(p, AblationConfig)
    p.write_text(head + 'baseline = "a"\n[[arms]]\nname = "a"\nvariant = "other"\n')
    with pytest.raises(ConfigError, match="not in variants"):
        load_config(p, AblationConfig)


def test_alias_variant_points_at_the_same_data(tmp_home: Path):
    src = paths.variants_dir() / "v"
    src.mkdir(parents=True)
    (src / "train.parquet").write_bytes(b"PAR1data")
    (src / "stats.json").write_text(json.dumps({"variant": "v", "heldout_dir": "/h"}))
    name = ablate._alias_variant("v", "v@sweep.r4")
    dst = paths.variants_dir() / name
    assert (dst / "train.parquet").read_bytes() == b"PAR1data"
    st = json.loads((dst / "stats.json").read_text())
    assert st["heldout_dir"] == "/h" and st["alias_of"] == "v" and st["variant"] == "v@sweep.r4"
    ablate._alias_variant("v", "v@sweep.r4")  # idempotent (resume)


def test_cross_tokenizer_nll_is_refused(tmp_home: Path):
    systems = _make_systems(tmp_home)
    d = evals_dir() / run_key(systems[2].refs[0])
    recs = [json.loads(x) for x in (d / "heldout.jsonl").read_text().splitlines()]
    for r in recs:
        r["scores"]["n_tokens"] += 1  # another tokenizer counts other tokens
    write_jsonl(d / "heldout.jsonl", recs)
    rows = compare(systems, "random", ["heldout_nll", "ifeval_prompt_strict"], ci=False)
    assert {r.metric for r in rows} == {"ifeval_prompt_strict"}


# --- blocks and controls (issue 15): every block its own draw, controls judged on the first lines ------------


class _BlockFakes(_Fakes):
    """Per-item NLL = item difficulty + the variant's true effect + a per-block shift + item noise."""

    EFFECT = {"random": 0.0, "random-aa": 0.0, "dedup": -0.04, "random@half": 0.06}

    def __init__(self, home: Path):
        super().__init__(home, crash_on_train=None)
        self.curated: list[tuple[str, dict]] = []

    def curate(self, recipe_path, force=False, progress=True, overrides=None):
        self.curated.append((Path(recipe_path).stem, dict(overrides or {})))
        name = (overrides or {}).get("name", Path(recipe_path).stem)
        vdir = paths.variants_dir() / name
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "stats.json").write_text(json.dumps({"variant": name, "heldout_dir": str(self.home / "heldout" / "k"),
                                                     "stages": [{"stage": "load", "kept": 10}]}))
        return vdir

    def evaluate_set(self, name, items, cfg, model, tok, out_dir, tag, pool=None, engine=None):
        variant, seed = out_dir.parent.parent.name, out_dir.name
        key = variant.split(".b")[0] + ("@half" if variant.endswith("@half") else "")
        block = 0.0 if out_dir.parent.name == "base" else 0.02 * np.sin(3 * int(seed) + 1)  # shared by a block's runs
        rng = np.random.default_rng(abs(hash((variant, seed))) % (1 << 32))
        effect = self.EFFECT.get(key, 0.3) if block or out_dir.parent.name != "base" else 0.3
        recs = []
        for split in ("test", "val"):
            for i in range(40):
                nll = 1.0 + (i % 9) / 5 + effect + block + rng.normal(0, 0.01)
                recs.append({"id": ("val:" if split == "val" else "") + f"i{i}", "output": None, "reference": "y",
                             "scores": {"nll": nll, "n_tokens": 5 + i % 4, "split": split}})
        return recs


def test_blocks_pair_draws_and_the_controls_are_judged_first(tmp_home: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    fakes = _BlockFakes(tmp_home)
    head = ('variants = ["random", "dedup"]\nbaseline = "random"\nseeds = [0, 1, 2, 3, 4]\ndraw_rows = 50\n'
            'negative_control = true\npositive_control = true\n')
    cfg = _fake_world(monkeypatch, tmp_path, fakes, 40, head)
    out = ablate.run_ablation(cfg)
    # each block is its own draw; the A/A control draws independently with the same training seed
    draws = {(o["name"], o["draw_seed"], o["seed"]) for _, o in fakes.curated}
    assert ("random.b3", 3, 3) in draws and ("dedup.b3", 3, 3) in draws
    assert ("random-aa.b3", 3 + ablate.AA_DRAW_OFFSET, 3) in draws
    assert sorted(fakes.trained)[:2] == ["dedup.b0/0", "dedup.b1/1"] and "random.b2@half/2" in fakes.trained
    md = (out / "leaderboard.md").read_text().splitlines()
    assert md[2].startswith("- **Positive control `random-half` detected**")
    assert md[3].startswith("- **Negative control (A/A) `random-aa` covers 0**")
    assert any("`dedup` vs `random`" in line and "better" in line for line in md[:8])
    with (out / "leaderboard.csv").open() as f:
        table = {(r["system"], r["metric"]): r for r in csv.DictReader(f)}
    half, aa = table[("random-half", "heldout_nll")], table[("random-aa", "heldout_nll")]
    assert half["role"] == "positive control" and float(half["delta_lo"]) > 0
    assert float(aa["delta_lo"]) < 0 < float(aa["delta_hi"]) and float(aa["mde"]) > 0
    win = json.loads((out / "winner.json").read_text())
    assert win["system"] == "dedup" and win["variant"].startswith("dedup.b")  # controls never win
    assert (out / "deltas.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_at_different_precisions_are_not_compared(tmp_home: Path, tmp_path: Path):
    systems = _make_systems(tmp_home)
    for s in systems[1:]:
        for i, rd in enumerate(s.refs):
            (Path(rd) / "metrics.json").write_text(json.dumps({"base_dtype": "float32" if i else "bfloat16"}))
    cfg = AblationConfig(variants=["random", "better", "same"], train_config="x.toml", eval_config="y.toml",
                         baseline="random", seeds=SEEDS, results_dir=str(tmp_path / "results"),
                         metrics=["heldout_nll", "val_nll"], winner=WinnerRule(metric="val_nll", tie_breaker="val_nll"))
    with pytest.raises(TomelabError, match="different precisions.*bfloat16.*Pin `precision`"):
        write_results(cfg, Path("configs/ablation.toml"), systems, {}, "random")
    for s in systems[1:]:
        for rd in s.refs:
            (Path(rd) / "metrics.json").write_text(json.dumps({"base_dtype": "float32", "loss_tokens_seen": 900,
                                                               "prompt_tokens_seen": 600}))
    out = write_results(cfg, Path("configs/ablation.toml"), systems, {}, "random")
    assert "Precision of every trained run: float32" in (out / "leaderboard.md").read_text()
    with (out / "leaderboard.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["system"] == "better")
    assert row["precision"] == "float32" and row["answer_tokens"] == "900" and row["prompt_tokens"] == "600"
