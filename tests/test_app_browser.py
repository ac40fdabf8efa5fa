"""A newcomer's path through the real app in headless Chromium: the banner names the demo's winner,
a chat answer streams from it, and each Lab view shows what it should (leaderboard rows, the data
card, a dropped row with its reason, two variants side by side, the review link). One screenshot per
view is saved under the test's tmp dir (printed with -s), never in the repo.

Needs chromium + chromedriver (`make system-deps`) and selenium (`scripts/argilla.sh setup-browser`
puts it in .venv-selenium). Missing ones skip, unless TOMELAB_BROWSER_REQUIRED=1."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app_world import BASE, REFUSAL_DETAIL, RUN_REL, WINNER, write_results, write_run, write_variants
from tomelab.chat_cli import load_app_module

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parent.parent
SELENIUM_PY = Path(os.environ.get("TOMELAB_SELENIUM_VENV", REPO / ".venv-selenium")) / "bin" / "python"
app = load_app_module()

DRIVER = r'''
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.action_chains import ActionChains

url, shots, chromium, chromedriver = sys.argv[1:5]
opts = Options()
opts.binary_location = chromium
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300", "--disable-gpu"):
    opts.add_argument(a)
drv = webdriver.Chrome(service=Service(chromedriver), options=opts)
out = {"lengths": [], "shots": []}

def wait(pred, what, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = pred()
            if v:
                return v
        except Exception:
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")

def click(find, what, timeout=90):
    """Click what `find` returns once nothing (a loading overlay) covers it."""
    def attempt():
        els = find()
        if not els:
            return False
        els[0].click()
        return True
    wait(attempt, what, timeout)

def text(css):
    els = drv.find_elements(By.CSS_SELECTOR, css)
    return els[0].text if els else ""

def tab(name):
    click(lambda: [e for e in drv.find_elements(By.CSS_SELECTOR, "button[role=tab]") if e.text.strip() == name and e.is_displayed()],
          f"tab {name}")

def shot(name):
    p = f"{shots}/{name}.png"
    drv.save_screenshot(p)
    out["shots"].append(p)

try:
    drv.get(url)
    wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#msg textarea") and drv.find_elements(By.CSS_SELECTOR, "#send"),
         "the chat box")
    time.sleep(1)  # let the page finish its first render
    out["banner"] = text("#banner")
    wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#msg textarea"), "the chat box")[0].send_keys(
        "Write two sentences about the sea.")
    wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#send"), "the send button")[0].click()
    end, status = time.time() + 120, ""
    while time.time() < end:
        bots = drv.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
        t = bots[-1].text if bots else ""
        if t and (not out["lengths"] or out["lengths"][-1] != len(t)):
            out["lengths"].append(len(t))
        status = text("#status")
        if "done (" in status:  # the app's last status line of an answer
            break
        time.sleep(0.03)
    out["answer"], out["status"], out["info"] = drv.find_elements(By.CSS_SELECTOR, "#chatbot .bot")[-1].text, status, text("#info")
    shot("chat")

    tab("Lab")
    out["leaderboard"] = wait(lambda: (t := text("#lab-table")) and "random-aa" in t and t, "leaderboard rows")
    out["rule"] = text("#lab-rule")
    wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#lab-plots img"), "the plots")
    shot("lab_leaderboard")

    tab("Data")
    out["card"] = wait(lambda: (t := text("#lab-card")) and "Dataset card" in t and t, "the data card")
    wait(lambda: drv.find_elements(By.CSS_SELECTOR, "#lab-funnel img"), "the funnel")
    shot("lab_data")

    tab("Rows")
    wait(lambda: "kept rows match" in text("#lab-rows-note"), "kept rows")
    click(lambda: drv.find_elements(By.CSS_SELECTOR, "#lab-rows-reason input"), "the reason filter")
    click(lambda: [o for o in drv.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text.startswith("refusal")],
          "the refusal option")
    out["dropped"] = wait(lambda: (t := text("#lab-rows-table")) and "refusal" in t and "as an AI language model" in t and t,
                          "dropped refusal rows")
    out["rows_note"] = text("#lab-rows-note")
    cell = wait(lambda: [c for c in drv.find_elements(By.CSS_SELECTOR, "#lab-rows-table .body-cell")
                         if c.text.strip() == "refusal" and c.is_displayed()], "a refusal cell")[0]
    drv.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    ActionChains(drv).move_to_element(cell).click().perform()
    out["row_detail"] = wait(lambda: (t := text("#lab-rows-detail")) and "dropped from" in t and t, "the row detail")
    shot("lab_rows")

    tab("Side by side")
    out["side"] = wait(lambda: (t := text("#lab-side-left")) and "kept" in t and t, "side by side rows")
    out["side_note"] = text("#lab-side-note")
    shot("lab_side_by_side")

    tab("Review")
    out["review"] = wait(lambda: text("#lab-review-md"), "the review panel")
    shot("lab_review")
finally:
    drv.quit()
print(json.dumps(out))
'''


def _missing() -> str | None:
    py = Path(sys.executable) if importlib.util.find_spec("selenium") else SELENIUM_PY
    if not py.exists():
        return f"selenium not found (neither in this venv nor {SELENIUM_PY}): run `scripts/argilla.sh setup-browser`"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "chromium/chromedriver missing: run `make system-deps`"
    return None


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory, smollm2_dir):
    """A finished tiny demo (winner = the base weights as a merged run) served on a loopback port."""
    tmp = tmp_path_factory.mktemp("appworld")
    with pytest.MonkeyPatch.context() as mp:
        home = tmp / "artifacts"
        home.mkdir()
        (home / "models").symlink_to(smollm2_dir.parent, target_is_directory=True)
        mp.setenv("TOMELAB_HOME", str(home))
        mp.setenv("ARGILLA_API_URL", "http://127.0.0.1:9")  # nothing answers: the panel says so
        write_variants(home, tmp / "data_cards")
        results = write_results(home / "results" / "demo")
        write_run(home, smollm2_dir)
        cfg = app.AppConfig(port=_free_port(), results_dir=str(results), data_cards_dir=str(tmp / "data_cards"),
                            engine="transformers", threads=2, max_new_tokens=24, context_length=512)
        demo = app.create(cfg)
        demo.launch(server_name=cfg.host, server_port=cfg.port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{cfg.port}/", home
        finally:
            demo.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_newcomer_sees_winner_chat_and_every_lab_view(demo_app, tmp_path: Path) -> None:
    reason = _missing()
    if reason:
        if os.environ.get("TOMELAB_BROWSER_REQUIRED"):
            pytest.fail(reason)
        pytest.skip(reason)
    url, home = demo_app
    py = Path(sys.executable) if importlib.util.find_spec("selenium") else SELENIUM_PY
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    r = subprocess.run([str(py), str(driver), url, str(shots), shutil.which("chromium"), shutil.which("chromedriver")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    raw = json.loads(r.stdout.strip().splitlines()[-1])
    # page text as a person reads it: rendered markdown puts code spans on lines of their own
    out = {k: " ".join(v.replace("`", "").split()).replace(" :", ":") if isinstance(v, str) else v for k, v in raw.items()}
    # the demo's winner is served, and says so
    assert f"Serving the winner of ablation-demo: {WINNER} on {BASE}" in out["banner"]
    assert RUN_REL in out["info"] and "engine" in out["info"].lower()
    assert out["answer"].strip() and "tok/s" in out["status"] and "done (" in out["status"]
    assert len(out["lengths"]) >= 2 and out["lengths"][0] < out["lengths"][-1], f"answer did not stream: {out}"
    # Lab: every leaderboard row, the rule; the card; a dropped row with its reason; side by side; review
    for system in ("base (untouched)", WINNER, "demo-dedup-filter", "random-aa"):
        assert system in out["leaderboard"]
    assert "mde" in out["leaderboard"] and "best mean heldout_nll" in out["rule"]
    assert f"Dataset card: {WINNER}" in out["card"]
    assert "refusal" in out["dropped"] and "filters" in out["dropped"] and REFUSAL_DETAIL.split("'")[1] in out["dropped"]
    assert "3 dropped rows match" in out["rows_note"] and "reason refusal" in out["row_detail"]
    assert "dropped: budget (over_budget)" in out["side"] and "rows are in both" in out["side_note"]
    assert "does not answer" in out["review"]
    for p in out["shots"]:
        assert Path(p).stat().st_size > 10_000
    print(f"\nscreenshots: {shots}")
