"""The Gradio app: which winner it serves and why (banner), a moved home, the demo's printed command,
the background engine switch, the Lab's reads, and a live server under load. Every test uses a
temporary artefact home (tmp_home); the browser test is tests/test_app_browser.py."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app_world import BASE, OTHER, REFUSAL_DETAIL, RULE, RUN_REL, WINNER, write_results, write_run, write_variants
from tomelab import lab, serving
from tomelab.chat_cli import load_app_module
from tomelab.engines import pool as engine_pool
from tomelab.errors import TomelabError

REPO = Path(__file__).resolve().parent.parent
app = load_app_module()


def app_args(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser()
    app.add_arguments(p)
    return p.parse_args(argv)


def _cfg(results: Path | str = "", tmp_path: Path | None = None, **kw) -> object:
    return app.AppConfig(results_dir=str(results), data_cards_dir=str((tmp_path or Path(".")) / "data_cards"), **kw)


# --------------------------------------------------------------------------- which winner, and why


def test_results_flag_serves_that_folders_winner(tmp_home: Path, tmp_path: Path) -> None:
    results = write_results(tmp_path / "results" / "demo")
    run = write_run(tmp_home)
    entries, winners, explicit = app.discover(_cfg(results, tmp_path))
    assert [e.kind for e in entries][:2] == ["winner", "base"]
    assert Path(entries[0].ref) == run and entries[0].variant == WINNER
    assert entries[0].key == f"winner of ablation-demo: {WINNER} / {BASE} / seed 0"
    banner = serving.banner(winners, entries[0], explicit)
    assert "Serving the winner of `ablation-demo`" in banner and RULE in banner
    assert [e.kind for e in entries].count("run") == 0  # the winner's own run is not listed twice


def test_without_flag_offers_every_winner_newest_first(tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    now = time.time()
    write_results(tmp_path / "results" / "small", run_dir=f"runs/{OTHER}/{BASE}/0",
                  ablation="configs/ablation-small.toml", variant=OTHER, mtime=now - 3600)
    write_results(tmp_home / "results" / "demo", mtime=now)  # the artefact home's results/ too
    write_results(tmp_path / "results" / "gone", run_dir=f"runs/gone/{BASE}/0", ablation="configs/gone.toml",
                  variant="gone", mtime=now + 60)  # newest, but its run is not on this machine
    write_run(tmp_home)
    write_run(tmp_home, rel=f"runs/{OTHER}/{BASE}/0")
    entries, winners, explicit = app.discover(_cfg("", tmp_path))
    assert explicit is None
    assert [w.ablation for w in winners] == ["gone", "ablation-demo", "ablation-small"]
    assert [e.key for e in entries if e.kind == "winner"] == [
        f"winner of ablation-demo: {WINNER} / {BASE} / seed 0", f"winner of ablation-small: {OTHER} / {BASE} / seed 0"]
    banner = serving.banner(winners, entries[0], explicit)
    assert "Serving the winner of `ablation-demo`" in banner and "1 other winner(s) cannot be served" in banner


def test_moved_results_and_home_still_resolve_the_winner(tmp_path: Path, monkeypatch) -> None:
    old = tmp_path / "machine-a"
    home = old / "artifacts"
    write_results(old / "results" / "demo")
    write_run(home)
    # an old-format winner: absolute run_dir from machine A
    write_results(old / "results" / "old", run_dir=str(home / RUN_REL))
    new = tmp_path / "machine-b" / "checkout"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    monkeypatch.setenv("TOMELAB_HOME", str(new / "artifacts"))
    for folder in ("demo", "old"):
        w = serving.load_winner(new / "results" / folder)
        assert w.ok, w.reason
        assert w.run == new / "artifacts" / RUN_REL
    shutil.rmtree(new / "artifacts" / "runs")
    w = serving.load_winner(new / "results" / "demo")
    assert not w.ok and RUN_REL in w.reason and "tomelab ablate configs/ablation-demo.toml" in w.reason


@pytest.mark.parametrize("content, reason", [
    (None, "does not exist"),
    ('"dedup-filter"', "holds a JSON str, not an object"),
    ("{not json", "is not valid JSON"),
    ('{"variant": null, "base": "smollm2-135m-instruct", "run_dir": "runs/x/y/0", "ablation_config": "c.toml"}',
     "no usable `variant` (null). Rewrite it with `tomelab ablate c.toml`"),
    ('{"variant": "x", "base": "smollm2-135m-instruct"}', "no usable `run_dir` (missing)"),
    ('{"variant": "x", "base": "smollm2-135m-instruct", "run_dir": "/elsewhere/artifacts/runs/x/b/1", '
     '"ablation_config": "configs/ablation.toml"}', "which is not on this machine"),
])
def test_fallback_banner_states_the_true_reason(tmp_home: Path, tmp_path: Path, content: str | None, reason: str) -> None:
    results = tmp_path / "results"
    results.mkdir()
    if content is not None:
        (results / "winner.json").write_text(content)
    entries, winners, explicit = app.discover(_cfg(results, tmp_path))  # never raises on a bad winner.json
    assert entries[0].kind == "base" and entries[0].ref == BASE
    banner = serving.banner(winners, entries[0], explicit)
    assert "Serving the base model" in banner and reason in banner and "winner.json" in banner


def test_no_winner_anywhere_says_how_to_make_one(tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    entries, winners, explicit = app.discover(_cfg("", tmp_path))
    assert winners == [] and entries[0].kind == "base"
    assert "No `winner.json`" in serving.banner(winners, entries[0], explicit) and "make demo" in serving.banner(winners, entries[0], explicit)


def test_results_dir_home_prefix_and_printed_command(tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "ablation-demo.toml"
    cfg.write_text('variants = ["a"]\nresults_dir = "home:results/demo"\n')
    assert serving.ablation_results_dir(cfg) == tmp_home / "results" / "demo"
    assert serving.serve_command(cfg) == ".venv/bin/python app.py --results artifacts/results/demo"
    cfg.write_text('results_dir = "results/demo"\n')
    assert serving.serve_command(cfg) == ".venv/bin/python app.py --results results/demo"


# --------------------------------------------------------------------------- serving a real model


@pytest.fixture
def tiny_run(tmp_home: Path, smollm2_dir: Path) -> Path:
    """A finished run dir as training writes it: a real (tiny, r=2, non-zero) LoRA adapter on SmolLM2."""
    from peft import LoraConfig, get_peft_model

    from tomelab.models import load_model

    run = tmp_home / RUN_REL
    run.mkdir(parents=True)
    model = load_model(BASE)
    # init_lora_weights=False: B is random too, so the adapter visibly changes the output
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(run / "adapter"))
    (run / "config.json").write_text(json.dumps({"variant": WINNER, "base": BASE, "seed": 0}))
    (run / "metrics.json").write_text(json.dumps({"variant": WINNER, "final_val_loss": 2.5}))
    return run


def test_demo_printed_command_serves_the_demo_winner(tiny_run: Path, tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    """`make demo` prints `app.py --results DIR`; that command, run against a finished tiny demo whose
    results live under the artefact home, serves the demo's winner (its adapter changes the answer)."""
    from tomelab.engines.chat import GenerationSettings

    monkeypatch.chdir(tmp_path)
    write_results(tmp_home / "results" / "demo")
    conf = tmp_path / "ablation-demo.toml"
    conf.write_text('results_dir = "home:results/demo"\n')
    argv = shlex.split(serving.serve_command(conf))
    assert argv[1:] == ["app.py", "--results", "artifacts/results/demo"]
    cfg = app.config_from_args(app_args(argv[2:] + ["--engine", "transformers"]))
    demo = app.create(cfg)
    pool = demo.tomelab_pool
    served = next(iter(pool.entries.values()))
    assert served.kind == "winner" and Path(served.ref) == tiny_run and served.variant == WINNER
    s = GenerationSettings(temperature=0.0, max_new_tokens=6)
    msg = [{"role": "user", "content": "What is the capital of France?"}]
    ans = pool.get(served.key).generate(msg, s)
    base = pool.get(f"base: {BASE}").generate(msg, s)
    assert ans.n_tokens >= 1 and ans.text != base.text  # the winner's adapter, not the base model
    assert "transformers" in pool.slots[served.key].markdown()


class _FakeEngine:
    def __init__(self, name: str):
        self.engine_name, self.label, self.info = name, name, {"engine_reason": f"fake {name}"}


def test_page_serves_at_once_and_switches_engine_in_background(tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    """The fast engine's conversion and checks run after the model is already served; their log lines
    show in the info panel; the engine is swapped when they pass."""
    release = threading.Event()

    def fake_load(ref, *, engine="auto", **kw):
        if engine == "transformers":
            return _FakeEngine("transformers")
        logging.getLogger("tomelab.engines.convert").info("checking llama.cpp on model.gguf (one-off)")
        assert release.wait(30)
        return _FakeEngine("llama.cpp")

    monkeypatch.setattr(engine_pool, "load_engine", fake_load)
    entries, _, _ = app.discover(_cfg(tmp_path / "none", tmp_path, engine="auto"))
    pool = app.ModelPool(_cfg(tmp_path / "none", tmp_path, engine="auto"), entries)
    key = entries[0].key
    assert pool.get(key).engine_name == "transformers"  # served before the check finished
    slot = pool.slots[key]
    for _ in range(300):
        if any("checking llama.cpp" in p for p in slot.progress):
            break
        time.sleep(0.01)
    assert slot.busy and "checking faster engines" in slot.markdown() and "checking llama.cpp on model.gguf" in slot.markdown()
    release.set()
    for _ in range(300):
        if not slot.busy:
            break
        time.sleep(0.01)
    assert not pool.busy() and pool.get(key).engine_name == "llama.cpp"
    assert any("switched to llama.cpp" in p for p in slot.progress)


def test_slots_reach_the_engine_and_the_queue_lets_them_through(tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    """`--slots N` reaches every `load_engine` call of the pool, and Gradio's queue runs at least N chats at
    once, so concurrent chats arrive at llama.cpp's parallel slots together; a smaller --concurrency is refused."""
    seen: list[tuple[str, int | None]] = []

    def fake_load(ref, *, engine="auto", **kw):
        seen.append((engine, kw.get("slots"), kw.get("replicas", 1)))
        return _FakeEngine(engine)

    monkeypatch.setattr(engine_pool, "load_engine", fake_load)
    monkeypatch.chdir(tmp_path)
    cfg = app.config_from_args(app_args(["--results", str(tmp_path / "none"), "--engine", "llama.cpp", "--slots", "6",
                                         "--replicas", "2"]))
    assert (cfg.slots, cfg.concurrency_limit, cfg.queue_concurrency) == (6, 0, 6)
    demo = app.create(cfg)
    pool = demo.tomelab_pool
    key = next(iter(pool.entries))
    assert pool.engine_slots == 6
    for _ in range(3000):  # a hang guard only: the fake loads return at once
        if pool.slots[key].ready.is_set() and not pool.busy():
            break
        time.sleep(0.01)
    assert pool.get(key).engine_name == "llama.cpp"
    assert seen == [("transformers", 6, 1), ("llama.cpp", 6, 2)]  # the llama.cpp engine: 2 servers share 6 slots
    chat = next(fn for fn in demo.fns.values() if fn.api_name == "chat")
    limit = demo._queue.default_concurrency_limit if chat.concurrency_limit == "default" else chat.concurrency_limit
    assert limit is not None and limit >= cfg.slots
    with pytest.raises(TomelabError, match="slots"):
        app.config_from_args(app_args(["--engine", "llama.cpp", "--slots", "4", "--concurrency", "2"]))
    assert app.config_from_args(app_args(["--engine", "transformers", "--concurrency", "2"])).queue_concurrency == 2


def test_picker_lists_a_finished_run_and_serves_its_adapter(tiny_run: Path, tmp_path: Path) -> None:
    from tomelab.engines.chat import GenerationSettings

    cfg = _cfg(tmp_path / "results", tmp_path, engine="transformers")
    entries, winners, _ = app.discover(cfg)
    assert [e.kind for e in entries] == ["base", "run"]
    run_entry = entries[1]
    assert run_entry.variant == WINNER and Path(run_entry.ref) == tiny_run
    assert "final_val_loss=2.5" in app.info_markdown(run_entry, cfg, [])
    pool = app.ModelPool(cfg, entries)
    s = GenerationSettings(temperature=0.0, max_new_tokens=6)
    base_ans = pool.get(entries[0].key).generate([{"role": "user", "content": "What is the capital of France?"}], s)
    run_ans = pool.get(run_entry.key).generate([{"role": "user", "content": "What is the capital of France?"}], s)
    assert run_ans.n_tokens >= 1 and run_ans.text != base_ans.text  # the adapter was merged in


# --------------------------------------------------------------------------- the Lab reads artefacts


def test_lab_reads_leaderboard_cards_rows_and_side_by_side(tmp_home: Path, tmp_path: Path, monkeypatch) -> None:
    results = write_results(tmp_path / "results" / "demo")
    cards = tmp_path / "data_cards"
    kept = write_variants(tmp_home, cards)
    lb = lab.leaderboard(results)
    assert {"mde", "p_holm", "ci_lo", "ci_hi"} <= set(lb.columns) and "random-aa" in lb["system"].to_list()
    assert RULE in lab.winner_markdown(results) and "`demo-random`" in lab.winner_markdown(results)
    assert [c for _, c in lab.plots(results)] == ["metrics"]
    assert lab.variants(results, [cards])[:2] == [WINNER, OTHER]
    body, funnel = lab.card(WINNER, [cards])
    assert "Dataset card" in body and "pretty_name" not in body and "![" not in body and funnel.endswith("_funnel.png")
    info = app.info_markdown(app.ModelEntry("w", "x", "winner", WINNER, BASE, 0, results_dir=results), _cfg(), [cards])
    assert "- `heldout_nll` **1.579** [1.490, 1.665] · 1 seed(s)" in info  # mean, CI; no delta for the baseline
    other = lab.rows_markdown(lab.leaderboard_rows(results, OTHER))
    assert other == "- `heldout_nll` **1.582** [1.495, 1.669] · vs baseline +0.003 [-0.004, +0.011] · MDE 0.011 · 1 seed(s)"
    # Rows: kept, searchable; dropped, filtered by reason, with stage and detail
    df, note = lab.kept_rows(WINNER, search="TOMATOES IN POT 3")
    assert df.height == 1 and "1 kept rows match" in note and df["source"][0] == "sharegpt"
    reasons = lab.drop_reasons(WINNER)
    assert reasons == ["over_budget (budget): 7", "refusal (filters): 3"]
    d, note = lab.dropped_rows(WINNER, "refusal (filters): 3")
    assert d.height == 3 and set(d["reason"]) == {"refusal"} and set(d["stage"]) == {"filters"}
    assert d["detail"][0] == REFUSAL_DETAIL
    assert "reason `refusal`" in lab.row_markdown(WINNER, d["id"][0])
    assert lab.dropped_rows(WINNER, "", "REFUSAL")[0].height == 3  # search covers stage, reason, detail
    assert "Answer 0: water them daily." in lab.row_markdown(WINNER, kept[WINNER][0]["id"])
    left, right, note = lab.side_by_side(WINNER, OTHER, "sharegpt")
    assert set(left[f"in {OTHER}"]) == {"kept", "dropped: budget (over_budget)"}
    assert set(right[f"in {WINNER}"]) == {"kept", "dropped: budget (over_budget)", "dropped: filters (refusal)"}
    assert "4 rows are in both" in note
    monkeypatch.setenv("ARGILLA_API_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    assert "does not answer" in lab.review_markdown(timeout_s=0.5)


def test_defaults_bind_loopback_without_share() -> None:
    cfg = app.config_from_args(app_args([]))
    assert cfg.host == "127.0.0.1" and cfg.share is False and cfg.results_dir == ""
    cfg = app.config_from_args(app_args(["--host", "0.0.0.0", "--port", "9000", "--share", "--results", "results/demo"]))
    assert (cfg.host, cfg.port, cfg.share, cfg.results_dir) == ("0.0.0.0", 9000, True, "results/demo")


def test_tomelab_chat_help_lists_the_app_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "tomelab.cli", "chat", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--share", "--engine", "--results"):
        assert flag in out.stdout


# --------------------------------------------------------------------------- a live server


def _text(message: dict) -> str:
    """A chat message's text: gradio 6 sends content as [{"type": "text", "text": ...}]."""
    return app._history_pairs([message])[0]["content"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_app(tmp_path_factory, smollm2_dir):
    """The real app (no winner, real SmolLM2, transformers engine) on a loopback port, temporary home."""
    tmp = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as mp:
        home = tmp / "artifacts"
        home.mkdir()
        (home / "models").symlink_to(smollm2_dir.parent, target_is_directory=True)
        mp.setenv("TOMELAB_HOME", str(home))
        cfg = app.AppConfig(port=_free_port(), results_dir=str(tmp / "results"), data_cards_dir=str(tmp / "cards"),
                            engine=os.environ.get("TOMELAB_TEST_ENGINE", "transformers"), threads=2,
                            max_new_tokens=16, concurrency_limit=2, slots=2, context_length=512)
        demo = app.create(cfg)
        demo.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{cfg.port}/", cfg
        finally:
            demo.close()


@pytest.mark.e2e
def test_twenty_concurrent_chats_zero_errors(live_app, tmp_path: Path) -> None:
    """Load test on loopback: 20 concurrent chats through gradio_client, bounded in count."""
    from gradio_client import Client

    url, cfg = live_app
    # queued requests wait silently for minutes on a busy CPU: httpx's 5 s read timeout is not an app error
    client = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
    key = f"base: {BASE}"
    prompts = [f"Name one fruit that starts with the letter {chr(65 + i)}." for i in range(20)]

    def one(prompt: str) -> tuple[float, str | None, str | None]:
        t0 = time.perf_counter()
        try:
            job = client.submit(prompt, [], key, 0.7, 0.9, 12, "Answer in one short sentence.", api_name="/chat")
            history, _, status = job.result(timeout=240)
            return time.perf_counter() - t0, _text(history[-1]) if history else "", None
        except Exception as e:  # counted, not raised: the test reports how many failed
            return time.perf_counter() - t0, None, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, prompts))
    errors = [r[2] for r in results if r[2] is not None]
    lat = sorted(r[0] for r in results if r[2] is None)
    summary = {"chats": 20, "errors": len(errors), "concurrency_limit": cfg.concurrency_limit, "engine": cfg.engine,
               "p50_s": round(statistics.median(lat), 2) if lat else None}
    (tmp_path / "app_load.json").write_text(json.dumps(summary, indent=2))
    print(f"\nload test: {summary}")
    assert errors == [], errors
    assert all(text and text.strip() for _, text, _ in results), results


def test_server_answers_compare_with_both_speeds(live_app) -> None:
    from gradio_client import Client

    url, _ = live_app
    client = Client(url, verbose=False)
    key = f"base: {BASE}"
    a, a_stat, b, b_stat = client.predict("Say hello.", key, key, 0.0, 0.9, 8, "", api_name="/compare")
    assert _text(a[-1]) and _text(b[-1])
    assert "tok/s" in a_stat and "tok/s" in b_stat
    assert _text(a[-1]) == _text(b[-1])  # greedy, same model: identical


def test_server_truncates_long_request_with_note(live_app) -> None:
    from gradio_client import Client

    url, _ = live_app
    client = Client(url, verbose=False)
    long = "Read this note. " + "lorem ipsum " * 2500 + "\nNow answer: what is the capital of France?"
    history, _, status = client.predict(long, [], f"base: {BASE}", 0.0, 0.9, 8, "", api_name="/chat")
    assert _text(history[-1]).strip()  # answered, not an error
    assert "Truncated" in status and "cut" in status
