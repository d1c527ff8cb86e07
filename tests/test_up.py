"""`prismatic up` with real processes: the whole stack, several configs to one collector,
clean stops on SIGTERM (no orphans), and refusals before anything starts."""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from prismatic.config import load_config, run_hash
from prismatic.up import load_stack, plan_trainers, trainer_command

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.seq_len=16",
    "train.batch_size=2",
    "data.max_bytes=20000",
    "dynamics.log_freq=1",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]
NORMS = [f"expert_{e}_{t}_norm" for e in range(3) for t in ("top", "bottom", "middle")] + [
    "expert_0_clean_norm",
    "expert_1_perturbed_norm",
    "expert_2_perturbed_norm",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up_command(runs: Path, *configs: str, steps: int, dashboard_port: int | None = None):
    argv = [sys.executable, "-m", "prismatic.cli", "up", *configs, "--steps", str(steps)]
    argv += ["--runs-dir", str(runs), "--collector-port", str(free_port())]
    argv += ["--port", str(dashboard_port)] if dashboard_port else ["--no-dashboard"]
    return argv + [a for o in TINY for a in ("--set", o)]


def read_db(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def steps_written(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        return read_db(path, "SELECT count(*) FROM dynamics")[0][0]
    except sqlite3.Error:  # created but not yet migrated
        return 0


def hashes(*configs: str, steps: int) -> list[str]:
    overrides = [*TINY, f"train.steps={steps}"]
    return [run_hash(load_config(REPO / c, overrides)) for c in configs]


# --- before anything starts --------------------------------------------------------------------


def test_trainer_command_uses_torchrun_with_one_process_per_rank():
    by_world = {spec.world_size: spec for spec in plan_trainers([], [])}
    plain = trainer_command(by_world[1], "tcp://127.0.0.1:1", "runs", ["train.steps=3"])
    assert plain[1:4] == ["-m", "prismatic.cli", "train"]
    assert plain[-2:] == ["--set", "train.steps=3"]
    ddp = trainer_command(by_world[2], "tcp://127.0.0.1:1", "runs", [])
    assert ddp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    assert ddp[5] == "2" and ddp[6:9] == ["-m", "prismatic.cli", "train"]


def test_up_resume_continues_the_runs_that_have_a_checkpoint_and_starts_the_others(tmp_path):
    runs = tmp_path / "runs"
    steps = ["--steps", "4", "--runs-dir", str(runs), "--no-dashboard"]
    sets = [a for o in [*TINY, "train.checkpoint_every=2"] for a in ("--set", o)]

    def up(*configs: str, resume: bool = False) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "prismatic.cli", "up", *configs, *steps, *sets]
        argv += ["--collector-port", str(free_port())] + (["--resume"] if resume else [])
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)

    first = up("configs/default.yaml")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    again = up("configs/default.yaml", "configs/control-scale0.yaml", resume=True)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    overrides = [*TINY, "train.checkpoint_every=2", "train.steps=4"]
    done, fresh = (
        run_hash(load_config(REPO / c, overrides))
        for c in ("configs/default.yaml", "configs/control-scale0.yaml")
    )
    assert f"control-scale0 {fresh}] no checkpoint to resume from: starting at step 0" in (
        again.stdout
    )
    assert "already has a checkpoint" not in again.stdout + again.stderr  # resumed, not redone
    for run in (done, fresh):
        assert [r[0] for r in read_db(runs / run / "dynamics.db", "SELECT step FROM dynamics")] == [
            0,
            1,
            2,
            3,
        ]


def test_a_bare_up_plans_the_stack_and_overrides_reach_every_run():
    specs = plan_trainers([], ["train.steps=7"])
    assert [s.config for s in specs] == list(load_stack().values())
    for spec in specs:
        cfg = load_config(spec.config, ["train.steps=7"])
        assert spec.label == f"{cfg.name} {run_hash(cfg)}"


def test_up_refuses_a_collector_port_in_use_and_starts_nothing(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [sys.executable, "-m", "prismatic.cli", "up", "configs/default.yaml"]
        argv += ["--no-dashboard", "--collector-port", str(port), "--runs-dir", str(tmp_path)]
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"prismatic: error: --collector-port: {port} is in use on 127.0.0.1; pick another port"
    )
    assert list(tmp_path.iterdir()) == []


def test_up_validates_every_config_before_starting_anything(tmp_path):
    argv = [sys.executable, "-m", "prismatic.cli", "up", "configs/default.yaml"]
    argv += ["configs/smear.yaml", "--set", "model.mixing=blend", "--runs-dir", str(tmp_path)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith("prismatic: error: model.mixing: 'blend' is not accepted")
    assert list(tmp_path.iterdir()) == []


# --- running -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bare_up_trains_the_whole_stack_into_one_collector(tmp_path):
    """From another folder, so the stack's config paths must resolve against the repository."""
    runs = tmp_path / "runs"
    result = subprocess.run(
        up_command(runs, steps=3),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    stack = [str(p) for p in load_stack().values()]
    expected = hashes(*stack, steps=3)
    assert sorted(p.name for p in runs.iterdir()) == sorted(expected)
    for path in stack:
        cfg = load_config(path, [*TINY, "train.steps=3"])
        db = runs / run_hash(cfg) / "dynamics.db"
        rows = read_db(db, f"SELECT step, ranks_reported, {', '.join(NORMS)} FROM dynamics")
        assert [r[0] for r in rows] == [0, 1, 2], path
        for step, ranks, *norms in rows:
            assert ranks == cfg.train.world_size, (path, step)
            assert all(v is not None and math.isfinite(v) and v > 0 for v in norms), (path, step)
        status, world = read_db(db, "SELECT status, world_size FROM run")[0]
        assert (status, world) == ("completed", cfg.train.world_size), path


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """After a failed test, `up` and whatever it left: its children are in sessions of their
    own, so killing `up` alone would orphan them (a frozen trainer would stay frozen)."""
    if proc.poll() is not None:
        return
    left = descendants(proc.pid)
    proc.kill()
    proc.wait()
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.mark.slow
def test_sigterm_stops_trainers_ranks_collector_and_dashboard_with_no_orphans(tmp_path):
    runs = tmp_path / "runs"
    configs = ("configs/default.yaml", "configs/data-parallel-2.yaml")
    proc = subprocess.Popen(
        up_command(runs, *configs, steps=100_000, dashboard_port=free_port()),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dbs = [runs / h / "dynamics.db" for h in hashes(*configs, steps=100_000)]
    try:
        deadline = time.monotonic() + 240
        while not all(steps_written(db) for db in dbs):
            assert proc.poll() is None and time.monotonic() < deadline, "runs never started"
            time.sleep(0.5)
        children = descendants(proc.pid)
        # collector, dashboard + Streamlit, a trainer, torchrun + its 2 ranks
        assert len(children) >= 7, [c.cmdline() for c in children]

        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = proc.wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        kill_tree(proc)
    assert code == 128 + signal.SIGTERM
    assert elapsed < 30, f"took {elapsed:.1f}s to stop"
    assert wait_gone(children, timeout=5) == [], "orphans left behind"
    for db in dbs:
        # Every trainer (each rank) sent run_end before the collector flushed and stopped.
        assert read_db(db, "SELECT status FROM run") == [("interrupted",)], db


@pytest.mark.slow
def test_a_second_signal_kills_every_child_at_once_even_a_frozen_trainer(tmp_path):
    (db,) = [
        tmp_path / "runs" / h / "dynamics.db" for h in hashes("configs/default.yaml", steps=100_000)
    ]
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            up_command(tmp_path / "runs", "configs/default.yaml", steps=100_000),
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )

    def log() -> str:
        return log_path.read_text()[-3000:]

    try:
        # A trainer frozen in the middle of training: its first steps are stored.
        deadline = time.monotonic() + 120
        while not steps_written(db):
            assert proc.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.2)
        children = descendants(proc.pid)
        trainer = next(c for c in children if "train" in c.cmdline())
        trainer.suspend()  # a trainer that will not stop on its own
        # SIGSTOP takes effect when the kernel next runs the trainer: wait for it. (Frozen
        # before the interpreter set up its handlers, the trainer would die at once of the
        # SIGINT below, whose default action kills even a stopped process.)
        deadline = time.monotonic() + 10
        while trainer.status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, f"the trainer did not stop\n{log()}"
            time.sleep(0.05)

        proc.send_signal(signal.SIGINT)
        time.sleep(2.0)
        assert proc.poll() is None, f"the first signal waits for trainers to stop\n{log()}"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
    finally:
        kill_tree(proc)
    assert code == 128 + signal.SIGINT, log()
    assert wait_gone(children, timeout=5) == []


def test_a_data_parallel_run_completes_whatever_order_its_ranks_streams_arrive_in(tmp_path):
    """Each rank has its own socket, so rank 1's whole stream (run_start first) can arrive after
    rank 0's run_end; seen in the stack's torchrun run under load. The run must still end."""
    from collector.service import Collector
    from prismatic import wire

    def message(kind: str, rank: int, seq: int, **fields) -> bytes:
        return wire.encode({**wire.header(kind, "0123456ab", rank, seq), **fields})

    start = {"name": "dp", "config": {}, "model": {}, "world_size": 2, "host": "h"}
    start |= {"shards": False, "versions": {}}
    end = {"status": "completed", "last_step": 0, "sent": 2, "dropped": 0}
    collector = Collector("tcp://127.0.0.1:1", tmp_path)  # handles bytes; binds nothing
    for rank in (0, 1):
        assert collector.handle_bytes(message("run_start", rank, 0, **start))
        assert collector.handle_bytes(message("run_end", rank, 1, **end))
    collector.shutdown()
    db = tmp_path / "0123456ab" / "dynamics.db"
    assert read_db(db, "SELECT status, world_size FROM run") == [("completed", 2)]


def test_the_last_replay_ingests_what_the_collector_never_received(tmp_path):
    """A trainer whose last messages (run_end among them) never left its queue: after the
    collector stops, `up` replays the spools, so the run still ends with every step stored."""
    from prismatic.up import _replay_spools
    from trainer.loop import train

    overrides = [*TINY, "train.steps=3"]
    cfg = load_config(REPO / "configs/default.yaml", overrides)
    runs = tmp_path / "runs"
    assert train(cfg, runs, collector=f"tcp://127.0.0.1:{free_port()}") == "completed"
    db = runs / run_hash(cfg) / "dynamics.db"
    assert not db.exists()  # nobody was listening

    (spec,) = plan_trainers([str(REPO / "configs/default.yaml")], overrides)
    assert _replay_spools([spec], str(runs), []) == 0
    assert read_db(db, "SELECT step FROM dynamics ORDER BY step") == [(0,), (1,), (2,)]
    assert read_db(db, "SELECT status FROM run") == [("completed",)]
