"""Prismatic Dynamics dashboard (`prismatic dashboard`, or `streamlit run dashboard/app.py`).

`main()` only switches between views; each sidebar panel is a function that returns the user's
choices; rows come from one process-wide cache that reads only what it lacks. While an opened run
is live, the view sits in a fragment that re-runs on a timer, so the page updates in place.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# `streamlit run dashboard/app.py` puts this folder, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from dashboard import charts, data, figures, problems, verdict, views  # noqa: E402
from dashboard.cache import RunCache  # noqa: E402
from dashboard.serve import RUNS_DIR_ENV  # noqa: E402
from prismatic.config import DEFAULT_RUNS_DIR  # noqa: E402

log = logging.getLogger("dashboard.app")
REFRESH_S = 3.0
RUN_BROWSER = "Run browser"
VIEWS = ("Dynamics", "Divergence", "Routing", "Loss", "Layers", "Heatmap", "Compare", RUN_BROWSER)
ALL_LAYERS = "all layers"


@dataclass
class RunChoice:
    shown: list[data.RunInfo]  # the browser's rows after filter and sort
    opened: list[str]  # run hashes


@st.cache_resource
def run_cache() -> RunCache:
    return RunCache()


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, DEFAULT_RUNS_DIR))


# --- sidebar panels: each returns the user's choices ---------------------------------------------


def sidebar_runs(runs: list[data.RunInfo]) -> RunChoice:
    side = st.sidebar
    side.header("Runs")
    text = side.text_input("Filter", placeholder="name, hash, strategy or mixing", key="filter")
    present = [s for s in data.STATUSES if any(r.status == s for r in runs)]
    statuses = side.multiselect("Status", present, placeholder="any status", key="statuses")
    sort_key = side.selectbox("Sort by", list(data.SORT_KEYS), key="sort")
    descending = side.toggle("Descending", value=True, key="descending")
    shown = data.sort_runs(data.filter_runs(runs, text, statuses), sort_key, descending)
    by_hash = {r.run_hash: r for r in runs}
    linked = st.query_params.get_all("run")  # ?run=HASH&run=HASH opens those runs
    unknown = [h for h in linked if h not in by_hash]
    if unknown:
        instead = "the others" if len(unknown) < len(linked) else "the newest run instead"
        names = ", ".join(f"`{h}`" for h in unknown)
        st.warning(f"No run {names} in `{runs_dir()}` (asked for by `?run=`); opened {instead}.")
    default = [h for h in linked if h in by_hash] or [r.run_hash for r in default_runs(runs)]
    default = [h for h in default if by_hash[h] in shown]
    opened = side.multiselect(
        "Open (several to compare)",
        [r.run_hash for r in shown],
        default=default,
        format_func=lambda h: by_hash[h].label,
        key="open_runs",
    )
    return RunChoice(shown, opened)


def default_runs(runs: list[data.RunInfo]) -> list[data.RunInfo]:
    """The run a researcher most likely came for: the newest live one, else the newest."""
    with_rows = data.sort_runs([r for r in runs if r.steps], "last update")
    live = [r for r in with_rows if r.status == "live"]
    return (live or with_rows or runs)[:1]


def view_picker() -> str:
    return st.radio("View", VIEWS, horizontal=True, label_visibility="collapsed", key="view")


def sidebar_tiers(allow_whole: bool = True) -> tuple[list[str], bool]:
    st.sidebar.header("Tiers")
    tiers = [
        tier
        for tier in charts.TIERS
        if st.sidebar.checkbox(charts.TIER_LABELS[tier], value=True, key=f"tier_{tier}")
    ]
    whole = allow_whole and st.sidebar.checkbox("whole-gradient norm", value=False, key="whole")
    return tiers, whole


def sidebar_layer(n_layers: int) -> list[int] | None:
    """The chosen layer as [index], or None for every layer."""
    options = [ALL_LAYERS, *range(n_layers)]
    picked = st.sidebar.selectbox("Layer", options, key="layer")
    return None if picked == ALL_LAYERS else [int(picked)]


def sidebar_window(first: int, last: int) -> tuple[int, int]:
    """The heatmap's step window; the last quarter of the run by default."""
    if first >= last:
        return first, last
    start = last - (last - first) // 4
    picked = st.sidebar.slider("Heatmap window (steps)", first, last, (start, last), key="window")
    return int(picked[0]), int(picked[1])


def sidebar_compare() -> str:
    return st.sidebar.selectbox("Compare", list(figures.COMPARE_METRICS), key="compare_metric")


# --- reading the opened runs ---------------------------------------------------------------------


def open_runs(
    folder: Path,
    hashes: list[str],
    with_layers: bool = False,
    with_controls: bool = False,
    listed: list[data.RunInfo] | None = None,
) -> list[views.Opened]:
    """Fresh browser rows and cached rows for each opened run (re-read on every refresh);
    `with_controls`: also each run's scale-0 control, for the verdict, looked for among
    `listed` (the folder's runs, listed again when not given)."""
    cache = run_cache()
    every: list[data.RunInfo] = []
    if with_controls:
        every = listed if listed is not None else data.list_runs(folder)
    opened = []
    for run_hash in hashes:
        info = data.read_run_info(folder / run_hash)
        rows = None if info.status in data.NO_ROWS else cache.rows(info.db_path)
        run = views.open_run(info, rows)
        if with_layers and run.chartable and rows is not None:
            run.layers = cache.layers(info.db_path)
        control = data.find_control(info, every) if with_controls else None
        if control is not None:
            label = f"{control.name or 'control'} {control.run_hash}"
            differs = data.control_differences(info, control)
            if differs:
                label += f", run with {'; '.join(differs)}"
            run.control = verdict.Control(label, cache.rows(control.db_path))
        opened.append(run)
    return opened


def view_options(view: str, runs: list[views.Opened]) -> dict:
    if view in ("Dynamics", "Layers"):
        tiers, whole = sidebar_tiers(allow_whole=view == "Dynamics")
        options: dict = {"tiers": tiers, "whole": whole}
        if view == "Layers":
            n_layers = max((r.info.layers or 0 for r in runs), default=0)
            options["layer"] = sidebar_layer(n_layers)
        return options
    if view == "Heatmap":
        steps = [r.rows["step"] for r in runs if r.rows is not None and len(r.rows)]
        first = min((int(s.min()) for s in steps), default=0)
        last = max((int(s.max()) for s in steps), default=0)
        return {"window": sidebar_window(first, last)}
    if view == "Compare":
        return {"metric": sidebar_compare()}
    return {}


def show_view(
    view: str,
    folder: Path,
    hashes: list[str],
    options: dict,
    listed: list[data.RunInfo] | None = None,
) -> None:
    """`listed`: the folder's runs as the page just listed them; a live refresh, which has no
    fresh list, lists them again (so a control started meanwhile is found)."""
    runs = open_runs(
        folder,
        hashes,
        with_layers=view in ("Layers", "Heatmap"),
        with_controls=view in ("Dynamics", "Divergence"),
        listed=listed,
    )
    if view == "Compare":
        views.compare(runs, options["metric"])
    for run in runs if view != "Compare" else []:
        with st.container(border=True):
            if view == "Dynamics":
                views.dynamics(run, options["tiers"], options["whole"])
            elif view == "Divergence":
                views.divergence(run)
            elif view == "Routing":
                views.routing(run)
            elif view == "Loss":
                views.loss(run)
            elif view == "Layers":
                views.layers(run, options["layer"], options["tiers"])
            elif view == "Heatmap":
                views.heatmap(run, options["window"])
    if options.get("live") and not any(r.info.status == "live" for r in runs):
        st.rerun()  # the last live run ended: a full rerun drops the refresh timer


@st.fragment(run_every=REFRESH_S)
def live_view(view: str, folder: Path, hashes: list[str], options: dict) -> None:
    st.caption(
        f"Live: refreshes in place every {REFRESH_S:g} s (read {time.strftime('%H:%M:%S')})."
    )
    show_view(view, folder, hashes, {**options, "live": True})


# --- the page ------------------------------------------------------------------------------------


def main() -> None:
    started = time.perf_counter()
    st.set_page_config(page_title="Prismatic Dynamics", page_icon="🔺", layout="wide")
    st.title("Prismatic Dynamics")
    view = page(runs_dir())
    log.debug("dashboard: %s page ran in %.3f s", view, time.perf_counter() - started)


def page(folder: Path) -> str:
    """Draws the page; returns the view shown (for the timing log line)."""
    runs = data.list_runs(folder)  # once per page run: it opens every run's database
    problem = problems.diagnose_runs_dir(folder, runs)
    if problem is not None:
        views.show_problem(problem)
        return "no data"
    choice = sidebar_runs(runs)
    view = view_picker()
    if view == RUN_BROWSER:
        views.runs_browser(choice.shown, len(runs))
    elif not choice.opened:
        st.info(f"Open a run in the sidebar (*Open*), or look through them in *{RUN_BROWSER}*.")
    else:
        opened = open_runs(folder, choice.opened)
        options = view_options(view, opened)
        if any(r.info.status == "live" for r in opened):
            live_view(view, folder, choice.opened, options)
        else:
            show_view(view, folder, choice.opened, options, listed=runs)
    return view


main()
