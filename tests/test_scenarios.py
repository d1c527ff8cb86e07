"""Nothing lost when parts fail: real `prismatic collect` and `prismatic train` processes over
loopback TCP, tiny models, faults injected with signals. Each scenario ends with every step the
trainer logged (every dynamics message in its spool) in dynamics.db exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from net_support import free_port

from collector.replay import read_spool, spool_files

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STEPS = 2000  # ~10 s of training for the tiny model on one core: long enough to fail mid-run
LOG_FREQ = 50
LINGER_S = 1.0  # trainer/publisher.py's default: how long a closing trainer tries to send
STALE_AFTER_S = 3


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


class Process:
    """A `prismatic` subprocess whose output lines are kept with the time they arrived."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prismatic.cli", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                self.lines.append((time.monotonic(), line))
                log.write(line)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def said(self, text: str) -> bool:
        return any(text in line for _, line in self.lines)

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


class Rig:
    """One test's runs folder, collector address and the processes it started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.runs = tmp_path / "runs"
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.corpus = tmp_path / "corpus.txt"
        self.corpus.write_text((REPO / "README.md").read_text(encoding="utf-8") * 4)
        self.procs: list[Process] = []
        self._collectors = 0

    def collector(self) -> Process:
        self._collectors += 1
        proc = self._start(
            "collect",
            "--bind",
            self.address,
            "--runs-dir",
            str(self.runs),
            "--stale-after",
            str(STALE_AFTER_S),
            log=f"collector{self._collectors}.log",
        )
        wait_until(lambda: proc.said("listening on"), 60, "the collector to listen")
        return proc

    def trainer(self, *overrides: str, steps: int = STEPS, name: str = "trainer") -> Process:
        tiny = [
            "model.d_model=32",
            "model.n_layers=1",
            "model.seq_len=16",
            "train.batch_size=2",
            f"train.steps={steps}",
            "train.eval_every=0",
            "train.checkpoint_every=0",
            f"dynamics.log_freq={LOG_FREQ}",
            f"data.path={self.corpus}",
            "data.max_bytes=10000",
            *overrides,
        ]
        sets = [a for item in tiny for a in ("--set", item)]
        args = ["train", "configs/default.yaml", *sets, "--collector", self.address]
        return self._start(*args, "--runs-dir", str(self.runs), log=f"{name}.log")

    def _start(self, *args: str, log: str) -> Process:
        proc = Process(list(args), self.tmp / log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.running():
                proc.signal(signal.SIGCONT)  # a frozen collector cannot die of SIGKILL late
                proc.proc.kill()
                proc.wait(10)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def run_dir_of(rig: Rig, trainer: Process) -> Path:
    wait_until(lambda: trainer.said("run "), 60, "the trainer to name its run")
    line = next(line for _, line in trainer.lines if line.startswith("run "))
    return rig.runs / line.split()[1]


def logged_steps(run_dir: Path) -> list[int]:
    """Every step the trainer published, from its spool files (one per rank)."""
    steps = set()
    for path in spool_files(run_dir):
        steps |= {raw["step"] for raw, _ in read_spool(path) if raw.get("kind") == "dynamics"}
    return sorted(steps)


def stored(run_dir: Path) -> dict:
    path = run_dir / "dynamics.db"
    if not path.is_file():
        return {"steps": [], "layer_rows": 0, "status": None}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        steps = [r[0] for r in conn.execute("SELECT step FROM dynamics ORDER BY step")]
        layer_rows = conn.execute("SELECT count(*) FROM layer_dynamics").fetchone()[0]
        run = conn.execute("SELECT status FROM run").fetchone()
    except sqlite3.OperationalError:  # the collector has not created the tables yet
        return {"steps": [], "layer_rows": 0, "status": None}
    finally:
        conn.close()
    return {"steps": steps, "layer_rows": layer_rows, "status": run[0] if run else None}


def completed_schedule(steps: int = STEPS) -> list[int]:
    """The steps a finished tiny run logs: every LOG_FREQ, and the last one."""
    return sorted({*range(0, steps, LOG_FREQ), steps - 1})


def assert_all_logged_steps_stored_once(run_dir: Path, status: str, timeout: float = 60) -> None:
    expected = logged_steps(run_dir)

    def done() -> bool:
        now = stored(run_dir)
        return now["steps"] == expected and now["status"] == status

    try:
        wait_until(done, timeout, f"{len(expected)} steps and status {status!r}")
    finally:
        now = stored(run_dir)
        missing = sorted(set(expected) - set(now["steps"]))
        assert not missing, f"steps never stored: {missing}"
        assert now["steps"] == expected
        assert now["layer_rows"] == len(expected) * 3  # 1 layer x 3 experts, each once
        assert now["status"] == status


def replays_of(collector: Process, run_dir: Path) -> list[str]:
    """The collector's log lines saying it read part of this run's spool back."""
    lines = [line for _, line in collector.lines]
    return [line for line in lines if "gaps: replayed" in line and run_dir.name in line]


def rows(run_dir: Path) -> int:
    return len(stored(run_dir)["steps"])


# --- scenarios --------------------------------------------------------------------------------


def test_collector_down_when_the_trainer_starts(rig):
    # A queue of 4: the trainer really drops messages while nobody listens, as a long outage
    # would with the default queue of 10,000.
    trainer = rig.trainer("dynamics.send_hwm=4")
    run_dir = run_dir_of(rig, trainer)
    wait_until(lambda: len(logged_steps(run_dir)) >= 5, 60, "the trainer to log 5 steps")

    rig.collector()
    assert trainer.wait(120) == 0, trainer.output

    assert "messages dropped" in trainer.output  # there was a gap to fill
    assert logged_steps(run_dir) == completed_schedule()
    assert_all_logged_steps_stored_once(run_dir, "completed")


def test_collector_killed_mid_run_and_restarted(rig):
    first = rig.collector()
    trainer = rig.trainer()
    run_dir = run_dir_of(rig, trainer)
    wait_until(lambda: rows(run_dir) >= 3, 60, "3 stored steps")

    assert trainer.running()
    first.signal(signal.SIGKILL)
    first.wait(10)
    time.sleep(1.0)  # the trainer goes on publishing into the void
    rig.collector()
    assert trainer.wait(120) == 0, trainer.output

    assert logged_steps(run_dir) == completed_schedule()
    assert_all_logged_steps_stored_once(run_dir, "completed")


def test_collector_frozen_for_30_seconds_then_resumed(rig):
    collector = rig.collector()
    trainer = rig.trainer()
    run_dir = run_dir_of(rig, trainer)
    wait_until(lambda: rows(run_dir) >= 3, 60, "3 stored steps")

    collector.signal(signal.SIGSTOP)
    logged_before = len(logged_steps(run_dir))
    try:
        time.sleep(30)
        logged_while_frozen = len(logged_steps(run_dir)) - logged_before
    finally:
        collector.signal(signal.SIGCONT)
    code = trainer.wait(120)

    # The trainer never waits for the collector: it went on (and usually finished) meanwhile.
    assert logged_while_frozen > 5
    assert code == 0, trainer.output
    assert logged_steps(run_dir) == completed_schedule()
    assert_all_logged_steps_stored_once(run_dir, "completed")
    assert collector.running()


def test_a_trainer_killed_mid_run_goes_stale_and_leaves_the_other_run_alone(rig):
    collector = rig.collector()
    doomed = rig.trainer("seed=1", name="doomed")
    other = rig.trainer("seed=2", name="other")
    doomed_dir, other_dir = run_dir_of(rig, doomed), run_dir_of(rig, other)
    assert doomed_dir != other_dir
    wait_until(lambda: rows(doomed_dir) >= 3, 60, "3 stored steps of the doomed run")

    assert doomed.running()
    doomed.signal(signal.SIGKILL)
    doomed.wait(10)
    assert other.wait(120) == 0, other.output

    assert len(logged_steps(doomed_dir)) < len(completed_schedule())
    assert_all_logged_steps_stored_once(doomed_dir, "stale", timeout=STALE_AFTER_S + 30)
    assert logged_steps(other_dir) == completed_schedule()
    assert_all_logged_steps_stored_once(other_dir, "completed")
    # The happy path needs no replay: the other run's messages, run_end included, came live.
    assert not replays_of(collector, other_dir)


def test_the_trainer_exits_promptly_when_no_collector_is_there(rig):
    steps = 200
    trainer = rig.trainer(steps=steps)

    code = trainer.wait(120)

    assert code == 0, trainer.output
    last_step = next(t for t, line in trainer.lines if f"step {steps}/{steps}" in line)
    done = next(t for t, line in trainer.lines if "trainer: " in line and " completed in " in line)
    # After its last step the trainer sends run_end, waits at most LINGER_S for a collector
    # that is not there, and says it completed (once its publisher closed), then exits. Not
    # timed to the exit: interpreter teardown alone took over 4 s on a machine loaded 4x.
    assert done - last_step < LINGER_S + 3, trainer.output
    assert "messages dropped" not in trainer.output  # queued, not dropped: then let go


def test_dynamics_linger_s_sets_how_long_an_exiting_trainer_tries_to_send(rig):
    steps = 20
    trainer = rig.trainer("dynamics.linger_s=3", steps=steps)

    code = trainer.wait(120)

    assert code == 0, trainer.output
    last_step = next(t for t, line in trainer.lines if f"step {steps}/{steps}" in line)
    done = next(t for t, line in trainer.lines if "trainer: " in line and " completed in " in line)
    # Nobody listens, so the queue is never sent: the trainer waits the whole 3 s, where the
    # default waits 1 s. (The bounds leave a second either side for when the lines are read.)
    assert 2.0 < done - last_step < 3 + 3, trainer.output


def test_with_the_collector_up_the_final_run_end_arrives_live(rig):
    collector = rig.collector()
    trainer = rig.trainer(steps=200)
    run_dir = run_dir_of(rig, trainer)

    assert trainer.wait(120) == 0, trainer.output
    wait_until(lambda: stored(run_dir)["status"] == "completed", 30, "status completed")

    assert not replays_of(collector, run_dir)  # over the socket, not read back from the spool
    assert stored(run_dir)["steps"] == completed_schedule(200)
