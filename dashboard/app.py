"""Prismatic Dynamics dashboard. `main()` only switches between views; each sidebar panel
returns the user's choices; data code (dashboard/data.py) never touches widgets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `streamlit run dashboard/app.py` puts this folder, not the repository, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import charts, data, verdict  # noqa: E402
from dashboard.serve import RUNS_DIR_ENV  # noqa: E402
from prismatic import db  # noqa: E402
from prismatic.config import DEFAULT_RUNS_DIR  # noqa: E402

REFRESH_S = 3
LEVEL_COLOURS = {"meaningful": "green", "weak": "orange", "converging": "red", "unknown": "gray"}
VERDICT_ICONS = {"yes": "✅", "no": "❌", "mixed": "⚠️", "not enough data": "⏳"}


def runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, DEFAULT_RUNS_DIR))


# --- cached, incremental reads -------------------------------------------------------------------


def rows_for(info: data.RunInfo) -> pd.DataFrame:
    """All rows of a run; re-reads only rows newer than those held, and only after a commit.

    The cache is keyed by database path and change marker, so two runs never share an entry
    and a column added mid-run shows up on the next commit."""
    cache: dict = st.session_state.setdefault("rows_cache", {})
    key = str(info.db_path)
    marker = db.change_marker(info.db_path)
    held = cache.get(key)
    if held is not None and held["marker"] == marker:
        return held["df"]
    if held is None or held["df"].empty:
        df = data.load_dynamics(info.db_path)
    else:
        old = held["df"]
        new = data.load_dynamics(info.db_path, after_step=int(old["step"].max()))
        df = pd.concat([old, new], ignore_index=True) if not new.empty else old
        if set(new.columns) - set(old.columns) or _row_count(info) != len(df):
            df = data.load_dynamics(info.db_path)  # a new column or a late, older step
    cache[key] = {"marker": marker, "df": df}
    return df


def _row_count(info: data.RunInfo) -> int:
    with data._reader(info.db_path) as conn:
        return db.count_steps(conn)


# --- sidebar -------------------------------------------------------------------------------------


def sidebar_runs(runs: list[data.RunInfo]) -> list[data.RunInfo]:
    st.sidebar.header("Runs")
    status_filter = st.sidebar.multiselect(
        "Status", sorted({r.status for r in runs}), default=[], placeholder="any status"
    )
    text = st.sidebar.text_input("Filter by name or hash", "")
    shown = [
        r
        for r in runs
        if (not status_filter or r.status in status_filter)
        and (text.lower() in r.name.lower() or text.lower() in r.run_hash)
    ]
    shown.sort(key=lambda r: r.last_update or 0, reverse=True)
    labels = {r.label: r for r in shown}
    default = list(labels)[:1]
    picked = st.sidebar.multiselect("Open (several to compare)", list(labels), default=default)
    return [labels[p] for p in picked]


def sidebar_chart_options() -> dict:
    st.sidebar.header("Chart")
    tiers = [
        t
        for t in charts.TIERS
        if st.sidebar.checkbox(charts.TIER_LABELS[t], value=True, key=f"tier_{t}")
    ]
    whole = st.sidebar.checkbox("whole-gradient norm", value=False)
    return {"tiers": tiers, "whole": whole}


# --- views ---------------------------------------------------------------------------------------


def show_problem(problem: data.Problem) -> None:
    st.warning(f"**No data** — {problem.message}")
    st.info(f"**Fix:** {problem.fix}")


def header(info: data.RunInfo, df: pd.DataFrame, experts: list[int]) -> None:
    st.subheader(f"{info.name or 'run'} · `{info.run_hash}` · {info.status}")
    cols = st.columns(4)
    cols[0].metric("steps logged", len(df))
    cols[1].metric("last step", int(df["step"].max()))
    cols[2].metric("experts × layers", f"{len(experts)} × {info.layers or '?'}")
    cols[3].metric("mixing", info.mixing or "?")
    if info.mixing == "smear":
        st.warning(
            "Mixing mode is **smear**: every expert's gradient is the same tensor times its "
            "routing weight, so directional divergence is **zero by construction**. Use "
            "`outputs` or `topk` mixing to test divergence."
        )
    perturbed = verdict.perturbed_experts(df, len(experts))
    if not perturbed:
        return
    w = verdict.window_size(len(df))
    parts = []
    for e in perturbed:
        column = df[db.expert_column(e, "divergence")].dropna()
        latest = float(column.iloc[-1]) if len(column) else None
        _, recent = verdict.divergence_windows(df, e)
        level = verdict.divergence_level(recent)
        latest_text = f"{latest:.4f}" if latest is not None else "–"
        recent_text = f"{recent:.4f}" if recent is not None else "–"
        parts.append(
            f"expert {e}: latest **{latest_text}**, last-{w} mean "
            f":{LEVEL_COLOURS[level]}[**{recent_text}** ({level})]"
        )
    st.markdown(
        "**Divergence** (1 − cosine to expert 0; > 0.05 meaningful, < 0.01 converging) — "
        + " · ".join(parts)
    )


def verdict_panel(df: pd.DataFrame, n_experts: int) -> None:
    st.markdown("#### Verdict")
    for answer in verdict.answer_all(df, n_experts):
        icon = VERDICT_ICONS.get(answer.verdict, "")
        st.markdown(f"{icon} **{answer.question}** — *{answer.verdict}*. {answer.summary}")


def dynamics_view(info: data.RunInfo, options: dict) -> None:
    df = rows_for(info) if info.db_path.is_file() else None
    problem = data.diagnose_run(info, df)
    if problem is not None and problem.kind not in ("all_zero", "missing_experts"):
        show_problem(problem)
        return
    assert df is not None
    experts = data.experts_in(df)
    header(info, df, experts)
    if problem is not None:
        show_problem(problem)
    verdict_panel(df, len(experts))
    fig, left_out = charts.dynamics_figure(df, experts, options["tiers"], options["whole"])
    st.plotly_chart(fig, key=f"dynamics_{info.run_hash}")
    if left_out:
        st.caption(f"{left_out} value(s) ≤ 0 left out: they cannot sit on a log axis.")
    st.download_button(
        "Download CSV",
        df.to_csv(index=False),
        f"{info.run_hash}-dynamics.csv",
        key=f"csv_{info.run_hash}",
    )


def dynamics_tab(selected: list[data.RunInfo], options: dict) -> None:
    for info in selected:
        dynamics_view(info, options)


def runs_tab(runs: list[data.RunInfo]) -> None:
    table = pd.DataFrame(
        [
            {
                "hash": r.run_hash,
                "name": r.name,
                "strategy": r.strategy,
                "scale": r.scale,
                "sparsity": r.sparsity,
                "mixing": r.mixing,
                "status": r.status,
                "steps logged": r.steps,
                "last update": pd.to_datetime(r.last_update, unit="s") if r.last_update else None,
            }
            for r in runs
        ]
    )
    st.dataframe(table, hide_index=True)


def main() -> None:
    st.set_page_config(page_title="Prismatic Dynamics", layout="wide")
    st.title("Prismatic Dynamics")
    folder = runs_dir()
    problem = data.diagnose_runs_dir(folder)
    if problem is not None:
        show_problem(problem)
        return
    runs = data.list_runs(folder)
    selected = sidebar_runs(runs)
    options = sidebar_chart_options()
    live = any(r.status == "live" for r in selected)
    dynamics, runs_view = st.tabs(["Dynamics", "Runs"])
    with dynamics:
        if not selected:
            st.info("Pick a run in the sidebar.")
        elif live:
            st.fragment(run_every=REFRESH_S)(dynamics_tab)(selected, options)
        else:
            dynamics_tab(selected, options)
    with runs_view:
        runs_tab(runs)


main()
