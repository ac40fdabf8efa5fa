"""The Gradio app: model discovery and info panel, the no-winner banner, a live server under load,
and a headless-Chromium browser test (screenshot kept under artifacts/test-artifacts/)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tomelab.errors import TomelabError
from tomelab.chat_cli import load_app_module

REPO = Path(__file__).resolve().parent.parent
app = load_app_module()


def _fake_results(tmp_home: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A winner, a leaderboard, a data card and two finished runs (no weights: nothing is loaded)."""
    results, cards = tmp_path / "results", tmp_path / "data_cards"
    results.mkdir()
    cards.mkdir()
    for variant, seed in (("ifd-top", 0), ("random", 0)):
        run = tmp_home / "runs" / variant / "smollm2-135m-instruct" / str(seed)
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"heldout_rougeL": 0.31 if variant == "random" else 0.35}))
    win_run = tmp_home / "runs" / "ifd-top" / "smollm2-135m-instruct" / "0"
    (results / "winner.json").write_text(json.dumps({
        "variant": "ifd-top", "base": "smollm2-135m-instruct", "seed": 0, "run_dir": str(win_run),
        "model_dir": None, "metrics": {"heldout_rougeL": 0.35}, "rule": "best mean held-out ROUGE-L, CI above random",
    }))
    # the real writer, so the app reads exactly what `tomelab ablate` writes
    from eval.ablate import MetricRow, write_csv
    from eval.stats import Interval

    spread = {"std": 0.0, "min": 0.0, "max": 0.0}
    write_csv(results / "leaderboard.csv", [
        MetricRow("ifd-top", "heldout_rougeL", 1, 200, 0.35, spread, [0.35], Interval(0.35, 0.331, 0.369, 200, 1),
                  Interval(0.04, 0.012, 0.071, 200, 1, 1)),
        MetricRow("random", "heldout_rougeL", 1, 200, 0.31, spread, [0.31], Interval(0.31, 0.290, 0.330, 200, 1)),
        MetricRow(app.BASE_LEADERBOARD_ROW, "heldout_rougeL", 1, 200, 0.21, spread, [0.21], Interval(0.21, 0.190, 0.229, 200, 1)),
    ])
    (cards / "ifd-top.md").write_text("---\nlicense: mit\n---\n# ifd-top\n\nTop rows by instruction-following difficulty.\n")
    return results, cards


def test_no_winner_serves_base_with_banner(tmp_home: Path, tmp_path: Path) -> None:
    cfg = app.AppConfig(results_dir=str(tmp_path / "results"), data_cards_dir=str(tmp_path / "cards"))
    entries, winner = app.discover_models(cfg)
    assert winner is None
    assert entries[0].kind == "base" and entries[0].ref == "smollm2-135m-instruct"
    banner = app.banner_markdown(winner, cfg)
    assert "No winner" in banner and "base model" in banner and "smollm2-135m-instruct" in banner


def test_winner_first_then_base_then_runs_with_info(tmp_home: Path, tmp_path: Path) -> None:
    results, cards = _fake_results(tmp_home, tmp_path)
    cfg = app.AppConfig(results_dir=str(results), data_cards_dir=str(cards))
    entries, winner = app.discover_models(cfg)
    assert [e.kind for e in entries] == ["winner", "base", "run"]  # the winner's own run is not listed twice
    assert entries[0].variant == "ifd-top" and entries[0].ref.endswith("ifd-top/smollm2-135m-instruct/0")
    assert entries[2].variant == "random"
    assert "Serving the winner" in app.banner_markdown(winner, cfg) and "CI above random" in app.banner_markdown(winner, cfg)
    info = app.info_markdown(entries[0], cfg)
    assert "| heldout_rougeL | 0.350 | [0.331, 0.369] | +0.040 [+0.012, +0.071] | 1 |" in info  # scores, CI, delta
    assert "0.310" not in info  # not another system's row
    assert "[0.190, 0.229]" in app.info_markdown(entries[1], cfg)  # the base model's own row
    assert "instruction-following difficulty" in info and "license: mit" not in info  # card body, no front matter
    assert "No data card" in app.info_markdown(entries[2], cfg)


def test_merged_export_is_preferred_over_adapter(tmp_home: Path, tmp_path: Path) -> None:
    results, cards = _fake_results(tmp_home, tmp_path)
    w = json.loads((results / "winner.json").read_text())
    w["model_dir"] = str(tmp_path / "export")
    (results / "winner.json").write_text(json.dumps(w))
    entries, _ = app.discover_models(app.AppConfig(results_dir=str(results), data_cards_dir=str(cards)))
    assert entries[0].ref == str(tmp_path / "export")


def test_broken_winner_json_names_file_and_fix(tmp_home: Path, tmp_path: Path) -> None:
    (tmp_path / "winner.json").write_text('{"variant": "x"}')
    with pytest.raises(TomelabError, match=r"winner.json: missing field\(s\) base, run_dir.*tomelab ablate"):
        app.read_winner(tmp_path)
    (tmp_path / "winner.json").write_text("{not json")
    with pytest.raises(TomelabError, match="not valid JSON"):
        app.read_winner(tmp_path)


def test_defaults_bind_loopback_without_share() -> None:
    cfg = app.config_from_args(app_args([]))
    assert cfg.host == "127.0.0.1" and cfg.share is False
    cfg = app.config_from_args(app_args(["--host", "0.0.0.0", "--port", "9000", "--share"]))
    assert (cfg.host, cfg.port, cfg.share) == ("0.0.0.0", 9000, True)


def test_tomelab_chat_help_lists_the_app_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "tomelab.cli", "chat", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for flag in ("--host", "--port", "--share", "--engine"):
        assert flag in out.stdout


def app_args(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser()
    app.add_arguments(p)
    return p.parse_args(argv)


@pytest.fixture
def tiny_run(tmp_home: Path, smollm2_dir: Path) -> Path:
    """A finished run dir as training writes it: a real (tiny, r=2, non-zero) LoRA adapter on SmolLM2."""
    from peft import LoraConfig, get_peft_model

    from tomelab.models import load_model

    run = tmp_home / "runs" / "tiny" / "smollm2-135m-instruct" / "0"
    run.mkdir(parents=True)
    model = load_model("smollm2-135m-instruct")
    # init_lora_weights=False: B is random too, so the adapter visibly changes the output
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(run / "adapter"))
    (run / "config.json").write_text(json.dumps({"variant": "tiny", "base": "smollm2-135m-instruct", "seed": 0}))
    (run / "metrics.json").write_text(json.dumps({"variant": "tiny", "final_val_loss": 2.5}))
    return run


def test_picker_lists_a_finished_run_and_serves_its_adapter(tiny_run: Path, tmp_path: Path) -> None:
    from tomelab.inference import GenerationSettings

    cfg = app.AppConfig(results_dir=str(tmp_path / "results"), data_cards_dir=str(tmp_path / "cards"), engine="transformers")
    entries, winner = app.discover_models(cfg)
    assert winner is None and [e.kind for e in entries] == ["base", "run"]
    run_entry = entries[1]
    assert run_entry.variant == "tiny" and Path(run_entry.ref) == tiny_run
    assert "final_val_loss=2.5" in app.info_markdown(run_entry, cfg)
    pool = app.ModelPool(cfg, entries)
    s = GenerationSettings(temperature=0.0, max_new_tokens=6)
    base_ans = pool.get(entries[0].key).generate([{"role": "user", "content": "What is the capital of France?"}], s)
    run_ans = pool.get(run_entry.key).generate([{"role": "user", "content": "What is the capital of France?"}], s)
    assert run_ans.n_tokens >= 1
    assert run_ans.text != base_ans.text  # the adapter was merged in, not silently dropped


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
    """The real app (no winner, real SmolLM2, transformers engine) on a loopback port."""
    tmp = tmp_path_factory.mktemp("app")
    with pytest.MonkeyPatch.context() as mp:
        home = tmp / "artifacts"
        home.mkdir()
        (home / "models").symlink_to(smollm2_dir.parent, target_is_directory=True)
        mp.setenv("TOMELAB_HOME", str(home))
        cfg = app.AppConfig(port=_free_port(), results_dir=str(tmp / "results"), data_cards_dir=str(tmp / "cards"),
                            engine=os.environ.get("TOMELAB_TEST_ENGINE", "transformers"), threads=2,
                            max_new_tokens=16, concurrency_limit=2, context_length=512)
        demo = app.create(cfg)
        demo.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{cfg.port}/", cfg
        finally:
            demo.close()


@pytest.mark.e2e
def test_twenty_concurrent_chats_zero_errors(live_app) -> None:
    """Load test on loopback: 20 concurrent chats through gradio_client, bounded in count and time."""
    from gradio_client import Client

    url, cfg = live_app
    # queued requests wait silently for minutes on a busy CPU: httpx's 5 s read timeout is not an app error
    client = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
    key = "base: smollm2-135m-instruct"
    prompts = [f"Name one fruit that starts with the letter {chr(65 + i)}." for i in range(20)]

    def one(prompt: str) -> tuple[float, str | None, str | None]:
        t0 = time.perf_counter()
        try:
            job = client.submit(prompt, [], key, 0.7, 0.9, 12, "Answer in one short sentence.", api_name="/chat")
            history, _, status = job.result(timeout=240)
            return time.perf_counter() - t0, _text(history[-1]) if history else "", None
        except Exception as e:  # counted, not raised: the test reports how many failed
            return time.perf_counter() - t0, None, f"{type(e).__name__}: {e}"

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - t0
    errors = [r[2] for r in results if r[2] is not None]
    lat = sorted(r[0] for r in results if r[2] is None)
    p50, p95 = (statistics.median(lat), lat[int(0.95 * (len(lat) - 1))]) if lat else (float("nan"), float("nan"))
    summary = {"chats": 20, "errors": len(errors), "max_new_tokens": 12, "concurrency_limit": cfg.concurrency_limit,
               "engine": cfg.engine, "wall_s": round(wall, 2), "p50_s": round(p50, 2), "p95_s": round(p95, 2),
               "max_s": round(lat[-1], 2) if lat else None}
    out = REPO / "artifacts" / "test-artifacts" / "app_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nload test: {summary}")
    assert errors == [], errors
    assert all(text and text.strip() for _, text, _ in results), results
    assert wall < 240


def test_server_answers_compare_with_both_speeds(live_app) -> None:
    from gradio_client import Client

    url, _ = live_app
    client = Client(url, verbose=False)
    key = "base: smollm2-135m-instruct"
    a, a_stat, b, b_stat = client.predict("Say hello.", key, key, 0.0, 0.9, 8, "", api_name="/compare")
    assert _text(a[-1]) and _text(b[-1])
    assert "tok/s" in a_stat and "tok/s" in b_stat
    assert _text(a[-1]) == _text(b[-1])  # greedy, same model: identical


def test_server_truncates_long_request_with_note(live_app) -> None:
    from gradio_client import Client

    url, _ = live_app
    client = Client(url, verbose=False)
    long = "Read this note. " + "lorem ipsum " * 2500 + "\nNow answer: what is the capital of France?"
    history, _, status = client.predict(long, [], "base: smollm2-135m-instruct", 0.0, 0.9, 8, "", api_name="/chat")
    assert _text(history[-1]).strip()  # answered, not an error
    assert "Truncated" in status and "cut" in status


BROWSER_DRIVER = r'''
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, shot = sys.argv[1], sys.argv[2]
opts = Options()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--disable-gpu"):
    opts.add_argument(a)
drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
out = {"lengths": []}
try:
    drv.get(url)
    deadline = time.time() + 60
    while time.time() < deadline and not drv.find_elements(By.CSS_SELECTOR, "#msg textarea"):
        time.sleep(0.2)
    out["banner"] = drv.find_element(By.CSS_SELECTOR, "#banner").text
    box = drv.find_element(By.CSS_SELECTOR, "#msg textarea")
    box.send_keys("Write two sentences about the sea.")
    drv.find_element(By.CSS_SELECTOR, "#send").click()
    deadline = time.time() + 90
    status = ""
    while time.time() < deadline:
        bots = drv.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
        text = bots[-1].text if bots else ""
        if text and (not out["lengths"] or out["lengths"][-1] != len(text)):
            out["lengths"].append(len(text))
        status = drv.find_element(By.CSS_SELECTOR, "#status").text
        if "tok/s" in status and "tokens" in status and text:
            # the status line also updates while streaming: wait until the text stops growing
            time.sleep(0.5)
            bots = drv.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
            if bots and len(bots[-1].text) == out["lengths"][-1] and not drv.find_elements(By.CSS_SELECTOR, ".generating, .pending"):
                break
        time.sleep(0.03)
    out["answer"] = drv.find_elements(By.CSS_SELECTOR, "#chatbot .bot")[-1].text if drv.find_elements(By.CSS_SELECTOR, "#chatbot .bot") else ""
    out["status"] = status
    drv.save_screenshot(shot)
finally:
    drv.quit()
print(json.dumps(out))
'''


@pytest.mark.browser
def test_browser_sends_message_and_sees_streamed_answer(live_app, tmp_path: Path) -> None:
    """Headless Chromium (Debian package) driven by selenium: type, send, watch the answer grow."""
    import importlib.util

    # selenium from the test extra; a separate venv (as the Argilla UI test uses) also works
    py = Path(sys.executable) if importlib.util.find_spec("selenium") else REPO / ".venv-selenium" / "bin" / "python"
    if not py.exists() or not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.skip("needs `make system-deps` (Debian chromium chromium-driver) and selenium (`pip install -e .[test]`)")
    url, _ = live_app
    shot = REPO / "artifacts" / "test-artifacts" / "app_browser.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver = tmp_path / "driver.py"
    driver.write_text(BROWSER_DRIVER)
    r = subprocess.run([str(py), str(driver), url, str(shot)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "No winner" in out["banner"]
    assert out["answer"].strip(), out
    assert len(out["lengths"]) >= 2 and out["lengths"][0] < out["lengths"][-1], f"answer did not stream: {out}"
    assert "tok/s" in out["status"]
    assert shot.is_file() and shot.stat().st_size > 10_000
    print(f"\nbrowser: streamed in {len(out['lengths'])} visible steps; screenshot {shot}")


def test_committed_winner_from_another_checkout_is_relocated_or_falls_back(tmp_home, tmp_path):
    """winner.json is committed with the run's absolute path; on another machine the app must find the
    same run under its own runs dir, or serve the base model, never crash."""
    import app as app_module
    from tomelab import paths

    results = tmp_path / "results"
    results.mkdir()
    winner = {"variant": "v", "base": "smollm2-135m-instruct", "seed": 1,
              "run_dir": "/elsewhere/artifacts/runs/v/smollm2-135m-instruct/1", "model_dir": None}
    (results / "winner.json").write_text(json.dumps(winner))
    assert app_module.read_winner(results) is None  # not trained here: base model + banner

    local = paths.runs_dir() / "v" / "smollm2-135m-instruct" / "1"
    (local / "adapter").mkdir(parents=True)
    found = app_module.read_winner(results)
    assert found is not None and Path(found["run_dir"]) == local
