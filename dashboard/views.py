"""The page's views. Each takes runs, their rows and the sidebar's choices, and draws; none reads
widgets of its own except download buttons, so app.main() stays a switch between views."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import charts, figures, verdict
from dashboard.data import RunInfo, experts_in, runs_table
from dashboard.problems import CHART_STILL_USEFUL, Problem, diagnose_run
from prismatic.db import expert_column

LEVEL_COLOURS = {"meaningful": "green", "weak": "orange", "converging": "red", "unknown": "gray"}
# Badges are coloured text, not emoji: they look the same in a browser without emoji fonts.
VERDICT_COLOURS = {
    "yes": "green",
    "sustained": "green",
    "no": "red",
    "collapsing": "red",
    "never diverged": "red",
    "mixed": "orange",
    "not enough data": "gray",
    "not applicable": "gray",
}
STATUS_COLOURS = {
    "live": "green",
    "completed": "blue",
    "failed": "red",
    "interrupted": "orange",
    "stale": "orange",
}


@dataclass
class Opened:
    """One opened run: its browser row, its rows (None without a database) and what is wrong."""

    info: RunInfo
    rows: pd.DataFrame | None
    problem: Problem | None = None
    layers: pd.DataFrame | None = field(default=None, repr=False)
    control: verdict.Control | None = field(default=None, repr=False)  # its scale-0 control

    @property
    def chartable(self) -> bool:
        return self.problem is None or self.problem.kind in CHART_STILL_USEFUL

    @property
    def experts(self) -> list[int]:
        return experts_in(self.rows) if self.rows is not None else []


def open_run(info: RunInfo, rows: pd.DataFrame | None) -> Opened:
    return Opened(info, rows, diagnose_run(info, rows))


def show_problem(problem: Problem) -> None:
    st.warning(f"**No data** — {problem.message}", icon=":material/warning:")
    st.info(f"**Fix:** {problem.fix}", icon=":material/build:")


def download(csv: str | Callable[[], str], name: str, key: str) -> None:
    st.download_button("Download CSV of this chart", csv, name, mime="text/csv", key=key)


def chart(fig: go.Figure, key: str, file_name: str) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
    # Built on click, not on every (live) rerun.
    download(lambda: charts.figure_csv(fig), file_name, f"csv_{key}")


# --- header and verdict --------------------------------------------------------------------------


def header(run: Opened) -> None:
    info, df = run.info, run.rows
    assert df is not None
    _title(run)
    cols = st.columns(6)
    cols[0].metric("steps logged", f"{len(df):,}")
    cols[1].metric("last step", f"{int(df['step'].max()):,}")
    cols[2].metric("experts", len(run.experts))
    cols[3].metric("layers", info.layers if info.layers is not None else "?")
    cols[4].metric("mixing", info.mixing or "?")
    cols[5].metric("scale", f"{info.scale:g}" if info.scale is not None else "?")
    if info.mixing == "smear":
        st.warning(
            "Mixing mode is **smear**: every expert's gradient is the same tensor times its "
            "routing weight, so directional divergence is **zero by construction** here. Use "
            "`outputs` or `topk` mixing to test divergence.",
            icon="⚠️",
        )
    divergence_line(df, len(run.experts), run.control, info.is_control)


def divergence_line(
    df: pd.DataFrame,
    n_experts: int,
    control: verdict.Control | None = None,
    is_control: bool = False,
) -> None:
    """Per perturbed expert: latest and recent-window mean divergence. Coloured by threshold
    as they are; with a control, the excess over the control's recent mean is what is coloured,
    as the verdict judges it; a control's own values are its baseline, left uncoloured."""
    perturbed = verdict.perturbed_experts(df, n_experts)
    if not perturbed:
        return
    parts = []
    for e in perturbed:
        values = df[expert_column(e, "divergence")].dropna()
        latest = float(values.iloc[-1]) if len(values) else None
        _, recent = verdict.windows(df, e, "divergence")
        if is_control:
            parts.append(f"expert {e}: latest {_plain(latest)}, recent mean {_plain(recent)}")
        elif control is None:
            parts.append(
                f"expert {e}: latest {_coloured(latest)}, recent mean {_coloured(recent)} "
                f"({verdict.divergence_level(recent)})"
            )
        else:
            _, baseline = verdict.windows(control.rows, e, "divergence")
            excess = recent - baseline if recent is not None and baseline is not None else None
            parts.append(
                f"expert {e}: latest {_plain(latest)}, recent mean {_plain(recent)}, control "
                f"{_plain(baseline)}, above it {_coloured(excess, signed=True)} "
                f"({verdict.divergence_level(excess)})"
            )
    w = verdict.window_size(len(df))
    if is_control:
        judged = "this scale-0 control's values are the baseline its perturbed runs are judged by"
    elif control is None:
        judged = f"> {verdict.MEANINGFUL} meaningful, < {verdict.CONVERGING} converging"
    else:
        judged = (
            f"judged above its scale-0 control ({control.label}): > {verdict.MEANINGFUL} "
            f"meaningful, < {verdict.CONVERGING} converging"
        )
    st.markdown(
        f"**Divergence** (1 − cosine to expert 0; recent = last {w} logged steps; {judged}) — "
        + " · ".join(parts)
    )


def _plain(value: float | None) -> str:
    return "–" if value is None else f"**{value:.4f}**"


def _coloured(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    shown = f"{value:+.4f}" if signed else f"{value:.4f}"
    return f":{LEVEL_COLOURS[verdict.divergence_level(value)]}[**{shown}**]"


def verdict_panel(run: Opened) -> None:
    assert run.rows is not None
    answers = verdict.answer_all(
        run.rows,
        len(run.experts),
        run.info.mixing,
        is_control=run.info.is_control,
        control=run.control,
    )
    st.markdown("##### Verdict")
    for column, answer in zip(st.columns(len(answers)), answers, strict=True):
        badge = f":{VERDICT_COLOURS.get(answer.verdict, 'gray')}-badge[{answer.verdict}]"
        column.markdown(f"**{answer.question}** {badge}  \n{answer.summary}")
    numbers = [
        {"question": a.question, "expert": n.expert, "quantity": n.quantity, "value": n.value}
        for a in answers
        for n in a.numbers
    ]
    with st.expander("The numbers behind the verdict, and its rules"):
        st.caption(verdict.RULES)
        if numbers:
            st.table(pd.DataFrame(numbers), hide_index=True, border="horizontal")


# --- views ---------------------------------------------------------------------------------------


def dynamics(run: Opened, tiers: list[str], whole: bool) -> None:
    if not _ready(run):
        return
    header(run)
    if run.problem is not None:
        show_problem(run.problem)
    verdict_panel(run)
    assert run.rows is not None
    fig, left_out = charts.dynamics_figure(
        run.rows, run.experts, tiers, whole, clones=run.info.is_control
    )
    fig.update_layout(title={"text": "Gradient norm per expert and tier"})
    chart(fig, f"dynamics_{run.info.run_hash}", f"{run.info.run_hash}-dynamics.csv")
    if left_out.total:
        st.caption(left_out.text())


def divergence(run: Opened) -> None:
    if not _ready(run):
        return
    assert run.rows is not None
    _title(run)
    divergence_line(run.rows, len(run.experts), run.control, run.info.is_control)
    fig = figures.divergence_figure(run.rows)
    fig.update_layout(title={"text": "Divergence over time (linear axis)"})
    chart(fig, f"divergence_{run.info.run_hash}", f"{run.info.run_hash}-divergence.csv")
    fig = figures.drift_figure(run.rows)
    fig.update_layout(title={"text": "Weight drift from expert 0"})
    chart(fig, f"drift_{run.info.run_hash}", f"{run.info.run_hash}-weight-drift.csv")


def routing(run: Opened) -> None:
    _one_chart(run, figures.routing_figure, "Routing weight per expert", "routing")


def loss(run: Opened) -> None:
    _one_chart(run, figures.loss_figure, "Training and validation loss", "loss")


def _one_chart(
    run: Opened, make: Callable[[pd.DataFrame], go.Figure], title: str, name: str
) -> None:
    """A view of one chart: `make(rows)`, titled, with its CSV download `<hash>-<name>.csv`."""
    if not _ready(run):
        return
    assert run.rows is not None
    _title(run)
    fig = make(run.rows)
    fig.update_layout(title={"text": title})
    chart(fig, f"{name}_{run.info.run_hash}", f"{run.info.run_hash}-{name}.csv")


def layers(run: Opened, chosen: list[int] | None, tiers: list[str]) -> None:
    if not _ready(run) or run.layers is None:
        return
    _title(run)
    if run.layers.empty:
        st.info("No per-layer rows in `layer_dynamics` yet.")
        return
    found = sorted(int(v) for v in run.layers["layer"].unique())
    picked = [layer for layer in (chosen or found) if layer in found]
    fig, left_out = figures.layers_figure(run.layers, picked, tiers)
    chart(fig, f"layers_{run.info.run_hash}", f"{run.info.run_hash}-layers.csv")
    if left_out.total:
        st.caption(left_out.text())


def heatmap(run: Opened, window: tuple[int, int]) -> None:
    if not _ready(run) or run.layers is None:
        return
    _title(run)
    means = figures.window_means(run.layers, *window)
    if means.empty:
        st.info(f"No per-layer rows between steps {window[0]} and {window[1]}.")
        return
    fig = figures.heatmap_figure(means, *window)
    key = f"heatmap_{run.info.run_hash}"
    st.plotly_chart(fig, key=key, config={"displaylogo": False})
    csv = means.rename_axis("layer").to_csv()
    download(csv, f"{run.info.run_hash}-heatmap-{window[0]}-{window[1]}.csv", f"csv_{key}")


def compare(runs: list[Opened], metric: str) -> None:
    usable = [r for r in runs if r.rows is not None and r.chartable]
    for run in runs:
        if run not in usable and run.problem is not None:
            st.caption(f"`{run.info.run_hash}` left out: {run.problem.message}")
    if len(usable) < 2:
        st.info("Open two or more runs in the sidebar to compare them on shared axes.")
    if not usable:
        return
    fig = figures.compare_figure([(r.info.short, r.rows) for r in usable], metric)
    fig.update_layout(title={"text": f"{metric}: {len(usable)} run(s) on shared axes"})
    chart(fig, "compare", "compare-" + "-".join(r.info.run_hash for r in usable) + ".csv")


def runs_browser(shown: list[RunInfo], total: int) -> None:
    st.caption(
        f"{len(shown)} of {total} run(s) shown; filter and sort in the sidebar, open runs "
        "there (several to compare)."
    )
    table = runs_table(shown)
    st.dataframe(
        table,
        hide_index=True,
        key="runs_table",
        column_config={
            "last update": st.column_config.DatetimeColumn("last update (UTC)"),
            "steps logged": st.column_config.NumberColumn(format="%d"),
        },
    )


def _ready(run: Opened) -> bool:
    """Shows the run's problem and returns False when there is nothing to chart."""
    if run.chartable and run.rows is not None:
        return True
    _title(run)
    assert run.problem is not None
    show_problem(run.problem)
    return False


def _title(run: Opened) -> None:
    info = run.info
    colour = STATUS_COLOURS.get(info.status, "gray")
    st.subheader(f"{info.name or 'run'} · `{info.run_hash}` :{colour}-badge[{info.status}]")
    details = [
        f"strategy **{info.strategy or '?'}**",
        f"sparsity **{info.sparsity:g}**" if info.sparsity is not None else "",
        f"last update {_ago(info.last_update)}" if info.last_update else "",
    ]
    st.caption(" · ".join(d for d in details if d))


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
