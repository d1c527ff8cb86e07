"""The store: schema and named migrations, quoted columns, idempotent upserts, the rank guard,
flush failures, and SQLite settings (WAL, busy timeout, bounded WAL) on real files."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from collector_support import RUN_A, dynamics, metrics

from collector import store as store_module
from collector.ranks import build_single
from collector.store import RunStore, StepRow
from prismatic import db
from prismatic.errors import SchemaError
from prismatic.wire import decode, encode


def _row(step: int, ranks: int = 1, world: int = 1, loss: float | None = 1.0, **kw) -> StepRow:
    row = build_single(decode(encode(dynamics(RUN_A, step, loss=loss, **kw))))
    row.ranks_reported, row.world_size = ranks, world
    return row


def _select(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_migrations_are_named_recorded_once_and_give_the_schema_version(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    store.close()
    RunStore(tmp_path / RUN_A).close()  # opening again applies nothing twice
    recorded = _select(tmp_path / RUN_A / db.DB_NAME, "SELECT version, name FROM schema_migrations")
    assert recorded == [(v, name) for v, name, _ in db.MIGRATIONS]
    assert store.schema_version == db.SCHEMA_VERSION == db.MIGRATIONS[-1][0]
    tables = {
        r[0] for r in _select(tmp_path / RUN_A / db.DB_NAME, "SELECT name FROM sqlite_master")
    }
    assert {"run", "dynamics", "layer_dynamics", "schema_migrations"} <= tables


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    RunStore(tmp_path / RUN_A).close()
    conn = sqlite3.connect(tmp_path / RUN_A / db.DB_NAME)
    conn.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="999"):
        RunStore(tmp_path / RUN_A)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / RUN_A).mkdir()
    (tmp_path / RUN_A / db.DB_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SchemaError):
        RunStore(tmp_path / RUN_A)


def test_writer_settings_wal_busy_timeout_and_journal_limit(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    conn = store.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS
    assert conn.execute("PRAGMA journal_size_limit").fetchone()[0] == db.JOURNAL_SIZE_LIMIT
    # A bounded page cache per open run: the collector's memory stays flat as databases grow.
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == -db.WRITER_CACHE_KIB
    store.close()


def test_column_names_come_only_from_validated_parts() -> None:
    assert db.expert_column(0, "norm") == "expert_0_clean_norm"
    assert db.expert_column(2, "norm") == "expert_2_perturbed_norm"
    assert db.expert_column(1, "bottom_norm") == "expert_1_bottom_norm"
    for expert, metric in [
        (0, 'x"; DROP TABLE run; --'),
        (-1, "norm"),
        (256, "norm"),
        ("1", "norm"),
    ]:
        with pytest.raises(ValueError):
            db.expert_column(expert, metric)  # type: ignore[arg-type]
    assert db.quote('a"b') == '"a""b"'


def test_design_note_columns_and_layer_rows(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    store.add_step(_row(10))
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    columns = set(db.table_columns(sqlite3.connect(path), "dynamics"))
    note = {
        "expert_0_top_norm",
        "expert_0_bottom_norm",
        "expert_0_middle_norm",
        "expert_0_clean_norm",
        "expert_1_top_norm",
        "expert_1_bottom_norm",
        "expert_1_middle_norm",
        "expert_1_perturbed_norm",
        "expert_1_divergence",
        "expert_2_perturbed_norm",
        "expert_2_divergence",
    }
    assert note <= columns
    assert "expert_0_divergence" not in columns  # expert 0 has no divergence to itself
    assert _select(path, "SELECT count(*) FROM layer_dynamics WHERE step=10") == [(12,)]
    layer3 = _select(path, "SELECT bottom_norm FROM layer_dynamics WHERE step=10 AND layer=3")
    assert [r[0] for r in layer3] == pytest.approx(metrics(10)["bottom_norm"][3])


def test_upserts_are_idempotent_and_keep_val_loss(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    store.add_step(_row(10, val_loss=2.5))
    store.flush()
    for _ in range(3):
        store.add_step(_row(10, loss=0.5))  # again, without val_loss
        store.add_step(_row(20))
        store.flush()
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    assert _select(path, "SELECT step, loss, val_loss FROM dynamics") == [
        (10, 0.5, 2.5),
        (20, 1.0, None),
    ]
    assert _select(path, "SELECT count(*) FROM layer_dynamics") == [(24,)]


def test_a_repeat_in_the_same_flush_keeps_the_loss_val_loss_and_lr_it_lacks(
    tmp_path: Path,
) -> None:
    store = RunStore(tmp_path / RUN_A)
    store.add_step(_row(10, loss=3.0, val_loss=2.5, lr=0.1))
    store.add_step(_row(10, loss=None, lr=None))  # again before a flush, its loss and lr NaN
    store.add_step(_row(10, loss=0.5, lr=None))  # and once more, with a loss
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    assert _select(path, "SELECT step, loss, val_loss, lr FROM dynamics") == [(10, 0.5, 2.5, 0.1)]


def test_a_partial_step_never_replaces_one_with_more_ranks(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    store.add_step(_row(10, ranks=2, world=2, loss=1.0))
    store.flush()
    store.add_step(_row(10, ranks=1, world=2, loss=9.0))  # a late duplicate of one rank
    store.add_step(_row(20, ranks=1, world=2, loss=9.0))  # a new partial step: written
    assert [r.step for r in store.flush()] == [20]
    # In one batch, too: the row with more ranks wins whatever the order.
    store.add_step(_row(30, ranks=2, world=2, loss=1.0))
    store.add_step(_row(30, ranks=1, world=2, loss=9.0))
    store.close()
    rows = _select(tmp_path / RUN_A / db.DB_NAME, "SELECT step, ranks_reported, loss FROM dynamics")
    assert rows == [(10, 2, 1.0), (20, 1, 9.0), (30, 2, 1.0)]


def test_a_failed_flush_keeps_its_rows_for_the_next_try(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    store.flush()
    store.conn.execute("PRAGMA busy_timeout=50")
    blocker = sqlite3.connect(tmp_path / RUN_A / db.DB_NAME, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    store.add_step(_row(10))
    store.update_run(status="live")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.flush()
    assert store.pending == 2
    blocker.execute("ROLLBACK")
    blocker.close()
    assert [r.step for r in store.flush()] == [10]
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    assert _select(path, "SELECT step FROM dynamics") == [(10,)]
    assert _select(path, "SELECT status FROM run") == [("live",)]


def test_a_row_sqlite_cannot_hold_is_dropped_and_the_others_written(tmp_path: Path) -> None:
    # Validation keeps such rows out; this is the store's last line of defence against a gap.
    store = RunStore(tmp_path / RUN_A)
    bad = _row(20)
    bad.nonfinite = 2**70
    for row in (_row(10), bad, _row(30)):
        store.add_step(row)
    store.update_run(status="live")
    assert [r.step for r in store.flush()] == [10, 30]
    assert store.unwritable_rows == 1
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    assert _select(path, "SELECT step FROM dynamics") == [(10,), (30,)]
    assert _select(path, "SELECT status FROM run") == [("live",)]


def test_batches_larger_than_one_statement_are_written_whole(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    template = _row(0)
    for step in range(1234):  # several multi-row statements and a remainder
        store.add_step(replace(template, step=step, loss=float(step)))
    big = decode(encode(dynamics(RUN_A, 5000)))
    big["metrics"] = {
        "norm": [[1.0 + layer + expert / 100 for expert in range(20)] for layer in range(40)],
        "top_norm": [[0.5] * 20 for _ in range(40)],
    }
    store.add_step(build_single(big))  # 800 cells: several layer statements
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    assert _select(path, "SELECT count(*), sum(loss) FROM dynamics WHERE step < 5000") == [
        (1234, float(sum(range(1234))))
    ]
    assert _select(path, "SELECT count(*) FROM layer_dynamics WHERE step < 5000") == [(1234 * 12,)]
    cells = _select(path, "SELECT layer, expert, norm FROM layer_dynamics WHERE step = 5000")
    assert len(cells) == 800
    assert all(norm == pytest.approx(1.0 + layer + expert / 100) for layer, expert, norm in cells)
    mean = _select(path, "SELECT expert_19_perturbed_norm FROM dynamics WHERE step = 5000")
    assert mean == [(pytest.approx(1.0 + 19.5 + 0.19),)]


def test_new_experts_add_columns(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    wide = decode(encode(dynamics(RUN_A, 1)))
    wide["metrics"] = {"norm": [[1.0] * 5], "divergence": [[None, 0.1, 0.2, 0.3, 0.4]]}
    store.add_step(build_single(wide))
    store.close()
    path = tmp_path / RUN_A / db.DB_NAME
    assert _select(path, "SELECT expert_4_perturbed_norm, expert_4_divergence FROM dynamics") == [
        (1.0, 0.4)
    ]


def test_run_table_rejects_unknown_columns(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    with pytest.raises(ValueError):
        store.update_run(**{"status = 'x' --": 1})
    with pytest.raises(ValueError):
        store.count("status")
    store.close()


def _wal_past_its_limit(store: RunStore) -> tuple[sqlite3.Connection, int]:
    """A slow dashboard query holds one snapshot while the collector writes a lot: the reader,
    still in its transaction, and the next step to write."""
    reader = db.connect_reader(store.path)
    reader.isolation_level = None
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM dynamics").fetchone()
    template, step = _row(0), 0
    while store.wal_bytes <= db.JOURNAL_SIZE_LIMIT:
        for _ in range(500):
            store.add_step(replace(template, step=step))
            step += 1
        store.flush()
    return reader, step


def test_the_wal_comes_back_under_its_limit_once_a_slow_reader_moves_on(tmp_path: Path) -> None:
    store = RunStore(tmp_path / RUN_A)
    template = _row(0)
    reader, step = _wal_past_its_limit(store)
    store.checkpoint()  # cannot fold back what the reader still sees
    assert store.wal_bytes > db.JOURNAL_SIZE_LIMIT

    # The reader moves on but stays connected, polling: one checkpoint empties the WAL.
    reader.execute("COMMIT")
    store.checkpoint()
    assert store.wal_bytes <= db.JOURNAL_SIZE_LIMIT, store.wal_bytes
    for _ in range(20):
        for _ in range(200):
            store.add_step(replace(template, step=step))
            step += 1
        store.flush()
        assert reader.execute("SELECT max(step) FROM dynamics").fetchone()[0] == step - 1
        store.checkpoint()
        assert store.wal_bytes <= db.JOURNAL_SIZE_LIMIT, store.wal_bytes
    reader.close()
    store.close()


def test_past_the_hard_limit_the_checkpoint_waits_for_a_long_read_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers that overlap without a pause outlast the short wait every time; past the hard
    limit the checkpoint waits for a read as long as a long scan, and empties the WAL."""
    store = RunStore(tmp_path / RUN_A)
    reader, _ = _wal_past_its_limit(store)

    # Under the hard limit: a 200 ms wait, and the read still going on keeps the WAL.
    store.checkpoint()
    assert store.wal_bytes > db.JOURNAL_SIZE_LIMIT

    # Past it (lowered here, so the test need not write 64 MiB): the read ends a second later,
    # while the checkpoint waits.
    monkeypatch.setattr(store_module, "WAL_HARD_LIMIT", db.JOURNAL_SIZE_LIMIT)
    ends = threading.Timer(1.0, reader.execute, ("COMMIT",))
    ends.start()
    store.checkpoint()
    ends.join()
    assert store.wal_bytes == 0, store.wal_bytes
    reader.close()
    store.close()
