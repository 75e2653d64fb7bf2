"""End to end in a real browser: Debian's Chromium driven by Playwright against `streamlit run app.py`.

Screenshots land in ``test-artifacts/`` for a person to look at.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
DEMO_TARGET_CELLS = 393

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail("Chromium is missing in CI: tests/install_browser.sh should have installed it", pytrace=False)
    pytest.skip("Chromium is not installed (run tests/install_browser.sh as root)", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Streamlit server on localhost with the demo loaded and its own run folder."""
    port = _free_port()
    # one torch thread, as in conftest.py: on a busy 2-core machine two threads stall each other (2× slower here)
    env = {**os.environ, "ACSLEUTH_RUNS_DIR": str(tmp_path_factory.mktemp("runs")), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
               "--server.headless", "true", "--server.address", "127.0.0.1", "--", "--demo"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the Streamlit server did not start within 60 s")
    yield url
    process.terminate()
    process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _shot_tall(page, name: str, height: int) -> None:
    """Streamlit scrolls inside its own container, so a full-page shot is one viewport: grow it for the shot."""
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": height})
    page.wait_for_timeout(1500)
    _shot(page, name)
    page.set_viewport_size(size)


def _lasso_everything(page, chart) -> None:
    """Draw a lasso around the whole plotting area of a plotly chart (its default drag mode)."""
    area = chart.locator(".nsewdrag").first.bounding_box()
    left, top = area["x"] + 3, area["y"] + 3
    right, bottom = area["x"] + area["width"] - 3, area["y"] + area["height"] - 3
    page.mouse.move(left, top)
    page.mouse.down()
    for x, y in ((right, top), (right, bottom), (left, bottom), (left, top + 1)):
        page.mouse.move(x, y, steps=8)
    page.mouse.up()


def _fill_correct_form(page, *, method: str, labels: str) -> bool:
    """Open the Correct form if it is folded, fill it (5 epochs) and say whether it holds what was asked."""
    page.get_by_text("Correct batch effects").wait_for(timeout=30_000)
    form = page.locator("[data-testid='stForm']")
    if not form.is_visible():
        page.get_by_text("Correct batches", exact=True).first.click()
        form.wait_for(timeout=30_000)
    form.get_by_text(method).first.click()  # the radio input itself is hidden behind its label
    menu = form.get_by_role("combobox", name="Labels to measure biology kept")
    menu.click()
    page.get_by_role("option", name=labels, exact=True).click(timeout=10_000)
    # no Enter: inside a form it submits, and the button click would start a second correction
    epochs = form.get_by_role("spinbutton", name="Epochs per module (0 = automatic)")
    epochs.fill("5")
    chosen = menu.input_value(), epochs.input_value(), form.get_by_role("radio", name=method).is_checked()
    return chosen == (labels, "5", True)


def _correct(page, *, method: str, labels: str) -> None:
    """Fill the Correct form, run it and wait for its numbers.

    The page reruns when a finished job is picked up, which can fold the form or close a menu under the
    mouse: the form is filled again until it holds the choices.
    """
    for _ in range(3):
        try:
            if _fill_correct_form(page, method=method, labels=labels):
                break
        except sync_api.TimeoutError:
            page.keyboard.press("Escape")
        page.wait_for_timeout(2000)
    else:
        pytest.fail(f"the Correct form would not take {method!r} with labels {labels!r}")
    results = page.get_by_text("Batch mixing and biology")
    earlier = results.count() > 0
    page.get_by_role("button", name="Correct batches").click()
    if earlier:  # the last correction's numbers go while the new one runs
        results.wait_for(state="detached", timeout=60_000)
    results.wait_for(timeout=240_000)
    page.locator("[data-testid='stMetric']").nth(4).wait_for(timeout=30_000)


def test_demo_trains_shows_scores_corrects_finds_subtypes_exports_and_survives_a_refresh(server, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.goto(f"{server}/Detect")
    epochs = page.get_by_role("spinbutton", name="Epochs (0 = automatic)")
    epochs.fill("20")
    epochs.press("Enter")
    page.get_by_role("button", name="Train and score").click()
    page.get_by_text("Anomaly scores").wait_for(timeout=240_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    _shot(page, "detect_histogram")
    run_url = page.url
    assert "run=" in run_url
    # a 20-epoch model may call nothing: call the top fifth so there are anomalies to split into subtypes
    page.get_by_text("expected anomaly fraction", exact=True).click()
    fraction = page.get_by_role("spinbutton", name="Expected anomaly fraction")
    fraction.fill("0.2")
    page.get_by_role("button", name="Apply threshold").click()
    page.get_by_text("(your expected anomaly fraction)").wait_for(timeout=30_000)

    page.get_by_role("link", name="Next: correct batch effects").click()
    # the paper's style transfer, barely trained, decodes cells away from their type: the page must say so in words
    _correct(page, method="Style transfer", labels="cell_type")
    page.get_by_text("The correction lost some biology").wait_for(timeout=30_000)
    _shot_tall(page, "correct_style_transfer_warning", 1600)
    _correct(page, method="Kin shift", labels="cell_type")
    page.get_by_text("Biology kept: every").wait_for(timeout=30_000)
    page.wait_for_timeout(3000)
    assert page.get_by_role("button", name="Cancel correction").count() == 0, "one click started one correction"
    for metric in ("iLISI", "Reference transfer (cell_type)", "Label silhouette (ASW) (cell_type)"):
        assert page.get_by_text(metric).count() >= 1, metric
    page.locator(".js-plotly-plot").nth(1).wait_for(timeout=30_000)
    _shot_tall(page, "correct_results", 2600)

    page.get_by_role("link", name="Next: split the anomalies into subtypes").click()
    page.get_by_role("button", name="Find subtypes").click()
    page.get_by_text("Subtype sizes per sample").wait_for(timeout=240_000)
    chart = page.locator(".js-plotly-plot").first
    chart.wait_for(timeout=30_000)
    _lasso_everything(page, chart)
    page.get_by_text("cells selected").wait_for(timeout=30_000)
    _shot_tall(page, "subtypes", 2600)
    export = page.get_by_role("button", name="selected cells (CSV)")
    n_selected = int(export.inner_text().split()[2])
    with page.expect_download() as download:
        export.click()
    rows = [line for line in Path(download.value.path()).read_text().splitlines() if not line.startswith("#")]
    header = rows[0].split(",")
    assert "acsleuth_subtype" in header and len(rows) - 1 == n_selected > 0
    subtypes = {row.split(",")[header.index("acsleuth_subtype")] for row in rows[1:]}
    assert subtypes and "" not in subtypes, "every selected cell is an anomaly with a subtype"

    page.get_by_role("link", name="Next: export every cell with its subtype").click()
    page.get_by_role("button", name="Cell table (CSV)").wait_for(timeout=60_000)
    _shot(page, "export")
    with page.expect_download() as download:
        page.get_by_role("button", name="Cell table (CSV)").click()
    lines = Path(download.value.path()).read_text().splitlines()
    provenance = [line for line in lines if line.startswith("#")]
    rows = [line for line in lines if not line.startswith("#")]
    assert any("ACsleuth Studio" in line for line in provenance)
    assert rows[0].split(",")[:3] == ["cell", "acsleuth_batch", "acsleuth_score"]
    assert len(rows) - 1 == DEMO_TARGET_CELLS
    cookies = context.storage_state()  # the same browser later: its owner cookie opens its runs
    context.close()

    refreshed = browser.new_context(viewport={"width": 1400, "height": 1000}, storage_state=cookies).new_page()
    refreshed.goto(run_url)
    refreshed.get_by_text("Anomaly scores").wait_for(timeout=60_000)
    refreshed.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    _shot(refreshed, "detect_after_refresh")
    refreshed.context.close()
