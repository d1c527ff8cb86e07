"""Hostile and malformed input through the collector: every message is rejected with a counted
reason or stored soundly; nothing corrupt is written and nothing escapes the runs folder.

The property-based fuzz (hypothesis) and the 100,000-message fuzz feed decoder, validator and
collector together, then check every database the collector wrote, row by row."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from collector_support import (
    RUN_A,
    RUN_B,
    SERVICE_REASONS,
    assert_databases_sound,
    db_path,
    dynamics,
    fast_collector,
    pusher,
    query,
    run_end,
    run_start,
    running,
    steps_in,
    wait_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.burst import Burst
from collector.service import Collector
from prismatic import wire
from prismatic.errors import ProtocolError

KNOWN_REASONS = (*wire.REJECT_REASONS, *SERVICE_REASONS)


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _hostile_messages() -> list[tuple[str, bytes]]:
    """(expected reason, bytes) for each kind of attack the issue names, and a few more."""
    out: list[tuple[str, bytes]] = []

    def add(reason: str, message: dict | bytes) -> None:
        out.append((reason, message if isinstance(message, bytes) else wire.encode(message)))

    for run in (
        "../../../tmp/x",
        "..",
        "a00000001/../../b",
        "/etc/passwd",
        "a0000000\x00",
        "A" * 9,
    ):
        add("bad_run_hash", dynamics(RUN_A, 1) | {"run": run})
    for name in ('top_norm" REAL); DROP TABLE dynamics; --', "step", "expert_0_top_norm", "1=1"):
        add("unknown_metric", dynamics(RUN_A, 1) | {"metrics": {name: [[1.0]]}})
    note = dynamics(RUN_A, 1)
    del note["metrics"]
    note["expert_gradients"] = {"expert_0": {"top_norm; DELETE FROM run": 1.0}}
    add("unknown_metric", note)
    add("oversized", dynamics(RUN_A, 1) | {"pad": "x" * (wire.MAX_MESSAGE_BYTES + 10)})
    deep: dict = {"leaf": 1}
    for _ in range(60):
        deep = {"x": deep}
    add("too_deep", run_start(RUN_A) | {"config": deep})
    add("bad_msgpack", b"\x91" * 5000 + b"\xc0")  # nested past msgpack's own stack
    add("too_large", run_start(RUN_A) | {"config": {i: [i] for i in range(30_000)}})
    for step in (-1, 10**13, 2**63, 2**64 - 1):
        add("absurd_step", dynamics(RUN_A, 1) | {"step": step})
    add("bad_field", run_end(RUN_A) | {"sent": 2**62})  # two ranks' sum would overflow SQLite
    add("bad_msgpack", b"\xde\xad\xbe\xef")
    add("not_a_map", msgpack.packb("just a string"))
    add("bad_version", dynamics(RUN_A, 1) | {"v": 99})
    add("unknown_kind", dynamics(RUN_A, 1) | {"kind": "exec"})
    add("bad_field", dynamics(RUN_A, 1) | {"rank": "0"})
    add("bad_field", {k: v for k, v in dynamics(RUN_A, 1).items() if k != "seq"})
    add("bad_value", dynamics(RUN_A, 1) | {"metrics": {"norm": [[{"$ne": 1}]]}})
    return out


def test_every_hostile_message_is_rejected_counted_and_writes_nothing(
    tmp_path: Path, context: zmq.Context
) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    hostile = _hostile_messages()
    address = "inproc://hostile"
    with running(fast_collector(address, runs_dir, context=context)) as collector:
        with pusher(context, address) as sock:
            for _, data in hostile:
                sock.send(data)
            wait_for(lambda: collector.stats.received == len(hostile))

    expected: dict[str, int] = {}
    for reason, _ in hostile:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(collector.stats.rejected) == expected
    assert _files(tmp_path) == {runs_dir}  # not one file or folder, inside the runs dir or out


def test_nan_and_inf_are_stored_as_null_and_counted(tmp_path: Path, context: zmq.Context) -> None:
    message = dynamics(RUN_A, 10, loss=math.inf)
    message["metrics"]["bottom_norm"][1][2] = math.nan
    message["metrics"]["norm"] = [[math.inf] * 3 for _ in range(4)]
    address = "inproc://nan"
    with running(fast_collector(address, tmp_path, context=context)) as collector:
        with pusher(context, address) as sock:
            sock.send(wire.encode(message))
            wait_for(lambda: steps_in(tmp_path, RUN_A) == [10])
    assert collector.stats.nonfinite_values == 1 + 1 + 12
    assert collector.stats.rejected == {}
    path = db_path(tmp_path, RUN_A)
    assert query(path, "SELECT loss, expert_0_clean_norm FROM dynamics") == [(None, None)]
    assert query(path, "SELECT bottom_norm FROM layer_dynamics WHERE layer=1 AND expert=2") == [
        (None,)
    ]
    assert query(path, "SELECT count(*) FROM layer_dynamics WHERE bottom_norm IS NOT NULL") == [
        (11,)
    ]
    assert assert_databases_sound(tmp_path) == 1


def test_sql_in_a_metric_name_leaves_the_tables_intact(
    tmp_path: Path, context: zmq.Context
) -> None:
    address = "inproc://sql"
    with running(fast_collector(address, tmp_path, context=context)) as collector:
        with pusher(context, address) as sock:
            sock.send(wire.encode(dynamics(RUN_A, 1)))
            evil = dynamics(RUN_A, 2)
            evil["metrics"]['norm"=0; DROP TABLE dynamics; --'] = evil["metrics"].pop("norm")
            sock.send(wire.encode(evil))
            sock.send(wire.encode(dynamics(RUN_A, 3)))
            wait_for(lambda: steps_in(tmp_path, RUN_A) == [1, 3])
    assert collector.stats.rejected == {"unknown_metric": 1}
    assert assert_databases_sound(tmp_path) == 1


# --- property-based fuzz -----------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_trees = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=24,
)
_FIELD_NAMES = (
    "v",
    "kind",
    "run",
    "rank",
    "seq",
    "ts",
    "step",
    "loss",
    "val_loss",
    "lr",
    "metrics",
    "world_size",
    "shards",
    "config",
    "model",
    "status",
    "last_step",
    "expert_gradients",
    "divergence_scores",
)
_VALID = [
    run_start(RUN_A, world_size=2),
    dynamics(RUN_A, 10, rank=0),
    dynamics(RUN_A, 10, rank=1),
    dynamics(RUN_B, 5, val_loss=1.0),
    run_end(RUN_B, "failed"),
]


@st.composite
def _fuzzed_message(draw: st.DrawFn) -> bytes:
    """Valid messages with fields replaced, dropped or added; valid bytes with bytes flipped;
    arbitrary trees; arbitrary bytes."""
    how = draw(st.sampled_from(["fields", "bytes", "tree", "raw", "metrics"]))
    base = dict(draw(st.sampled_from(_VALID)))
    if how == "fields":
        for name in draw(st.lists(st.sampled_from(_FIELD_NAMES), min_size=1, max_size=3)):
            if draw(st.booleans()):
                base[name] = draw(_trees)
            else:
                base.pop(name, None)
        return _pack(base)
    if how == "metrics":
        base = dict(_VALID[1])
        metrics = {k: [list(r) for r in t] for k, t in base["metrics"].items()}
        name = draw(st.sampled_from(sorted(metrics)))
        layer, expert = draw(st.integers(0, 3)), draw(st.integers(0, 2))
        metrics[name][layer][expert] = draw(_scalars)
        base["metrics"] = metrics
        return _pack(base)
    if how == "bytes":
        data = bytearray(wire.encode(base))
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if how == "tree":
        return _pack(draw(_trees))
    return draw(st.binary(max_size=200))


def _pack(value: object) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (ValueError, OverflowError, TypeError):
        return b"\xc1"


def test_fuzzed_messages_never_crash_the_collector_or_write_a_bad_row(tmp_path: Path) -> None:
    collector = Collector(runs_dir=tmp_path, stats_interval_s=3600)
    outcomes = {"accepted": 0}

    @settings(
        max_examples=600,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=_fuzzed_message())
    def feed(data: bytes) -> None:
        before = sum(collector.stats.rejected.values())
        accepted = collector.handle_bytes(data)  # must not raise, whatever the bytes
        after = sum(collector.stats.rejected.values())
        assert after == before + (0 if accepted else 1)
        outcomes["accepted"] += accepted
        if not accepted:
            try:
                wire.decode(data)
            except Exception as exc:  # decode itself only ever raises ProtocolError
                assert type(exc).__name__ == "ProtocolError", exc

    feed()
    assert collector.shutdown()
    assert set(collector.stats.rejected) <= set(KNOWN_REASONS)
    assert outcomes["accepted"] > 0 and collector.stats.rejected  # both sides were exercised
    assert assert_databases_sound(tmp_path) >= 1


def test_fuzzed_messages_in_bursts_are_rejected_as_alone(tmp_path: Path) -> None:
    """The same fuzz, fed as bursts among trainer messages of one encoding (so that the burst
    path reads their tables from the bytes, collector/burst.py): a message is rejected for the
    reason wire.decode gives it alone, or stored, and the databases stay sound."""
    collector = Collector(runs_dir=tmp_path, stats_interval_s=3600)
    trainer = [wire.encode(dynamics(RUN_B, step)) for step in range(8)]

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(fuzzed=st.lists(_fuzzed_message(), min_size=1, max_size=8), seed=st.integers(0, 99))
    def feed(fuzzed: list[bytes], seed: int) -> None:
        datas = trainer + fuzzed
        random.Random(seed).shuffle(datas)
        collector._burst = Burst(datas)
        try:
            for data in datas:
                before = collector.stats.rejected.copy()
                nonfinite = collector.stats.nonfinite_values
                accepted = collector.handle_bytes(data)  # must not raise, whatever the bytes
                new = collector.stats.rejected - before
                assert sum(new.values()) == (0 if accepted else 1)
                try:
                    alone = wire.decode(data)
                except ProtocolError as exc:
                    assert new == {exc.reason: 1}, data
                    continue
                assert set(new) <= set(SERVICE_REASONS), data
                counted = collector.stats.nonfinite_values - nonfinite
                assert counted == (alone.get("nonfinite_values", 0) if accepted else 0), data
        finally:
            collector._burst = None

    feed()
    assert collector.shutdown()
    assert assert_databases_sound(tmp_path) >= 1


# --- 100,000 fuzzed messages -------------------------------------------------------------------


def fuzz_corpus(count: int, seed: int = 0) -> Iterator[bytes]:
    """Fast, reproducible fuzz: a mix of valid messages, field-level and byte-level mutations
    of them, and random bytes (random.Random, not hypothesis: 100,000 must take seconds)."""
    rng = random.Random(seed)
    runs = ["f00000001", "f00000002", "f00000003"]
    values: list[object] = [
        None, True, -1, 0, 2**63, 2**64 - 1, 1.5, math.nan, math.inf, -math.inf, "",
        "../../x", 'x"; DROP TABLE dynamics; --', b"\x00", [], {}, [[1.0]], {"a": {"b": {}}},
    ]  # fmt: skip
    fields = list(_FIELD_NAMES)
    for _ in range(count):
        run = rng.choice(runs)
        kind = rng.random()
        if kind < 0.05:
            base = run_start(run, world_size=rng.choice([1, 1, 2]))
        elif kind < 0.08:
            base = run_end(run, rng.choice(wire.END_STATUSES))
        else:
            base = dynamics(run, rng.randrange(0, 5000, 10), rank=rng.choice([0, 0, 0, 1]))
        how = rng.random()
        if how < 0.35:
            yield wire.encode(base)
        elif how < 0.7:
            for _ in range(rng.randint(1, 3)):
                name = rng.choice(fields)
                if rng.random() < 0.7:
                    base[name] = rng.choice(values)
                else:
                    base.pop(name, None)
            if "metrics" in base and isinstance(base["metrics"], dict) and rng.random() < 0.5:
                table = base["metrics"].get("top_norm")
                if table:
                    table[rng.randrange(len(table))][0] = rng.choice(values)
            yield _pack(base)
        elif how < 0.95:
            data = bytearray(wire.encode(base))
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            yield bytes(data)
        else:
            yield rng.randbytes(rng.randint(0, 300))


@pytest.mark.slow
def test_100000_fuzzed_messages_zero_crashes_zero_corrupt_rows_every_rejection_counted(
    tmp_path: Path, context: zmq.Context
) -> None:
    count = 100_000
    address = "inproc://fuzz100k"
    collector = fast_collector(address, tmp_path, context=context, rank_timeout_s=1.0)
    with running(collector):
        with pusher(context, address) as sock:
            sock.setsockopt(zmq.SNDHWM, 0)  # queue everything: inproc, nothing to lose
            for data in fuzz_corpus(count):
                sock.send(data)
            wait_for(lambda: collector.stats.received == count, timeout=300)

    rejected = sum(collector.stats.rejected.values())
    accepted = count - rejected
    assert set(collector.stats.rejected) <= set(KNOWN_REASONS)
    assert rejected > count // 3 and accepted > count // 4  # both paths were exercised hard
    assert len(collector.stats.rejected) >= 8  # and for many different reasons
    assert assert_databases_sound(tmp_path) >= 3
    stored = sum(len(steps_in(tmp_path, run)) for run in ("f00000001", "f00000002", "f00000003"))
    assert stored > 0
