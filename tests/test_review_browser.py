"""A person's path through the real Argilla UI: headless Chromium logs in as the annotator, opens
the dataset, picks a label and submits; `pull` must then see that label.

Needs the server (scripts/argilla.sh start) and the browser (scripts/argilla.sh setup-browser:
Debian chromium + chromium-driver, selenium in .venv-selenium because its urllib3 2.x breaks
opensearch-py). With TOMELAB_ARGILLA_REQUIRED=1 anything missing FAILS; locally it skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import polars as pl
import pytest

from curation.review.client import check_server, connect, find_dataset, local_server_dir, read_env_file, resolve_target
from curation.review.config import ReviewConfig
from curation.review.data import review_dir
from curation.review.pull import pull
from curation.review.push import push
from test_review_fixtures import make_variant

pytestmark = [pytest.mark.argilla, pytest.mark.browser]

REPO = Path(__file__).resolve().parent.parent
SELENIUM_PY = Path(os.environ.get("TOMELAB_SELENIUM_VENV", REPO / ".venv-selenium")) / "bin" / "python"

DRIVER = r'''
import os, sys, time
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from selenium.webdriver.support import expected_conditions as EC

url, dataset_id, label, shot, chromium, chromedriver = sys.argv[1:7]
user, password = os.environ["UI_USER"], os.environ["UI_PASSWORD"]  # never on the command line (ps shows it)
opts = webdriver.ChromeOptions()
for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
    opts.add_argument(a)
opts.binary_location = chromium
d = webdriver.Chrome(service=Service(chromedriver), options=opts)
wait = WebDriverWait(d, 60)
try:
    d.get(url + "/sign-in")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input.input-field__input")))
    time.sleep(3)  # the form ignores typing until the app has hydrated
    user_in, pass_in = d.find_elements(By.CSS_SELECTOR, "input.input-field__input")[:2]
    user_in.send_keys(user)
    pass_in.send_keys(password)
    d.find_element(By.CSS_SELECTOR, "button.form__button[type=submit]").click()
    wait.until(lambda drv: "/sign-in" not in drv.current_url)
    d.get(f"{url}/dataset/{dataset_id}/annotation-mode")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, f"label[for=decision_{label}]")))
    time.sleep(2)
    d.find_element(By.CSS_SELECTOR, f"label[for=decision_{label}]").click()
    wait.until(lambda drv: drv.find_element(By.ID, f"decision_{label}").is_selected())
    d.find_element(By.CSS_SELECTOR, "button.button--submit").click()
    time.sleep(3)
    d.save_screenshot(shot)
    print("SUBMITTED", d.current_url)
finally:
    d.quit()
'''


def _missing() -> str | None:
    if not SELENIUM_PY.exists():
        return f"selenium venv {SELENIUM_PY.parent.parent} missing: run `scripts/argilla.sh setup-browser`"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "chromium/chromedriver missing: run `scripts/argilla.sh setup-browser`"
    try:
        check_server(resolve_target(), timeout_s=3)
    except Exception as e:  # noqa: BLE001
        return f"Argilla server not available ({e}): run `scripts/argilla.sh start`"
    return None


_REASON = _missing()
if _REASON and not os.environ.get("TOMELAB_ARGILLA_REQUIRED"):
    pytest.skip(_REASON, allow_module_level=True)


def test_annotator_submits_in_browser_and_pull_sees_it(tmp_home, shared_data, tmp_path):
    if _REASON:
        pytest.fail(f"TOMELAB_ARGILLA_REQUIRED is set but: {_REASON}")
    target = resolve_target()
    creds = read_env_file(local_server_dir() / "credentials.env")
    name = f"b{uuid.uuid4().hex[:8]}"
    df = make_variant(name, shared_data, n=8)
    cfg = ReviewConfig(n=1, strategy="low-score", embed_model="minilm")  # one record, so the page shows exactly it
    client = connect(target)
    try:
        push(name, cfg, target)
        ds = find_dataset(client, cfg, name)
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        shot = tmp_path / "review_browser.png"  # a test artefact under pytest's tmp dir, never in the repo
        # The suggestion pre-selects "drop" for the lowest-scored row: the human overrides it.
        proc = subprocess.run(
            [str(SELENIUM_PY), str(script), target.url, str(ds.id), "keep", str(shot),
             shutil.which("chromium"), shutil.which("chromedriver")],
            capture_output=True, text=True, timeout=180,
            env={**os.environ, "UI_USER": creds["TOMELAB_ARGILLA_ANNOTATOR"],
                 "UI_PASSWORD": creds["TOMELAB_ARGILLA_ANNOTATOR_PASSWORD"]},
        )
        assert proc.returncode == 0 and "SUBMITTED" in proc.stdout, proc.stdout + proc.stderr
        st = pull(name, cfg, target)
        resp = pl.read_parquet(review_dir(name) / "responses.parquet")
        lowest = df.sort("quality_score")["id"][0]
        assert st.kept == 1
        assert resp.select("id", "annotator", "decision", "status").rows() == [(lowest, "annotator", "keep", "submitted")]
        assert shot.stat().st_size > 10_000
        print(f"\nscreenshot: {shot}")
    finally:
        ds = find_dataset(client, cfg, name)
        if ds is not None:
            ds.delete()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
