"""The collector over in-process sockets: layer means and the long table, several runs and ranks
at once, the rank timeout, the shard rule, duplicates and reordering, restarts (these five over
real TCP too), stale runs and end statuses, bounded file handles, and its logs."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
import zmq
from collector_support import (
    RUN_A,
    RUN_B,
    RUN_C,
    db_path,
    dynamics,
    fast_collector,
    metrics,
    pusher,
    query,
    run_end,
    run_row,
    run_start,
    running,
    send,
    steps_in,
    wait_for,
)
from net_support import free_port

from collector import service
from prismatic import db, wire


@pytest.fixture
def context() -> zmq.Context:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # closes what a failed test left open, instead of hanging in term()


def _address(request: pytest.FixtureRequest) -> str:
    return f"inproc://{request.node.name}"


@pytest.fixture(params=["inproc", "tcp"])
def address(request: pytest.FixtureRequest) -> str:
    """The aggregation scenarios run over in-process sockets and over real TCP on loopback."""
    if request.param == "tcp":
        return f"tcp://127.0.0.1:{free_port()}"
    return _address(request)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_layers_are_averaged_into_dynamics_and_kept_in_layer_dynamics(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        send(s, dynamics(RUN_A, 30, val_loss=2.0))
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [30])

    path = db_path(tmp_path, RUN_A)
    sent = metrics(30)
    row = dict(zip(*_columns_and_row(path, 30), strict=True))
    for expert in range(3):
        column = "clean_norm" if expert == 0 else "perturbed_norm"
        assert row[f"expert_{expert}_{column}"] == pytest.approx(
            _mean([layer[expert] for layer in sent["norm"]])
        )
        assert row[f"expert_{expert}_bottom_norm"] == pytest.approx(
            _mean([layer[expert] for layer in sent["bottom_norm"]])
        )
    assert row["expert_1_divergence"] == pytest.approx(
        _mean([layer[1] for layer in sent["divergence"]])
    )
    assert (row["loss"], row["val_loss"], row["ranks_reported"], row["rank_spread"]) == (
        pytest.approx(4.97),
        2.0,
        1,
        0.0,
    )
    layers = query(
        path, "SELECT layer, expert, top_norm FROM layer_dynamics ORDER BY layer, expert"
    )
    assert [(r[0], r[1]) for r in layers] == [(la, e) for la in range(4) for e in range(3)]
    assert [r[2] for r in layers] == pytest.approx([v for la in sent["top_norm"] for v in la])


def _columns_and_row(path: Path, step: int) -> tuple[list[str], tuple]:
    conn = db.connect_reader(path)
    try:
        columns, rows = db.read_dynamics(conn)
    finally:
        conn.close()
    return columns, next(r for r in rows if r[0] == step)


def test_several_runs_and_ranks_at_once(tmp_path: Path, context: zmq.Context, address: str) -> None:
    worlds = {RUN_A: 1, RUN_B: 2, RUN_C: 3}
    steps = range(0, 200, 10)
    with running(fast_collector(address, tmp_path, context=context)) as collector:
        senders = {
            (run, rank): context.socket(zmq.PUSH) for run, w in worlds.items() for rank in range(w)
        }
        for sock in senders.values():
            sock.connect(address)
        for (run, rank), sock in senders.items():
            send(sock, run_start(run, worlds[run], rank=rank))
        # Interleave every sender's steps, as trainers running side by side would.
        for step in steps:
            for (run, rank), sock in senders.items():
                send(sock, dynamics(run, step, rank=rank))
        for (run, rank), sock in senders.items():
            send(sock, run_end(run, rank=rank, last_step=190))
        for run in worlds:
            wait_for(lambda run=run: run_row(tmp_path, run).get("status") == "completed")
        for sock in senders.values():
            sock.close()
    assert collector.stats.rejected == {}

    for run, world in worlds.items():
        path = db_path(tmp_path, run)
        assert steps_in(tmp_path, run) == list(steps)
        assert {r[0] for r in query(path, "SELECT ranks_reported FROM dynamics")} == {world}
        assert query(path, "SELECT count(*) FROM layer_dynamics") == [(len(steps) * 12,)]
        # Ranks differ by rank/1000 in every value: the stored value is their mean.
        top = query(path, "SELECT top_norm FROM layer_dynamics WHERE step=50 AND layer=0")
        expected = [
            _mean([metrics(50, rank=r)["top_norm"][0][e] for r in range(world)]) for e in range(3)
        ]
        assert [r[0] for r in top] == pytest.approx(expected)
        spread = query(path, "SELECT max(rank_spread) FROM dynamics")[0][0]
        assert (spread > 0) == (world > 1)  # the desync detector sees the per-rank offset
        assert spread < 0.01
        assert run_row(tmp_path, run)["world_size"] == world


def test_a_step_is_written_once_every_rank_reported_or_after_the_rank_timeout(
    tmp_path: Path, context: zmq.Context, address: str
) -> None:
    # Long enough that a loaded machine still writes the complete step 10 before step 20 times out.
    collector = fast_collector(address, tmp_path, context=context, rank_timeout_s=4.0)
    with running(collector), pusher(context, address) as s:
        send(s, run_start(RUN_A, world_size=2))
        send(s, dynamics(RUN_A, 10, rank=0))
        send(s, dynamics(RUN_A, 10, rank=1))  # complete: written without waiting
        send(s, dynamics(RUN_A, 20, rank=0))  # rank 1 never reports step 20 in time
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [10], timeout=3.5)
        ranks = "SELECT step, ranks_reported FROM dynamics ORDER BY step"
        assert query(db_path(tmp_path, RUN_A), ranks) == [(10, 2)]

        wait_for(lambda: steps_in(tmp_path, RUN_A) == [10, 20], what="the rank timeout")
        assert query(db_path(tmp_path, RUN_A), ranks) == [(10, 2), (20, 1)]

        # Rank 1 reports step 20 late: it joins the written step, which now has both ranks.
        send(s, dynamics(RUN_A, 20, rank=1))
        wait_for(lambda: query(db_path(tmp_path, RUN_A), ranks) == [(10, 2), (20, 2)])
        # A late duplicate of one rank does not turn a complete step back into a partial one.
        send(s, dynamics(RUN_A, 10, rank=0))
    assert query(db_path(tmp_path, RUN_A), ranks) == [(10, 2), (20, 2)]


def test_a_run_that_declares_shards_combines_norms_as_root_sum_of_squares(
    tmp_path: Path, context: zmq.Context, address: str
) -> None:
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A, world_size=2, shards=True))
        for rank in range(2):
            send(s, dynamics(RUN_A, 10, rank=rank))
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [10])

    path = db_path(tmp_path, RUN_A)
    norms = [metrics(10, rank=r)["norm"] for r in range(2)]
    stored = query(path, "SELECT layer, expert, norm FROM layer_dynamics WHERE step=10")
    for layer, expert, value in stored:
        a, b = norms[0][layer][expert], norms[1][layer][expert]
        assert value == pytest.approx((a * a + b * b) ** 0.5)
    spread = query(path, "SELECT ranks_reported, rank_spread FROM dynamics")
    assert spread == [(2, None)]


def test_duplicates_and_reordering_store_each_step_once(
    tmp_path: Path, context: zmq.Context, address: str
) -> None:
    order = [s for s in range(0, 500, 10)] * 3
    random.Random(3).shuffle(order)
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        for step in order:
            send(s, dynamics(RUN_A, step))
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 50)
    path = db_path(tmp_path, RUN_A)
    assert steps_in(tmp_path, RUN_A) == list(range(0, 500, 10))
    assert query(path, "SELECT count(*) FROM layer_dynamics") == [(50 * 12,)]
    assert query(path, "SELECT loss FROM dynamics WHERE step=250") == [(pytest.approx(4.75),)]
    assert run_row(tmp_path, RUN_A)["messages"] == 151


def test_a_restarted_collector_continues_the_same_database(
    tmp_path: Path, context: zmq.Context, address: str
) -> None:
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A, world_size=2))
        for step in range(0, 100, 10):
            for rank in range(2):
                send(s, dynamics(RUN_A, step, rank=rank))
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 10)

    # The new process has not seen run_start: the world size comes from the database, so a
    # step from rank 0 alone waits for rank 1 instead of being written as complete.
    collector = fast_collector(address, tmp_path, context=context, rank_timeout_s=60)
    with running(collector), pusher(context, address) as s:
        for step in range(50, 150, 10):  # overlaps what is stored
            send(s, dynamics(RUN_A, step, rank=0))
        for step in range(50, 150, 10):
            send(s, dynamics(RUN_A, step, rank=1))
        send(s, run_end(RUN_A, rank=0, last_step=140))
        send(s, run_end(RUN_A, rank=1, last_step=140))
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "completed")

    path = db_path(tmp_path, RUN_A)
    assert steps_in(tmp_path, RUN_A) == list(range(0, 150, 10))
    assert {r[0] for r in query(path, "SELECT ranks_reported FROM dynamics")} == {2}
    assert query(path, "SELECT count(*) FROM layer_dynamics") == [(15 * 12,)]
    assert query(path, "SELECT count(*) FROM schema_migrations") == [(len(db.MIGRATIONS),)]
    assert run_row(tmp_path, RUN_A)["messages"] == 1 + 20 + 20 + 2


def test_silent_runs_go_stale_and_run_end_sets_the_status(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    runs = {RUN_A: None, RUN_B: "failed", RUN_C: "interrupted", "d00000004": "completed"}
    collector = fast_collector(address, tmp_path, context=context, stale_after_s=1.0)
    with running(collector), pusher(context, address) as s:
        for run in runs:
            send(s, run_start(run))
            send(s, dynamics(run, 0))
        for run, status in runs.items():
            if status:
                send(s, run_end(run, status))
        for run, status in runs.items():
            wait_for(
                lambda run=run, status=status: (
                    run_row(tmp_path, run).get("status") == (status or "stale")
                ),
                what=f"{run} {status or 'stale'}",
            )
        # A stale run that speaks again is live again. With a 1 s limit it would be stale again
        # a second later, before a slow poll saw it live: the limit is long from here on.
        collector.stale_after_s = 60.0
        send(s, dynamics(RUN_A, 10))
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "live")
    assert run_row(tmp_path, RUN_B)["ended"] is not None


def test_a_run_start_read_again_does_not_reopen_an_ended_run_and_a_resume_does(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    first = run_start(RUN_A)
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, first)
        send(s, dynamics(RUN_A, 0))
        send(s, run_end(RUN_A, "interrupted") | {"ts": first["ts"] + 60})
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "interrupted")
        send(s, first)  # the spool replayed (`--replay`, another collector): sent before the end
        send(s, dynamics(RUN_A, 10))
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [0, 10])
        assert run_row(tmp_path, RUN_A)["status"] == "interrupted"
        send(s, run_start(RUN_A) | {"ts": first["ts"] + 120})  # resumed after the end
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "live")
        assert run_row(tmp_path, RUN_A)["ended"] is None


def test_a_run_left_live_by_an_earlier_collector_goes_stale(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "live")
    # The trainer died with the first collector; the second one never hears from it.
    with running(fast_collector(address, tmp_path, context=context, stale_after_s=0.5)):
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "stale")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_databases_are_closed_so_many_runs_keep_file_handles_bounded(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    runs = [f"{i:09x}" for i in range(1, 201)]
    before = _open_files()
    collector = fast_collector(
        address, tmp_path, context=context, max_open_runs=16, idle_close_s=0.5
    )
    peak = 0
    with running(collector), pusher(context, address) as s:
        for i, run in enumerate(runs):
            send(s, run_start(run))
            send(s, dynamics(run, 0))
            if i % 20 == 19:
                wait_for(lambda i=i: collector.stats.received >= 2 * (i + 1))
                peak = max(peak, _open_files() - before)
        wait_for(lambda: all(steps_in(tmp_path, r) == [0] for r in runs[-5:]))
        assert len(collector._stores) <= 16
        # With nothing arriving, idle databases close.
        wait_for(lambda: len(collector._stores) == 0, what="idle databases to close")
        idle_files = _open_files() - before
    assert all(steps_in(tmp_path, r) == [0] for r in runs)
    # A database holds up to three files (db, -wal, -shm): 16 open at most, not 200.
    assert peak <= 16 * 3 + 10, peak
    assert idle_files <= 10, idle_files


def test_a_run_whose_database_is_unusable_is_rejected_and_others_go_on(
    tmp_path: Path,
    context: zmq.Context,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for run in (RUN_B, RUN_C):
        (tmp_path / run).mkdir()
        (tmp_path / run / db.DB_NAME).write_bytes(b"not a database at all" * 50)
    address = _address(request)
    with running(fast_collector(address, tmp_path, context=context)) as collector:
        with pusher(context, address) as s:
            for step in range(5):
                send(s, dynamics(RUN_B, step))
                send(s, dynamics(RUN_C, step))
                send(s, dynamics(RUN_A, step))
            wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 5)
            wait_for(lambda: collector.stats.rejected["bad_database"] == 10)
    assert (tmp_path / RUN_B / db.DB_NAME).read_bytes().startswith(b"not a database")
    warned = [r.getMessage() for r in caplog.records if "bad_database" in r.getMessage()]
    for run in (RUN_B, RUN_C):  # each refused database is named, not only the first
        assert sum(run in line for line in warned) == 1, warned


def test_lifecycle_logs_without_a_line_per_message(
    tmp_path: Path,
    context: zmq.Context,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="collector")
    address = _address(request)
    collector = fast_collector(address, tmp_path, context=context, stats_interval_s=0.3)
    with running(collector), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        for step in range(2000):
            send(s, dynamics(RUN_A, step))
        send(s, {"v": 1, "kind": "nope"})  # one rejection
        wait_for(lambda: collector.stats.received == 2002)
        wait_for(lambda: any("msg/s" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records]
    assert (
        f"listening on {address}" in lines[0] and f"schema version {db.SCHEMA_VERSION}" in lines[0]
    )
    throughput = [line for line in lines if "msg/s" in line]
    assert throughput and "rows written" in throughput[-1] and "live runs" in throughput[-1]
    assert any("unknown_kind" in line for line in lines)
    assert "stopped; 2002 messages, 2000 rows written" in lines[-1]
    assert len(lines) < 60, lines  # periodic lines, not one per message


def test_rejections_are_counted_each_time_and_warned_once_per_reason_and_interval(
    tmp_path: Path,
    context: zmq.Context,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(service, "WARN_INTERVAL_S", 3600.0)  # however slow this machine is
    address = _address(request)
    collector = fast_collector(address, tmp_path, context=context)
    with running(collector), pusher(context, address) as s:
        for _ in range(500):
            send(s, {"v": 1, "kind": "nope"})
            s.send(b"\xc1 not msgpack")
        wait_for(lambda: collector.stats.received == 1000)
    assert collector.stats.rejected == {"unknown_kind": 500, "bad_msgpack": 500}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert {w.split(":")[1].strip() for w in warnings} == {"unknown_kind", "bad_msgpack"}
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_design_notes_nested_dict_is_stored_under_its_column_names(
    tmp_path: Path, context: zmq.Context, address: str
) -> None:
    """A user on the design note's manual path sends its dict as is."""
    message = dynamics(RUN_A, 10)
    del message["metrics"]
    message["expert_gradients"] = {
        "expert_0": {"top_norm": 1.0, "bottom_norm": 0.1, "middle_norm": 2.0, "clean_norm": 3.0},
        "expert_1": {
            "top_norm": 1.5,
            "bottom_norm": 0.4,
            "middle_norm": 2.0,
            "perturbed_norm": 3.5,
        },
    }
    message["divergence_scores"] = {"expert_1_divergence": 0.07}
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, message)
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [10])
    stored = dict(zip(*_columns_and_row(db_path(tmp_path, RUN_A), 10), strict=True))
    assert stored["expert_0_clean_norm"] == 3.0
    assert stored["expert_1_perturbed_norm"] == 3.5
    assert stored["expert_1_bottom_norm"] == 0.4
    assert stored["expert_1_divergence"] == 0.07
    assert stored["expert_0_bottom_norm"] == 0.1
    assert run_row(tmp_path, RUN_A)["status"] == "live"  # live without a run_start too


def test_rejected_ranks_outside_the_declared_world(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    with running(fast_collector(address, tmp_path, context=context)) as collector:
        with pusher(context, address) as s:
            send(s, run_start(RUN_A, world_size=2))
            send(s, dynamics(RUN_A, 0, rank=wire.MAX_RANK))
            send(s, run_start(RUN_B, world_size=2, rank=3))
            send(s, dynamics(RUN_A, 10, rank=0))
            send(s, dynamics(RUN_A, 10, rank=1))
            wait_for(lambda: steps_in(tmp_path, RUN_A) == [10])
    assert collector.stats.rejected == {"bad_rank": 2}
    assert run_row(tmp_path, RUN_A)["rejected"] == 1
    assert not (tmp_path / RUN_B).exists()  # a rejected run_start creates no run


def test_every_rank_at_the_largest_sent_count_sums_without_overflow(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    world = 4
    collector = fast_collector(address, tmp_path, context=context)
    with running(collector), pusher(context, address) as s:
        for rank in range(world):
            send(s, run_start(RUN_A, world_size=world, rank=rank))
        for rank in range(world):
            send(s, run_end(RUN_A, rank=rank) | {"sent": wire.MAX_COUNT, "dropped": wire.MAX_COUNT})
        wait_for(lambda: run_row(tmp_path, RUN_A).get("status") == "completed")
    row = run_row(tmp_path, RUN_A)
    assert (row["sent"], row["dropped"]) == (world * wire.MAX_COUNT, world * wire.MAX_COUNT)
    assert collector.stats.flush_errors == 0


def test_a_run_removed_while_its_database_is_open_is_written_to_a_new_one(
    tmp_path: Path,
    context: zmq.Context,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The user deletes a run's folder and runs the same config again (the same run hash)
    before the collector closed the database: the new rows must not go into the deleted file."""
    address = _address(request)
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        for step in range(10):
            send(s, dynamics(RUN_A, step))
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 10)
        shutil.rmtree(tmp_path / RUN_A)
        send(s, run_start(RUN_A))
        for step in range(100, 110):
            send(s, dynamics(RUN_A, step))
        send(s, run_end(RUN_A, last_step=109))
        wait_for(
            lambda: (
                db_path(tmp_path, RUN_A).exists()
                and run_row(tmp_path, RUN_A).get("status") == "completed"
            )
        )
    assert steps_in(tmp_path, RUN_A) == list(range(100, 110))
    assert any("was removed while open" in r.getMessage() for r in caplog.records)


def test_a_removed_database_that_cannot_be_made_again_is_refused_and_others_go_on(
    tmp_path: Path,
    context: zmq.Context,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = _address(request)
    collector = fast_collector(address, tmp_path, context=context)
    # Step 10 of RUN_A can go nowhere: shutdown says so (exit 1 for `prismatic collect`).
    with pytest.raises(AssertionError, match="could not commit everything"):
        with running(collector), pusher(context, address) as s:
            send(s, dynamics(RUN_A, 0))
            wait_for(lambda: steps_in(tmp_path, RUN_A) == [0])
            shutil.rmtree(tmp_path / RUN_A)
            (tmp_path / RUN_A).write_text("a file where the run folder was")
            send(s, dynamics(RUN_A, 10))
            wait_for(lambda: collector.stats.rejected["bad_database"] >= 1)
            send(s, dynamics(RUN_B, 0))
            wait_for(lambda: steps_in(tmp_path, RUN_B) == [0])  # the loop goes on
    # Kept until the end, not lost silently into the deleted file.
    assert any("could not commit 1 rows" in r.getMessage() for r in caplog.records)


def test_a_run_whose_folder_was_removed_is_not_brought_back_by_going_stale(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    address = _address(request)
    collector = fast_collector(
        address, tmp_path, context=context, stale_after_s=1.0, idle_close_s=0.2
    )
    with running(collector), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        send(s, dynamics(RUN_A, 0))
        send(s, run_start(RUN_B))
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [0])
        wait_for(lambda: not collector._stores, what="idle databases closed")
        shutil.rmtree(tmp_path / RUN_A)  # the user deletes a run it no longer wants
        wait_for(lambda: run_row(tmp_path, RUN_B).get("status") == "stale")
        wait_for(lambda: RUN_A not in collector._runs, what="the removed run forgotten")
        assert not (tmp_path / RUN_A).exists()
        send(s, dynamics(RUN_A, 10))  # a trainer that speaks again creates it again
        wait_for(lambda: steps_in(tmp_path, RUN_A) == [10])


def test_the_database_is_never_locked_for_a_reader(
    tmp_path: Path, context: zmq.Context, request: pytest.FixtureRequest
) -> None:
    """A reader that opens, reads and closes while the collector writes never waits long."""
    address = _address(request)
    with running(fast_collector(address, tmp_path, context=context)), pusher(context, address) as s:
        send(s, run_start(RUN_A))
        for step in range(300):
            send(s, dynamics(RUN_A, step))
            if step % 30 == 0:
                try:
                    query(db_path(tmp_path, RUN_A), "SELECT count(*) FROM dynamics")
                except sqlite3.OperationalError as exc:  # pragma: no cover - the failure
                    pytest.fail(f"reader failed: {exc}")
        wait_for(lambda: len(steps_in(tmp_path, RUN_A)) == 300)


def test_rows_held_for_the_writer_are_bounded_by_the_bytes_of_their_messages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big (valid) messages make big rows: the receiving loop waits for the writer once the
    messages behind the rows it holds pass MAX_HELD_BYTES, not only past 8,000 rows."""
    from collector import service
    from collector.service import Collector

    data = [wire.encode(dynamics(RUN_A, step)) for step in range(30)]
    monkeypatch.setattr(service, "MAX_HELD_BYTES", sum(map(len, data[:20])))
    collector = Collector(runs_dir=tmp_path, writer="inline")
    collector.handle_bytes(wire.encode(run_start(RUN_A)))
    for d in data[:20]:
        collector.handle_bytes(d)
    at_the_limit = collector._backlogged()
    collector.handle_bytes(data[20])
    past_it = collector._backlogged()
    assert collector.flush()
    after_flush = collector._backlogged()
    assert collector.shutdown()

    assert (at_the_limit, past_it, after_flush) == (False, True, False)
    assert steps_in(tmp_path, RUN_A) == list(range(21))
