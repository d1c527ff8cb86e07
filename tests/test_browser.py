"""The dashboard in a real browser: `prismatic dashboard` as a real process, headless Chromium
through Playwright. The Dynamics chart must draw with its traces, and a live run must update in
place when the collector's store commits new steps. Screenshots go to test-artifacts/.

Needs Debian's `chromium` (`apt-get install chromium`); skipped without it, unless
PRISMATIC_REQUIRE_BROWSER=1 (CI), where a missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_fixtures import step_row, synthetic_metrics, synthetic_rows, write_run
from net_support import free_port

from collector.store import RunStore

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIVE_RUN, CONTROL_RUN = "5a5a5a5a5", "0c0c0c0c0"
LEGEND = '[data-testid="stPlotlyChart"] .legend .traces .legendtext'

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _browser_or_skip():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("PRISMATIC_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PRISMATIC_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    return sync_playwright


def wait_healthy(port: int, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "prismatic dashboard exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the dashboard never became healthy")


@pytest.fixture
def dashboard(tmp_path):
    """A runs folder (a live dual-sided run and a finished scale-0 control) and a real server."""
    runs = tmp_path / "runs"
    store = RunStore(runs / LIVE_RUN)
    store.update_run(
        name="dual-sided",
        status="live",
        last_seen=time.time(),
        mixing="outputs",
        model={"layers": 2, "experts": 3, "scale": 1.0, "strategy": "dual_sided"},
    )
    for row in synthetic_rows(range(0, 600, 5)):
        store.add_step(row)
    store.flush()
    control = synthetic_rows(range(0, 600, 5), scale=0.0)
    write_run(runs, CONTROL_RUN, control, name="control", scale=0.0, last_seen=time.time() - 900)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prismatic.cli", "dashboard", "--runs-dir", str(runs)]
        + ["--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(port, proc)
        yield f"http://127.0.0.1:{port}/", store
    finally:
        store.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dynamics_chart_draws_its_traces_and_a_live_run_updates_in_place(dashboard):
    sync_playwright = _browser_or_skip()
    url, store = dashboard
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1500})
            page.goto(url)
            page.wait_for_selector(LEGEND, state="attached", timeout=90_000)
            names = page.locator(LEGEND).all_text_contents()
            assert names == [
                f"expert {e} ({'clean' if e == 0 else 'perturbed'}) {tier}"
                for e in range(3)
                for tier in ("top 5%", "bottom 5%", "middle 90%")
            ]
            plotted = page.evaluate(
                "() => { const gd = document.querySelector('.js-plotly-plot');"
                " return [gd.layout.yaxis.type, gd._fullData.map(t => t._length)]; }"
            )
            assert plotted == ["log", [120] * 9]
            page.screenshot(path=str(ARTIFACTS / "dashboard-dynamics.png"), full_page=True)

            # the collector commits 40 more steps: the open page follows without a reload
            page.evaluate("() => { window.notReloaded = true; }")
            for step in range(600, 800, 5):
                store.add_step(step_row(step, synthetic_metrics(step)))
            store.update_run(last_seen=time.time())
            store.flush()
            page.wait_for_function(
                "() => [...document.querySelectorAll('[data-testid=\"stMetricValue\"]')]"
                ".some(e => e.textContent.trim() === '795')",
                timeout=60_000,
            )
            # While Streamlit swaps in the new chart, there is a moment without one: not yet.
            page.wait_for_function(
                "() => { const gd = document.querySelector('.js-plotly-plot');"
                " return !!(gd && gd._fullData) && gd._fullData.length === 9"
                " && gd._fullData.every(t => t._length === 160); }",
                timeout=30_000,
            )
            assert page.evaluate("() => window.notReloaded === true")
            page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)
        finally:
            browser.close()
