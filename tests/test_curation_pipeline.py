"""`tomelab curate` end to end on a small real-data fixture: conservation, held-out sharing, resume,
kill -9 recovery, data cards, bad input, and IFD with the real SmolLM2-135M."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.pipeline import curate
from tomelab.cli import main as tomelab_main
from tomelab.errors import ConfigError, DataError, TomelabError

REPO = Path(__file__).resolve().parent.parent
N_BASE = 160


def finetome_fixture(shared_data: Path, path: Path) -> Path:
    """FineTome-shaped parquet (conversations/source/score) from real Alpaca rows, with known
    problems injected: exact and case-only copies, a light edit, a refusal, a GSM8K test question."""
    alpaca = json.loads((shared_data / "alpaca/alpaca_5000.json").read_text())
    gsm = json.loads((shared_data / "gsm8k/test.jsonl").read_text().splitlines()[0])
    recs = []
    for i, r in enumerate(alpaca[:N_BASE]):
        q = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        recs.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": r["output"]}],
                     "source": "alpaca", "score": 3.0 + (i % 7) / 3})
    recs.append({**recs[0], "score": 1.0})  # exact copy, worse score
    c = recs[1]["conversations"]
    recs.append({"conversations": [{"from": "human", "value": c[0]["value"].upper()},
                                   {"from": "gpt", "value": "  " + c[1]["value"]}], "source": "x", "score": 1.0})
    recs.append({"conversations": [{"from": "human", "value": gsm["question"]},
                                   {"from": "gpt", "value": "Let me solve it step by step for you now."}],
                 "source": "x", "score": 5.0})
    recs.append({"conversations": [{"from": "human", "value": "What will the stock market do tomorrow?"},
                                   {"from": "gpt", "value": "As an AI language model, I cannot predict markets."}],
                 "source": "x", "score": 5.0})
    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def write_recipe(dir: Path, name: str, data: Path, body: str, budget: int = 40) -> Path:
    p = dir / f"{name}.toml"
    p.write_text(f'''name = "{name}"
budget_rows = {budget}
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
ngram = 13
embed_threshold = 0.95
model = "m2v"
[[decontam.test_sets]]
name = "gsm8k_test"
path = "shared:gsm8k/test.jsonl"
fields = ["question", "answer"]
[[decontam.test_sets]]
name = "ifeval"
path = "shared:ifeval/input_data.jsonl"
fields = ["prompt"]
''' + body)
    return p


FULL = '''
[exact_dedup]
enabled = true
[minhash]
enabled = true
[semantic_dedup]
enabled = true
model = "m2v"
threshold = 0.95
[filters]
enabled = ["length", "language", "repetition", "refusal", "broken_turns", "truncated"]
[quality]
enabled = true
select_by = "score"
min_score = 2.0
candidates_factor = 2.0
'''


@pytest.fixture
def data_file(shared_data: Path, tmp_path: Path) -> Path:
    return finetome_fixture(shared_data, tmp_path / "finetome.parquet")


def test_curate_full_recipe_conserves_rows_and_writes_card(curation_home: Path, data_file: Path,
                                                          tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "t-full", data_file, FULL)
    out = curate(recipe, progress=False)
    stats = json.loads((out / "stats.json").read_text())
    train = pl.read_parquet(out / "train.parquet")
    dropped = pl.read_parquet(out / "dropped.parquet")
    pool = N_BASE + 4
    # every stage conserves rows, and the whole pipeline does: pool = train + dropped
    stages = [s for s in stats["stages"] if not s["stage"].startswith("load:")]
    for s in stages:
        assert s["rows_in"] == s["kept"] + s["n_dropped"], s
    assert [s["stage"] for s in stages] == ["heldout", "exact_dedup", "minhash_dedup", "filters", "decontam",
                                           "semantic_dedup", "quality", "budget"]
    assert stages[0]["rows_in"] == pool and len(train) + len(dropped) == pool
    assert len(train) == stats["rows"] == 40
    # dropped.parquet holds each dropped row once, with the stage and reason the stats count
    counts = {(st, r): n for st, r, n in dropped.group_by("stage", "reason").len().iter_rows()}
    assert counts == {(s["stage"], r): n for s in stages for r, n in s["dropped"].items()}
    # the injected problems were caught by the right stage (unless the held-out split took them)
    heldout_ids = set(pl.read_parquet(Path(stats["heldout_dir"]) / "test.parquet")["id"])
    reason_of = dict(zip(dropped["id"], dropped["reason"]))
    src = pl.read_parquet(data_file)
    assert "exact_duplicate" in set(dropped["reason"])
    assert any(r == "contaminated:gsm8k_test" for r in reason_of.values())
    assert any(r == "refusal" for r in reason_of.values())
    assert not (set(train["id"]) & heldout_ids)
    assert {"prompt_tokens", "response_tokens", "quality_score"} <= set(train.columns)
    assert (train["score"] >= 2.0).all()  # quality min_score
    # card: YAML front matter, lineage, funnel, decontamination counts per test set, and the PNG
    card = (tmp_path / "data_cards" / "t-full.md").read_text()
    assert card.startswith("---\n") and "\n---\n" in card[4:]
    assert "| gsm8k_test | 1 |" in card and "| ifeval | 0 |" in card and "| heldout |" in card
    assert "## Funnel" in card and "| exact_dedup |" in card and stats["config_hash"] in card
    png = tmp_path / "data_cards" / "t-full_funnel.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(src) == pool


def test_variants_share_heldout_and_resume_unchanged_stages(curation_home: Path, data_file: Path,
                                                           tmp_path: Path) -> None:
    a = curate(write_recipe(tmp_path, "t-random", data_file, ""), progress=False)
    b = curate(write_recipe(tmp_path, "t-dedup", data_file, "[exact_dedup]\nenabled = true\n"), progress=False)
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    assert sa["heldout_dir"] == sb["heldout_dir"] and sa["rows"] == sb["rows"] == 40
    # the second variant reuses the first's held-out stage checkpoint (same input, same config)
    assert sb["stages"][1]["stage"] == "heldout" and sb["stages"][1]["extra"].get("resumed")
    # a re-run resumes every stage and reproduces the output exactly
    again = curate(write_recipe(tmp_path, "t-dedup", data_file, "[exact_dedup]\nenabled = true\n"), progress=False)
    s2 = json.loads((again / "stats.json").read_text())
    assert all(s["extra"].get("resumed") for s in s2["stages"] if not s["stage"].startswith("load:"))
    assert pl.read_parquet(again / "train.parquet")["id"].to_list() == \
        pl.read_parquet(b / "train.parquet")["id"].to_list()
    # --force recomputes and still gives the same rows
    forced = curate(write_recipe(tmp_path, "t-dedup", data_file, "[exact_dedup]\nenabled = true\n"), force=True,
                    progress=False)
    s3 = json.loads((forced / "stats.json").read_text())
    assert not any(s["extra"].get("resumed") for s in s3["stages"])
    assert pl.read_parquet(forced / "train.parquet")["id"].to_list() == \
        pl.read_parquet(b / "train.parquet")["id"].to_list()


KILL_SCRIPT = """
import sys, time
from curation import dedup
real = dedup.minhash_dedup
def slow(*a, **k):
    time.sleep(120)  # the parent kills us here, after exact_dedup was checkpointed
    return real(*a, **k)
dedup.minhash_dedup = slow
from curation.pipeline import curate
curate(sys.argv[1], progress=False)
"""


def test_kill_9_mid_run_loses_nothing_and_rerun_matches(curation_home: Path, data_file: Path,
                                                        tmp_path: Path) -> None:
    body = "[exact_dedup]\nenabled = true\n[minhash]\nenabled = true\n"
    recipe = write_recipe(tmp_path, "t-kill", data_file, body)
    env = {**os.environ, "TOMELAB_HOME": str(curation_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stages = curation_home / "cache" / "stages"
    deadline = time.time() + 600
    while not list(stages.glob("exact_dedup-*.json")):
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.time() < deadline, "exact_dedup checkpoint never appeared"
        time.sleep(0.2)
    time.sleep(0.5)
    assert proc.poll() is None  # still inside the (slowed) minhash stage
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (curation_home / "variants" / "t-kill" / "stats.json").exists()
    assert not list(stages.glob("minhash_dedup-*.json"))
    assert not list(stages.glob(".*.tmp"))  # no half-written files left behind
    out = curate(recipe, progress=False)
    st = json.loads((out / "stats.json").read_text())
    by_stage = {s["stage"]: s for s in st["stages"]}
    assert by_stage["exact_dedup"]["extra"].get("resumed") and not by_stage["minhash_dedup"]["extra"].get("resumed")
    resumed_ids = pl.read_parquet(out / "train.parquet")["id"].to_list()
    fresh = curate(recipe, force=True, progress=False)
    assert pl.read_parquet(fresh / "train.parquet")["id"].to_list() == resumed_ids


# ------------------------------------------------------------------ bad input


def test_malformed_recipe_is_one_line_with_exit_2(curation_home: Path, data_file: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_recipe(tmp_path, "t-bad", data_file, "[minhash]\nenabeld = true\n")
    assert tomelab_main(["curate", str(bad), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "minhash.enabeld" in err and "enabled" in err
    wrong_type = write_recipe(tmp_path, "t-bad2", data_file, "[minhash]\nthreshold = \"high\"\n")
    with pytest.raises(ConfigError, match="minhash.threshold.*number"):
        curate(wrong_type)


def test_empty_source_is_a_data_error(curation_home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        curate(write_recipe(tmp_path, "t-empty", empty, ""), progress=False)


def test_stage_dropping_every_row_fails_loudly_and_keeps_earlier_checkpoints(
        curation_home: Path, data_file: Path, tmp_path: Path) -> None:
    body = ("[exact_dedup]\nenabled = true\n[filters]\nenabled = [\"length\"]\nmin_response_tokens = 100000\n"
            "max_response_tokens = 200000\n")
    with pytest.raises(TomelabError, match="'filters' would drop all.*Loosen the bounds in \\[filters\\]"):
        curate(write_recipe(tmp_path, "t-all", data_file, body), progress=False)
    stages = curation_home / "cache" / "stages"
    assert list(stages.glob("exact_dedup-*.json")) and not list(stages.glob("filters-*.json"))


def test_missing_embedding_model_names_the_fix(curation_home: Path, data_file: Path, tmp_path: Path) -> None:
    body = "[semantic_dedup]\nenabled = true\nmodel = \"/no/such/model\"\n"
    with pytest.raises(TomelabError, match="embedding model '/no/such/model' not found.*m2v"):
        curate(write_recipe(tmp_path, "t-noemb", data_file, body), progress=False)


# ------------------------------------------------------------------ embeddings cache


def test_embedder_caches_by_row_id(curation_home: Path) -> None:
    from tomelab.embed import Embedder

    e = Embedder("m2v")
    v1 = e.encode(["a", "b"], ["the cat sat on the mat", "stock markets fell sharply today"])
    assert v1.shape == (2, e.dim) and abs(float((v1 ** 2).sum(1)[0]) - 1) < 1e-5
    fresh = Embedder("m2v")  # a new instance reads the shards on disk

    def boom(*a, **k):
        raise AssertionError("cached ids must not be re-encoded")

    fresh._encode_raw = boom
    assert (fresh.encode(["b", "a"], ["ignored", "ignored"]) == v1[::-1]).all()


# ------------------------------------------------------------------ IFD with the real base model


@pytest.mark.e2e
def test_ifd_with_smollm2_ranks_and_caches(tmp_path: Path, smollm2_dir: Path) -> None:
    from curation.frame import prepare
    from curation.quality import QualityScorer, select_by_quality
    from curation.recipe import QualityConfig
    from tomelab.schema import make_row, rows_to_table

    pairs = [("Repeat exactly: the quick brown fox jumps over the lazy dog.",
              "the quick brown fox jumps over the lazy dog."),
             ("What is the capital of France?", "The capital of France is Paris."),
             ("What is the capital of France?", "Bananas are rich in potassium and grow in warm climates."),
             ("Translate 'good morning' into French.", "Bonjour.")]
    df = prepare(rows_to_table([make_row("s", [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                         {}) for q, a in pairs]))
    cfg = QualityConfig(enabled=True, select_by="ifd", max_ifd=1.0, candidates_factor=2.0, batch_size=2)
    scorer = QualityScorer(cfg, cache_dir=tmp_path)
    res = select_by_quality(df, cfg, {"s": 2}, seed=0, scorer=scorer, progress=False)
    assert res.stats.rows_in == res.stats.kept + res.stats.n_dropped == 4
    scores = scorer.cached().join(df.select("id", "response"), on="id")
    ifd = dict(zip(scores["response"], (scores["nll"] - scores["nll_alone"]).exp()))
    # the instruction makes the right answer easier (IFD < 1) and the off-topic one harder (IFD > 1)
    assert ifd["The capital of France is Paris."] < 1 < ifd["Bananas are rich in potassium and grow in warm climates."]
    assert "ifd_too_high" in res.stats.dropped and res.stats.kept == 2
    assert res.kept["ifd"].max() < 1.0
    # a second scorer finds every row in the cache and never loads the model
    again = QualityScorer(cfg, cache_dir=tmp_path)
    again.score(df["id"].to_list(), df["messages"].to_list(), progress=False)
    assert again._model is None
