"""Spool files and replays: collector/replay.py, collector/gaps.py and the spool side of
trainer/publisher.py, with real ZeroMQ sockets and real SQLite files."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest
import zmq
from collector_support import locked
from net_support import free_port

from collector.gaps import CURSOR_NAME, SpoolWatch
from collector.replay import read_spool, replay_into, spool_path
from collector.service import Collector
from prismatic import wire
from trainer.publisher import Publisher

RUN = "abcdef012"
OTHER_RUN = "0123456ab"
LAYERS, EXPERTS = 2, 3
METRICS = {
    name: [[float(layer + expert + 1) for expert in range(EXPERTS)] for layer in range(LAYERS)]
    for name in ("top_norm", "bottom_norm", "middle_norm", "norm", "divergence")
}


def publisher(runs: Path, run: str = RUN, rank: int = 0, **kwargs) -> Publisher:
    """A publisher spooling where a trainer would: `<runs>/<run>/spool/rank<N>.msgpack`."""
    address = kwargs.pop("address", None) or f"tcp://127.0.0.1:{free_port()}"
    kwargs.setdefault("linger_ms", 0)
    return Publisher(address, run, rank, spool_path=spool_path(runs / run, rank), **kwargs)


def send_start(pub: Publisher, world_size: int = 1) -> None:
    pub.send(
        wire.KIND_RUN_START,
        name="t",
        config={"name": "t"},
        model={"mixing": "outputs"},
        world_size=world_size,
        shards=False,
        host="here",
    )


def send_steps(pub: Publisher, steps: range) -> None:
    for step in steps:
        pub.send(wire.KIND_DYNAMICS, step=step, loss=1.0 / (step + 1), metrics=METRICS)


def send_end(pub: Publisher, status: str = "completed") -> None:
    pub.send(wire.KIND_RUN_END, status=status, last_step=0)


def spool_messages(path: Path) -> list[tuple[dict, bytes]]:
    """(decoded message, its exact bytes) for every message in a spool file."""
    data = path.read_bytes()
    out, start = [], 0
    for raw, end in read_spool(path):
        out.append((raw, data[start:end]))
        start = end
    return out


def stored(runs: Path, run: str = RUN) -> dict:
    conn = sqlite3.connect(runs / run / "dynamics.db")
    try:
        steps = [r[0] for r in conn.execute("SELECT step FROM dynamics ORDER BY step")]
        layer_rows = conn.execute("SELECT count(*) FROM layer_dynamics").fetchone()[0]
        ranks = {r[0] for r in conn.execute("SELECT ranks_reported FROM dynamics")}
        status = conn.execute("SELECT status FROM run").fetchone()
    finally:
        conn.close()
    return {
        "steps": steps,
        "layer_rows": layer_rows,
        "ranks": ranks,
        "status": status[0] if status else None,
    }


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@contextmanager
def collector_thread(runs: Path, bind: str, **watch) -> Iterator[Collector]:
    """A real collector serving `bind` in a thread; stopped (flushed, committed) on exit."""
    context = zmq.Context()
    collector = Collector(bind, runs, context=context, flush_interval_ms=50)
    collector.spools = SpoolWatch(collector, **watch)
    thread = threading.Thread(target=collector.run, daemon=True)
    thread.start()
    assert collector.ready.wait(10)
    try:
        yield collector
    finally:
        collector.stop()
        thread.join(10)
        context.term()


# --- the spool file ---------------------------------------------------------------------------


def test_each_message_carries_its_spool_offset_and_a_resumed_sender_appends(tmp_path):
    for _session in range(2):  # the second session is a resumed trainer: seq restarts at 0
        with publisher(tmp_path) as pub:
            send_start(pub)
            send_steps(pub, range(2))
    path = spool_path(tmp_path / RUN, 0)

    messages = spool_messages(path)

    assert [m["seq"] for m, _ in messages] == [0, 1, 2, 0, 1, 2]
    position = 0
    for message, data in messages:
        assert message["spool_offset"] == position
        position += len(data)
    assert position == path.stat().st_size


def test_a_torn_tail_is_left_for_the_next_read_to_pick_up_whole(tmp_path):
    with publisher(tmp_path) as pub:
        send_start(pub)
        send_steps(pub, range(3))
    path = spool_path(tmp_path / RUN, 0)
    last = wire.encode({"v": 1, "kind": "dynamics", "run": RUN, "rank": 0, "seq": 4, "step": 3})
    whole = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(last[:7])  # a write in progress, or a crash mid-write

    ends = [end for _, end in read_spool(path)]
    with open(path, "ab") as fh:
        fh.write(last[7:])
    rest = list(read_spool(path, ends[-1]))

    assert len(ends) == 4 and ends[-1] == whole
    assert [(raw["step"], end) for raw, end in rest] == [(3, whole + len(last))]


def test_a_spool_the_disk_refuses_is_closed_and_messages_go_out_without_an_offset(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full to make writes fail with ENOSPC")
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    pub = Publisher(f"tcp://127.0.0.1:{port}", RUN, spool_path=Path("/dev/full"), linger_ms=1000)
    send_start(pub)
    send_steps(pub, range(1))
    pub.close()
    pull.setsockopt(zmq.RCVTIMEO, 5000)
    received = [wire.decode(pull.recv()) for _ in range(2)]
    pull.close()
    context.term()

    assert [m["kind"] for m in received] == ["run_start", "dynamics"]
    assert [m["spool_offset"] for m in received] == [None, None]


# --- replays ----------------------------------------------------------------------------------


def test_replaying_a_run_folder_twice_stores_each_step_once(tmp_path):
    with publisher(tmp_path / "trainer") as pub:
        send_start(pub)
        send_steps(pub, range(5))
        send_end(pub)
    runs = tmp_path / "runs"
    collector = Collector(runs_dir=runs)

    accepted = [replay_into(collector, tmp_path / "trainer" / RUN) for _ in range(2)]
    collector.shutdown()

    assert accepted == [7, 7]
    assert stored(runs) == {
        "steps": [0, 1, 2, 3, 4],
        "layer_rows": 5 * LAYERS * EXPERTS,
        "ranks": {1},
        "status": "completed",
    }


def test_replay_names_a_folder_that_is_missing_or_holds_no_spool(tmp_path):
    from collector.replay import replay_dirs
    from prismatic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--replay: '.*nope' is not a folder; pass a run folder"):
        replay_dirs([tmp_path / "nope"], tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"--replay: '.*empty' has no spool/ folder"):
        (tmp_path / "empty").mkdir()
        replay_dirs([tmp_path / "empty"], tmp_path / "runs")


def test_replay_reads_only_what_the_runs_folder_has_not_stored_yet(tmp_path):
    """`prismatic up` replays every spool once its collector stopped: messages the collector
    already stored are not read (nor counted) again; more sent later are."""
    from collector.replay import replay_dirs

    runs = tmp_path / "runs"

    def counted() -> int:
        conn = sqlite3.connect(runs / RUN / "dynamics.db")
        try:
            return conn.execute("SELECT messages FROM run").fetchone()[0]
        finally:
            conn.close()

    with publisher(runs) as pub:
        send_start(pub)
        send_steps(pub, range(5))
        replay_dirs([runs / RUN], runs)
        assert counted() == 6
        replay_dirs([runs / RUN], runs)  # nothing new
        assert counted() == 6
        send_steps(pub, range(5, 8))
        send_end(pub)
    replay_dirs([runs / RUN], runs)
    assert counted() == 10
    assert stored(runs)["steps"] == list(range(8))
    # Without the database a saved cursor vouches for nothing: the spool is read again.
    (runs / RUN / "dynamics.db").rename(tmp_path / "moved.db")
    replay_dirs([runs / RUN], runs)
    assert counted() == 10 and stored(runs)["steps"] == list(range(8))


def test_a_gap_in_live_messages_is_filled_from_the_spool(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    pub = publisher(tmp_path, address=address, send_hwm=1, linger_ms=2000)
    send_start(pub)
    send_steps(pub, range(10))  # nobody listens: past the first queued message, all dropped
    dropped_while_down = pub.dropped

    with collector_thread(tmp_path, address) as collector:
        wait_until(lambda: collector.stats.received >= 1)  # the queued message: connected
        send_steps(pub, range(10, 15))
        send_end(pub)
        pub.close()
        # The queue of 1 dropped most live messages: they come from spool replays, and a tail
        # the gap replay missed (written after it read the spool) from the scan, every 10 s.
        wait_until(
            lambda: collector.stats.rows_written >= 15 and stored(tmp_path)["status"] == "completed"
        )
        gaps, replayed = collector.spools.gaps, collector.spools.replayed

    assert dropped_while_down >= 8
    assert gaps >= 1 and replayed >= dropped_while_down
    assert stored(tmp_path) == {
        "steps": list(range(15)),
        "layer_rows": 15 * LAYERS * EXPERTS,
        "ranks": {1},
        "status": "completed",
    }


def test_a_restarted_collector_reads_only_what_is_new(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    pub = publisher(tmp_path, address=address, linger_ms=2000)
    fast_save = {"save_interval_s": 0.05}
    cursor_file = tmp_path / RUN / "spool" / CURSOR_NAME
    spool = spool_path(tmp_path / RUN, 0)

    def cursor_at_end() -> bool:
        return cursor_file.is_file() and json.loads(cursor_file.read_text()) == {
            spool.name: spool.stat().st_size
        }

    with collector_thread(tmp_path, address, **fast_save) as first:
        send_start(pub)
        send_steps(pub, range(5))
        wait_until(lambda: first.stats.rows_written >= 5 and cursor_at_end())
    with collector_thread(tmp_path, address, **fast_save) as second:
        send_steps(pub, range(5, 10))
        send_end(pub)
        pub.close()
        wait_until(lambda: second.stats.rows_written >= 5)
        watch = second.spools

    assert (watch.gaps, watch.replayed) == (0, 0)
    assert stored(tmp_path)["steps"] == list(range(10))


def test_a_collector_without_a_saved_cursor_replays_from_the_start(tmp_path):
    with publisher(tmp_path) as pub:
        send_start(pub)
        send_steps(pub, range(4))
        send_end(pub)
    messages = spool_messages(spool_path(tmp_path / RUN, 0))
    collector = Collector(runs_dir=tmp_path)

    # This process first hears from the sender at its last message: a gap, by all it knows.
    handled = collector.handle_bytes(messages[-1][1])
    collector.shutdown()

    assert handled
    assert (collector.spools.gaps, collector.spools.replayed) == (1, 6)
    assert stored(tmp_path)["steps"] == [0, 1, 2, 3]
    assert stored(tmp_path)["status"] == "completed"


def test_a_resumed_trainer_restarting_seq_at_zero_is_not_mistaken_for_a_new_sender(tmp_path):
    with publisher(tmp_path) as pub:
        send_start(pub)
        send_steps(pub, range(5))
        send_end(pub, "interrupted")
    with publisher(tmp_path) as pub:  # --resume: same spool, seq from 0 again
        send_start(pub)
        send_steps(pub, range(5, 10))
        send_end(pub)
    messages = spool_messages(spool_path(tmp_path / RUN, 0))
    second_session = messages[7:]
    assert second_session[0][0]["seq"] == 0
    collector = Collector(runs_dir=tmp_path)

    for _, data in second_session:
        collector.handle_bytes(data)
    collector.shutdown()

    assert collector.spools.gaps == 1  # once, at the resumed session's first message
    assert stored(tmp_path)["steps"] == list(range(10))
    assert stored(tmp_path)["status"] == "completed"


def test_late_duplicates_after_a_replay_do_not_reopen_steps_of_a_two_rank_run(tmp_path):
    ranks = []
    for rank in range(2):
        with publisher(tmp_path, rank=rank) as pub:
            send_start(pub, world_size=2)
            send_steps(pub, range(4))
        ranks.append(spool_messages(spool_path(tmp_path / RUN, rank)))
    collector = Collector(runs_dir=tmp_path)

    collector.handle_bytes(ranks[0][-1][1])  # a gap on rank 0: its spool is replayed
    for _, data in ranks[1]:
        collector.handle_bytes(data)
    for _, data in ranks[0][1:]:  # rank 0's messages arriving late over the socket
        collector.handle_bytes(data)
    left_waiting = collector._pending.has_run(RUN)
    collector.shutdown()

    assert not left_waiting
    assert stored(tmp_path)["steps"] == [0, 1, 2, 3]
    assert stored(tmp_path)["ranks"] == {2}  # a re-opened step would be written with 1 rank


def test_a_gap_with_no_spool_here_takes_the_message_as_it_comes(tmp_path, caplog):
    trainer_side = tmp_path / "remote"
    with publisher(trainer_side) as pub:
        send_start(pub)
        send_steps(pub, range(3))
    messages = spool_messages(spool_path(trainer_side / RUN, 0))
    runs = tmp_path / "runs"
    collector = Collector(runs_dir=runs)

    for _, data in messages[2:]:  # missed run_start and step 0; the spool is on another machine
        assert collector.handle_bytes(data)
    collector.shutdown()

    assert collector.spools.gaps == 1
    assert stored(runs)["steps"] == [1, 2]
    assert sum("collect --replay" in r.getMessage() for r in caplog.records) == 1


def test_a_message_with_a_forged_offset_does_not_move_the_cursor_off_the_spool(tmp_path):
    pub = publisher(tmp_path)
    path = spool_path(tmp_path / RUN, 0)
    collector = Collector(runs_dir=tmp_path)

    def deliver_new(already: int) -> int:
        messages = spool_messages(path)
        for _, data in messages[already:]:
            collector.handle_bytes(data)
        return len(messages)

    send_start(pub)
    send_steps(pub, range(3))
    seen = deliver_new(0)
    forged = {**wire.header(wire.KIND_DYNAMICS, RUN, 0, 99), "step": 99, "metrics": METRICS}
    collector.handle_bytes(wire.encode({**forged, "spool_offset": 10**9}))
    send_steps(pub, range(3, 5))
    deliver_new(seen)
    pub.close()
    collector.shutdown()

    assert collector.spools.gaps == 1  # the forged message only; the trainer's stayed in step
    assert collector.spools.replays == 0
    assert stored(tmp_path)["steps"] == [0, 1, 2, 3, 4, 99]


# --- the tail scan and saved cursors ----------------------------------------------------------


def make_spool(runs: Path, run: str, steps: range, age_s: float) -> Path:
    with publisher(runs, run=run) as pub:
        send_start(pub)
        send_steps(pub, steps)
        send_end(pub)
    path = spool_path(runs / run, 0)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_the_scan_replays_spools_that_stopped_growing_and_waits_for_growing_ones(tmp_path):
    make_spool(tmp_path, RUN, range(3), age_s=60)
    growing = make_spool(tmp_path, OTHER_RUN, range(2), age_s=0)
    collector = Collector(runs_dir=tmp_path)
    watch = SpoolWatch(collector, quiet_s=5)

    watch.scan()
    collector.flush()
    first = (stored(tmp_path)["steps"], (tmp_path / OTHER_RUN / "dynamics.db").exists())
    then = time.time() - 60
    os.utime(growing, (then, then))
    watch.scan()
    watch.scan()  # nothing new the second time
    collector.shutdown()

    assert first == ([0, 1, 2], False)
    assert stored(tmp_path, OTHER_RUN)["steps"] == [0, 1]
    assert watch.replays == 2


def test_cursors_are_saved_only_once_their_rows_are_committed(tmp_path):
    path = make_spool(tmp_path, RUN, range(3), age_s=60)
    collector = Collector(runs_dir=tmp_path)
    cursor_file = path.parent / CURSOR_NAME

    collector.spools.scan()  # rows are buffered, not yet written
    collector.spools.save_committed(force=True)
    saved_before_flush = cursor_file.exists()
    collector.flush()
    collector.spools.save_committed(force=True)
    collector.shutdown()

    assert not saved_before_flush
    assert json.loads(cursor_file.read_text()) == {path.name: path.stat().st_size}


def test_a_saved_cursor_is_trusted_only_while_its_database_and_file_back_it(tmp_path):
    path = make_spool(tmp_path, RUN, range(3), age_s=60)
    cursor_file = path.parent / CURSOR_NAME
    cursor_file.write_text(json.dumps({path.name: path.stat().st_size}))

    no_database = Collector(runs_dir=tmp_path)
    no_database.spools.scan()  # dynamics.db is missing: the cursor vouches for nothing
    no_database.shutdown()
    trusted = Collector(runs_dir=tmp_path)
    trusted.spools.scan()
    trusted.shutdown()
    cursor_file.write_text(json.dumps({path.name: path.stat().st_size + 100}))  # file shrank
    shrunk = Collector(runs_dir=tmp_path)
    shrunk.spools.scan()
    shrunk.shutdown()

    assert [c.spools.replays for c in (no_database, trusted, shrunk)] == [1, 0, 1]
    assert stored(tmp_path)["steps"] == [0, 1, 2]


def test_a_spool_that_turns_to_garbage_is_read_up_to_the_damage(tmp_path):
    path = make_spool(tmp_path, RUN, range(3), age_s=0)
    good = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\xc1" + msgpack.packb({"v": 1}))  # 0xc1 is never valid msgpack
    collector = Collector(runs_dir=tmp_path)

    accepted = replay_into(collector, tmp_path / RUN)
    collector.shutdown()

    assert accepted == 5
    assert [end for _, end in read_spool(path)][-1] == good
    assert stored(tmp_path)["steps"] == [0, 1, 2]


def test_a_folder_replayed_into_another_runs_folder_is_read_from_the_start(tmp_path):
    """The folder's own cursor vouches for its own runs folder's database, not another's."""
    from collector.replay import replay_dirs

    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    with publisher(runs) as pub:
        send_start(pub)
        send_steps(pub, range(6))
        send_end(pub)
    assert replay_dirs([runs / RUN], runs)  # stored there, and the cursor saved
    assert replay_dirs([runs / RUN], elsewhere)
    assert stored(elsewhere)["steps"] == list(range(6))
    assert stored(elsewhere)["status"] == "completed"


def test_replay_says_so_and_fails_when_it_cannot_commit(tmp_path, monkeypatch, capsys):
    from collector import service
    from collector.replay import replay_dirs
    from prismatic import cli

    runs = tmp_path / "runs"
    with publisher(tmp_path / "trainer") as pub:
        send_start(pub)
        send_steps(pub, range(4))
    assert replay_dirs([tmp_path / "trainer" / RUN], runs, writer="inline")
    monkeypatch.setattr(service, "SHUTDOWN_RETRY_S", 0.5)
    with publisher(tmp_path / "trainer") as pub:  # more in the spool
        send_steps(pub, range(4, 8))
    with locked(runs / RUN / "dynamics.db", "BEGIN EXCLUSIVE"):
        code = cli.main(
            ["collect", "--replay", str(tmp_path / "trainer" / RUN), "--runs-dir", str(runs)]
        )
    assert code == 1
    assert "not everything could be committed" in capsys.readouterr().out
    assert stored(runs)["steps"] == list(range(4))
    # No cursor was saved past what is missing: the next replay stores it.
    assert replay_dirs([tmp_path / "trainer" / RUN], runs)
    assert stored(runs)["steps"] == list(range(8))


def test_a_replay_into_another_runs_folder_leaves_that_folder_s_cursor_alone(tmp_path):
    """The folder's own collector trusts its cursor.json: a replay elsewhere must not move it
    past rows its own database never stored."""
    from collector.replay import replay_dirs

    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    cursor_file = spool_path(runs / RUN, 0).parent / CURSOR_NAME
    with publisher(runs) as pub:
        send_start(pub)
        send_steps(pub, range(4))
        assert replay_dirs([runs / RUN], runs)  # runs stores 0-3 and saves its cursor
        saved = cursor_file.read_text()
        send_steps(pub, range(4, 9))  # only in the spool: no collector is up
        send_end(pub)
    assert replay_dirs([runs / RUN], elsewhere)
    assert replay_dirs([runs / RUN], elsewhere)  # again: still read from the start, stored once

    assert cursor_file.read_text() == saved
    assert stored(elsewhere)["steps"] == list(range(9))
    assert replay_dirs([runs / RUN], runs)
    assert stored(runs)["steps"] == list(range(9))
    assert stored(runs)["status"] == "completed"


def test_rows_dropped_after_failed_flushes_are_read_again_by_the_next_collector(
    tmp_path, monkeypatch
):
    """Past MAX_UNWRITTEN_ROWS the oldest buffered rows are dropped: the run's cursor must not
    be saved past them, so that a restarted collector reads them from the spool again."""
    from collector import service

    path = make_spool(tmp_path, RUN, range(3), age_s=60)
    first = Collector(runs_dir=tmp_path, writer="inline")
    first.spools.scan()
    assert first.commit_all()
    first.spools.save_committed(force=True)
    saved = json.loads((path.parent / CURSOR_NAME).read_text())
    with publisher(tmp_path) as pub:  # 12 more steps, taken in by the next scan
        send_steps(pub, range(3, 15))
        send_end(pub)
    then = time.time() - 60
    os.utime(path, (then, then))

    monkeypatch.setattr(service, "MAX_UNWRITTEN_ROWS", 5)
    with locked(tmp_path / RUN / "dynamics.db", "BEGIN EXCLUSIVE"):
        first.spools.scan()
        assert not first.flush()  # refused: all but the newest 5 rows are dropped
    assert first.stats.rows_dropped > 0
    assert first.commit_all()
    first.spools.save_committed(force=True)
    assert not first.shutdown()  # rows were dropped: not a clean exit (prismatic collect: 1)
    assert json.loads((path.parent / CURSOR_NAME).read_text()) == saved  # not moved
    assert stored(tmp_path)["steps"] != list(range(15))  # some really are missing

    second = Collector(runs_dir=tmp_path, writer="inline")
    second.spools.scan()
    assert second.shutdown()
    assert stored(tmp_path)["steps"] == list(range(15))


def rows_held_at_each_message(collector: Collector) -> list[int]:
    """The rows the collector holds as each message is handled (filled in as it handles)."""
    held: list[int] = []
    handle = collector.handle

    def watching(message, prepared=None):
        held.append(collector.buffered_rows)
        return handle(message, prepared)

    collector.handle = watching  # type: ignore[method-assign]
    return held


def test_a_long_spool_is_handed_to_the_writer_as_it_is_read(tmp_path):
    """A replay flushes every flush_rows rows, as the receiving loop does, instead of holding
    the whole spool's rows in memory until it ends."""
    from collector.replay import replay_file

    path = make_spool(tmp_path, RUN, range(500), age_s=0)
    collector = Collector(runs_dir=tmp_path / "runs", writer="inline", flush_rows=50)
    held = rows_held_at_each_message(collector)
    replay_file(collector, path)
    assert collector.shutdown()
    assert max(held) <= 51
    assert stored(tmp_path / "runs")["steps"] == list(range(500))


def test_a_spool_of_large_messages_is_handed_over_by_bytes_too(tmp_path, monkeypatch):
    """A large model's messages are big: a replay hands its rows to the writer every
    FLUSH_BYTES of them, not only every flush_rows rows."""
    from collector import replay

    path = make_spool(tmp_path, RUN, range(100), age_s=0)
    size = path.stat().st_size // 102
    monkeypatch.setattr(replay, "FLUSH_BYTES", 4 * size)
    collector = Collector(runs_dir=tmp_path / "runs", writer="inline", flush_rows=10_000)
    held = rows_held_at_each_message(collector)
    replay.replay_file(collector, path)
    assert collector.shutdown()
    assert max(held) <= 4 + 8 + 1  # FLUSH_BYTES' worth, looked at every 8 messages
    assert stored(tmp_path / "runs")["steps"] == list(range(100))
