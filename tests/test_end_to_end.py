"""The whole path with real processes over loopback TCP: `prismatic up` -> dynamics.db."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from net_support import free_port

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.seq_len=32",
    "train.batch_size=4",
    "dynamics.log_freq=2",
    "train.eval_every=4",
]


def dashboard_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_up_trains_two_runs_and_leaves_finite_positive_norms_for_three_experts(tmp_path):
    runs = tmp_path / "runs"
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "prismatic.cli",
        "up",
        # The two runs named explicitly: a bare `up` starts the whole stack (configs/stack.yaml).
        "configs/default.yaml",
        "configs/control-scale0.yaml",
        "--steps",
        "12",
        "--runs-dir",
        str(runs),
        "--port",
        str(port),
        "--collector-port",
        str(free_port()),
    ]
    for item in TINY:
        args += ["--set", item]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    saw_dashboard = False
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        saw_dashboard = saw_dashboard or dashboard_healthy(port)
        time.sleep(0.5)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output
    assert saw_dashboard, "the dashboard never answered its health check"
    assert "step 12/12" in output  # progress lines relayed per trainer
    assert "[collector]" in output and "listening on tcp://127.0.0.1:" in output

    dbs = sorted(runs.glob("*/dynamics.db"))
    assert len(dbs) == 2  # the baseline and the scale-0 control
    for path in dbs:
        conn = sqlite3.connect(path)
        rows = conn.execute(
            "SELECT step, "
            + ", ".join(
                f"expert_{e}_{t}_norm" for e in range(3) for t in ("top", "bottom", "middle")
            )
            + ", expert_0_clean_norm, expert_1_perturbed_norm, expert_2_perturbed_norm,"
            " expert_1_divergence, expert_2_divergence, loss FROM dynamics ORDER BY step"
        ).fetchall()
        status = conn.execute("SELECT status FROM run").fetchone()[0]
        conn.close()
        assert [r[0] for r in rows] == [0, 2, 4, 6, 8, 10, 11]
        for row in rows:
            norms = row[1:13]
            assert all(v is not None and math.isfinite(v) and v > 0 for v in norms), row
            assert all(0 <= d <= 2 for d in row[13:15]), row
        assert status == "completed"
        assert (path.parent / "config.yaml").is_file()
