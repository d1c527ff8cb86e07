"""Benchmark: the first Dynamics chart of a 100,000-step run, and what the cache saves after it.

Writes the runs with the collector's own RunStore (tests/dashboard_fixtures.py), then measures
side by side in one process:
- first chart: a fresh page (Streamlit AppTest, cold row cache) that opens the 100,000-step run
  and renders the Dynamics view (header, verdict, downsampled chart), against the same for a
  1,000-step run;
- a rerun with nothing new (the cache answers), and a rerun after 10 new steps (reads 10 rows);
- points sent to the browser per series, against rows in the run;
- with Chromium installed, the real server: page load until the chart's legend is drawn.

`first_chart_s` is the page script's own time (it logs it at DEBUG) to draw the first chart
of the long run with a cold row cache: reading the rows, the verdict, the downsampled figure.

Usage: .venv/bin/python bench/dashboard.py [--steps 100000]
The last line printed is one JSON object; `first_chart_s` is the number the issue asks for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from dashboard_fixtures import (  # noqa: E402
    APP,
    plotly_figures,
    step_row,
    synthetic_metrics,
    synthetic_rows,
    values,
    write_run,
)
from streamlit.testing.v1 import AppTest  # noqa: E402

from collector.store import RunStore  # noqa: E402
from dashboard.serve import RUNS_DIR_ENV  # noqa: E402

LONG_RUN, SHORT_RUN, WARM_RUN = "100000aaa", "1000bbbbb", "10ccccccc"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def write_runs(root: Path, steps: int) -> None:
    started = time.perf_counter()
    write_run(root / "long", LONG_RUN, synthetic_rows(range(steps)))
    write_run(root / "short", SHORT_RUN, synthetic_rows(range(1000)))
    write_run(root / "warm", WARM_RUN, synthetic_rows(range(0, 100, 10)))
    print(
        f"fixture: {steps:,} + 1,000 steps written by RunStore in "
        f"{time.perf_counter() - started:.1f} s"
    )


class PageTimes(logging.Handler):
    """Collects the page's own timing line (`dashboard: <view> page ran in <s> s`)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("dashboard: %s page ran in"):
            self.seconds.append(float(record.args[1]))  # type: ignore[index]


TIMES = PageTimes()
logging.getLogger("dashboard.app").addHandler(TIMES)
logging.getLogger("dashboard.app").setLevel(logging.DEBUG)


def page_time(runs_dir: Path) -> tuple[float, float, AppTest]:
    """(the page script's own time, AppTest's wall time around it, the page)."""
    os.environ[RUNS_DIR_ENV] = str(runs_dir)
    at = AppTest.from_file(str(APP), default_timeout=300)
    started = time.perf_counter()
    at.run()
    elapsed = time.perf_counter() - started
    assert not at.exception, at.exception
    assert len(plotly_figures(at)) == 1, "no Dynamics chart drawn"
    return TIMES.seconds[-1], elapsed, at


def rerun_time(at: AppTest) -> float:
    at.run()
    return TIMES.seconds[-1]


TRIVIAL_PAGE = """
import plotly.graph_objects as go
import streamlit as st

st.title("floor")
st.plotly_chart(go.Figure(go.Scatter(x=[1, 2], y=[1, 2], name="a"), layout={"showlegend": True}))
"""


@contextlib.contextmanager
def server(command: list[str]):
    """A server process on a free port, until the block ends; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [c.replace("{port}", str(port)) for c in command]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def browser_times(runs_dir: Path, scratch: Path) -> dict[str, float] | None:
    """A real `prismatic dashboard` and Chromium: seconds from navigation to the drawn legend.

    `floor`: a trivial Streamlit page with one two-point plotly chart (what the browser costs
    on this machine whatever the data); `1k`: the dashboard's first visit (server cold, the
    1,000-step run); `100k`: a new page that opens the long run (`?run=`), cold row cache;
    `100k_cached`: the same again. For each, the time to the page's title and to the chart."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if not Path(CHROMIUM).exists():
        return None
    trivial = scratch / "floor.py"
    trivial.write_text(TRIVIAL_PAGE, encoding="utf-8")
    streamlit = [sys.executable, "-m", "streamlit", "run", str(trivial), "--server.port", "{port}"]
    streamlit += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    dashboard = [sys.executable, "-m", "prismatic.cli", "dashboard", "--runs-dir", str(runs_dir)]
    dashboard += ["--port", "{port}"]
    times: dict[str, float] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        with server(streamlit) as url:
            _chart_after(browser, url)  # the server's first script run
            times["page_title_floor_s"], times["page_chart_floor_s"] = _chart_after(browser, url)
        with server(dashboard) as url:
            for name, address in (
                ("1k", url),
                ("100k", f"{url}?run={LONG_RUN}"),
                ("100k_cached", f"{url}?run={LONG_RUN}"),
            ):
                title_s, chart_s = _chart_after(browser, address)
                times[f"page_title_{name}_s"] = title_s
                times[f"page_chart_{name}_s"] = chart_s
        browser.close()
    return times


def _chart_after(browser, url: str) -> tuple[float, float]:
    """(seconds to the page's title, seconds to the chart's drawn legend) after navigation."""
    page = browser.new_page(viewport={"width": 1440, "height": 1200})
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("h1", timeout=120_000)
    title = time.perf_counter() - started
    page.wait_for_selector(
        '[data-testid="stPlotlyChart"] .legend .traces', state="attached", timeout=120_000
    )
    chart = time.perf_counter() - started
    page.close()
    return round(title, 3), round(chart, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    try:
        write_runs(root, args.steps)

        # Imports, plotly validators and the first script run are paid once, as a server does.
        page_time(root / "warm")

        short_s, _, _ = page_time(root / "short")
        first_s, first_wall_s, at = page_time(root / "long")
        [figure] = plotly_figures(at)
        points = max(len(values(t["x"])) for t in figure["data"])
        cached_s = rerun_time(at)

        store = RunStore(root / "long" / LONG_RUN)
        for step in range(args.steps, args.steps + 10):
            store.add_step(step_row(step, synthetic_metrics(step)))
        store.flush()
        append_s = rerun_time(at)
        store.close()

        browser = None
        if not args.no_browser:
            both = root / "both"
            both.mkdir()
            for folder, run_hash in (("long", LONG_RUN), ("short", SHORT_RUN)):
                (both / run_hash).symlink_to(root / folder / run_hash)
            browser = browser_times(both, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"page script, first chart of {args.steps:,} steps (cold cache): {first_s:.3f} s "
        f"(AppTest wall time around it {first_wall_s:.3f} s)"
    )
    print(
        f"page script, first chart of 1,000 steps (cold cache): {short_s:.3f} s "
        f"(long / short = {first_s / short_s:.2f}x for {args.steps / 1000:.0f}x the rows)"
    )
    print(
        f"page script, rerun with nothing new (cache hit): {cached_s:.3f} s "
        f"(first / cached = {first_s / cached_s:.1f}x)"
    )
    print(
        f"page script, rerun after 10 new steps (reads 10 rows): {append_s:.3f} s "
        f"(first / append = {first_s / append_s:.1f}x)"
    )
    print(
        f"points per series sent: {points:,} of {args.steps:,} rows "
        f"({args.steps / points:.0f}x fewer)"
    )
    for name, seconds in (browser or {}).items():
        print(f"real server + Chromium, {name}: {seconds:.3f} s")
    result = {
        "steps": args.steps,
        "first_chart_s": round(first_s, 3),
        "first_chart_apptest_wall_s": round(first_wall_s, 3),
        "first_chart_1k_s": round(short_s, 3),
        "rerun_cached_s": round(cached_s, 3),
        "rerun_after_append_s": round(append_s, 3),
        "points_per_series": points,
        **(browser or {}),
        "target_s": 1.5,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
