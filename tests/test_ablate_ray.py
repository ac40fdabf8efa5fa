"""`tomelab ablate --executor ray` builds the leaderboard the local path builds, from a tiny real grid.

Two real curated variants (with the ablation's `[recipe_overrides]` applied), the real SmolLM2-135M trained for
a few steps and scored on a handful of held-out NLL items: first every job as a Ray task on a local 2-CPU
cluster (the driver's own train_run / evaluate are made to fail, so the work must happen on the workers, under
the test's artefact home), then, with those runs moved aside, the same grid in this process. Same systems,
same numbers to float tolerance, same winner. Bad inputs (an unknown executor, a missing Ray, --reverse with
Ray, a typo in recipe_overrides, a user mistake raised inside a task) fail with one line.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from curation.recipe import load_recipe, recipe_dict
from eval import ablate, ablate_ray
from eval.config import AblationConfig
from tests.test_curation_pipeline import finetome_fixture
from tomelab.cli import main as tomelab_main
from tomelab.config import config_hash, load_config
from tomelab.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
BASE = "smollm2-135m-instruct"

TRAIN = f'''extends = "{REPO / 'configs/train/default.toml'}"
token_budget = 150
max_length = 96
batch_size = 2
eval_every = 100
save_every = 100
val_rows = 2
learning_rate = 5e-3
warmup_ratio = 0.0
precision = "fp32"
'''
EVAL = '''batch_size = 8
[heldout]
limit = 4
generate = false
val = true
reference_limit = 2
max_length = 128
[ifeval]
enabled = false
[gsm8k]
enabled = false
'''


def tiny_grid(tmp_path: Path, data: Path) -> Path:
    """Two recipes (no filter / exact dedup + filters) x seed 0 + the base model; 24 rows by `[recipe_overrides]`.
    One block keeps it inside make test's budget: each job is a real model load, and each Ray worker imports torch."""
    for name, body in (("g-random", ""), ("g-dedup", '[exact_dedup]\nenabled = true\n[filters]\nenabled = ["refusal", "length"]\n')):
        (tmp_path / f"{name}.toml").write_text(f'''budget_rows = 40
seed = 3
[[sources]]
name = "ft"
kind = "finetome"
path = "{data}"
[heldout]
test_rows = 10
val_rows = 5
seed = 11
[decontam]
enabled = false
''' + body)
    (tmp_path / "train.toml").write_text(TRAIN)
    (tmp_path / "eval.toml").write_text(EVAL)
    cfg = tmp_path / "grid.toml"
    cfg.write_text(f'''variants = ["g-random", "g-dedup"]
variants_dir = "{tmp_path}"
baseline = "g-random"
seeds = [0]
ci = false
train_config = "{tmp_path / 'train.toml'}"
eval_config = "{tmp_path / 'eval.toml'}"
results_dir = "{tmp_path / 'results'}"
metrics = ["heldout_nll", "val_nll"]
variant_prefix = "t-"
[recipe_overrides]
budget_rows = 24
[winner]
metric = "val_nll"
tie_breaker = "val_nll"
''')
    return cfg


def _board(results: Path) -> tuple[dict, dict]:
    with (results / "leaderboard.csv").open() as f:
        rows = {(r["system"], r["metric"]): r for r in csv.DictReader(f)}
    return rows, json.loads((results / "winner.json").read_text())


@pytest.mark.e2e
def test_ray_grid_gives_the_local_leaderboard(ray_cluster, tmp_home: Path, smollm2_dir: Path,
                                              shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    home = tmp_home
    cfg = tiny_grid(tmp_path, finetome_fixture(shared_data, tmp_path / "ft.parquet"))

    def not_here(*a, **k):
        raise AssertionError("a grid job ran in the driver, not on a Ray worker")

    import training.train

    too_big = tmp_path / "too-big.toml"  # a user mistake inside a task: the CLI's one line, exit 2
    too_big.write_text(f'extends = "{cfg.name}"\n[train]\ntoken_budget = 10_000_000\n')
    with monkeypatch.context() as m:  # the driver curates and reports; every job must run on the workers
        m.setattr(training.train, "train_run", not_here)
        m.setattr(ablate, "evaluate", not_here)
        capsys.readouterr()
        assert tomelab_main(["ablate", str(too_big), "--executor", "ray"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "token_budget 10,000,000 is larger than variant" in err, err
        assert tomelab_main(["ablate", str(cfg), "--executor", "ray"]) == 0, capsys.readouterr().err
    on_ray, ray_winner = _board(tmp_path / "results")
    runs = sorted(p.parent.relative_to(home / "runs").as_posix() for p in (home / "runs").glob("*/*/*/metrics.json"))
    assert runs == [f"t-g-{v}/{BASE}/0" for v in ("dedup", "random")]  # under the test's home
    assert {json.loads((home / "runs" / r / "metrics.json").read_text())["threads"] for r in runs} == {1}  # job_cpus
    for v in ("t-g-random", "t-g-dedup"):  # the override reached curation, under its own variant name
        st = json.loads((home / "variants" / v / "stats.json").read_text())
        assert st["recipe"]["budget_rows"] == 24 and st["rows"] == 24 and st["recipe_file"].endswith(v[2:] + ".toml")

    (home / "runs").rename(home / "runs-ray")  # the local path must train and evaluate everything itself
    (home / "evals").rename(home / "evals-ray")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray job: two spinning OpenMP threads crawl on a busy 2-core machine
    try:
        assert tomelab_main(["ablate", str(cfg), "--executor", "local"]) == 0
    finally:
        torch.set_num_threads(threads)
    local, local_winner = _board(tmp_path / "results")
    assert (home / "runs" / runs[0] / "metrics.json").is_file() and (home / "evals").is_dir()

    assert set(on_ray) == set(local) and {s for s, _ in local} == {"base (untouched)", "t-g-random", "t-g-dedup"}
    for key, row in local.items():  # same numbers, to float noise
        assert (on_ray[key]["n_seeds"], on_ray[key]["n_items"]) == (row["n_seeds"], row["n_items"]), key
        assert float(on_ray[key]["mean"]) == pytest.approx(float(row["mean"]), abs=1e-4), key
    for metric in ("heldout_nll", "val_nll"):  # not vacuous: the trained systems moved far beyond that tolerance
        base = float(local[("base (untouched)", metric)]["mean"])
        assert all(abs(float(local[(s, metric)]["mean"]) - base) > 2e-3 for s in ("t-g-random", "t-g-dedup")), metric
    assert local[("t-g-dedup", "heldout_nll")]["n_seeds"] == "1" and int(local[("t-g-dedup", "val_nll")]["n_items"]) > 0
    assert (ray_winner["system"], ray_winner["run_dir"]) == (local_winner["system"], local_winner["run_dir"])


def _ablate_exit(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = tomelab_main(["ablate", *argv])
    return rc, capsys.readouterr().err


def _minimal(tmp_path: Path, top: str, tables: str = "") -> Path:
    p = tmp_path / "abl.toml"
    p.write_text(top + 'variants = ["random"]\nbaseline = "random"\nseeds = [0]\nci = false\n'
                 f'train_config = "{REPO / "configs/train/small.toml"}"\neval_config = "{REPO / "configs/eval/demo.toml"}"\n'
                 + tables)
    return p


def test_bad_executor_inputs_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    rc, err = _ablate_exit([str(_minimal(tmp_path, 'executor = "spark"\n'))], capsys)
    assert rc == 2 and err.count("\n") == 1 and "`executor` must be one of 'local', 'ray'" in err
    rc, err = _ablate_exit([str(_minimal(tmp_path, 'address = "http://head"\n'))], capsys)
    assert rc == 2 and err.count("\n") == 1 and "`address` must be" in err
    ok = str(_minimal(tmp_path, ""))
    rc, err = _ablate_exit([ok, "--executor", "ray", "--reverse"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "drop --reverse" in err
    rc, err = _ablate_exit([ok, "--executor", "ray", "--address", "not an address"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--address must be" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed: `import ray` fails
    rc, err = _ablate_exit([ok, "--executor", "ray"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "pip install 'tomelab[scale]'" in err


def test_job_env_carries_the_home_and_the_threads(tmp_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOMELAB_PRECISION", "fp32")
    env = ablate_ray.job_env(3)
    assert env["TOMELAB_HOME"] == str(tmp_home.resolve()) and Path(env["TOMELAB_SHARED_DATA"]).is_absolute()
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3" and env["TOMELAB_PRECISION"] == "fp32"
    monkeypatch.chdir(tmp_home)
    monkeypatch.setenv("TOMELAB_HOME", "rel")  # a relative home reaches the workers as the driver's absolute path
    assert ablate_ray.job_env(1)["TOMELAB_HOME"] == str(tmp_home.resolve() / "rel")


def test_recipe_overrides_name_hash_and_typos(tmp_path: Path) -> None:
    random = REPO / "configs/variants/random.toml"
    cfg_path = tmp_path / "abl.toml"

    def cfg(**kw) -> AblationConfig:
        return AblationConfig(variants=["random"], baseline="random", train_config="t", eval_config="e",
                              seeds=[0], ci=False, **kw)

    assert ablate.recipe_overrides(cfg(), random, cfg_path) == {}  # no overrides: the recipe as it is
    plain = load_recipe(random)
    over = ablate.recipe_overrides(cfg(recipe_overrides={"budget_rows": 200}), random, cfg_path)
    again = ablate.recipe_overrides(cfg(recipe_overrides={"budget_rows": 200}), random, cfg_path)
    other = ablate.recipe_overrides(cfg(recipe_overrides={"budget_rows": 300}), random, cfg_path)
    assert over == again and over["budget_rows"] == 200  # stable
    assert over["name"].startswith("random-o") and len({plain.name, over["name"], other["name"]}) == 3  # distinct
    hashes = {config_hash(recipe_dict(load_recipe(random, o))) for o in (None, over, other)}
    assert len(hashes) == 3  # cached variants are never confused
    # with a prefix the variant is exactly the hand-written demo recipe (same name, same config hash)
    for recipe in ("random", "dedup-filter", "dedup", "mix"):
        path = REPO / f"configs/variants/{recipe}.toml"
        demo = ablate.recipe_overrides(cfg(recipe_overrides={"budget_rows": 200}, variant_prefix="demo-"), path, cfg_path)
        assert demo["name"] == f"demo-{recipe}" and config_hash(recipe_dict(load_recipe(path, demo))) == \
            config_hash(recipe_dict(load_recipe(REPO / f"configs/variants/demo-{recipe}.toml"))), recipe
    # nested tables merge into the recipe's own (the other keys of [quality] stay)
    q = ablate.recipe_overrides(cfg(recipe_overrides={"quality": {"candidates_factor": 1.25}}),
                                REPO / "configs/variants/dedup-filter-ifd.toml", cfg_path)
    rec = load_recipe(REPO / "configs/variants/dedup-filter-ifd.toml", q)
    assert rec.quality.candidates_factor == 1.25 and rec.quality.enabled
    with pytest.raises(ConfigError, match=r"unknown key `budget_rowz`.*Did you mean `budget_rows`") as e:
        ablate.recipe_overrides(cfg(recipe_overrides={"budget_rowz": 200}), random, cfg_path)
    assert "[recipe_overrides]" in str(e.value) and str(cfg_path) in str(e.value)
    with pytest.raises(ConfigError, match="budget_rows` must be an integer"):
        ablate.recipe_overrides(cfg(recipe_overrides={"budget_rows": "many"}), random, cfg_path)
    bad = _minimal(tmp_path, "", '[recipe_overrides]\nname = "x"\n')
    with pytest.raises(ConfigError, match="cannot set `name`"):
        load_config(bad, AblationConfig)


def test_block_variants_carry_the_overrides(tmp_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With blocks every draw (and the A/A control's) is curated with the overrides, under the overridden name."""
    from tests.test_ablate import _BlockFakes, _fake_world

    fakes = _BlockFakes(tmp_home)
    head = 'variants = ["random", "dedup"]\nbaseline = "random"\nseeds = [0, 1]\ndraw_rows = 50\nnegative_control = true\n'
    cfg = _fake_world(monkeypatch, tmp_path, fakes, 40, head)
    cfg.write_text(cfg.read_text() + "[recipe_overrides]\nbudget_rows = 200\n")
    out = ablate.run_ablation(cfg)
    name = ablate.recipe_overrides(load_config(cfg, AblationConfig), REPO / "configs/variants/random.toml", cfg)["name"]
    assert name.startswith("random-o")
    assert {o["budget_rows"] for _, o in fakes.curated} == {200} and len(fakes.curated) == 6
    assert {o["name"] for _, o in fakes.curated if o["name"].startswith("random")} == \
        {f"{name}.b0", f"{name}.b1", f"{name}-aa.b0", f"{name}-aa.b1"}
    with (out / "leaderboard.csv").open() as f:
        assert {r["system"] for r in csv.DictReader(f)} >= {name, f"{name}-aa", "dedup-o" + name.split("-o")[1]}
