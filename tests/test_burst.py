"""Bursts (collector/burst.py): checking and averaging many messages at once gives exactly what
one message at a time gives: the same messages, rejections, layer means and stored rows."""

from __future__ import annotations

import copy
import math
import random
import sqlite3
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest
from collector_support import RUN_A, RUN_B, dynamics, metrics, run_start
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.burst import CHUNK, Burst, decode_burst
from collector.service import Collector
from prismatic import wire
from prismatic.aggregate import mean_over_layers
from prismatic.errors import ProtocolError


def _variants(rng: random.Random) -> list[dict[str, Any]]:
    """Plainly valid messages of several shapes, and each kind of trouble the fast path must
    hand over to the one-message checks."""
    out = []
    for step in range(40):
        layers, experts = rng.choice([(4, 3), (4, 3), (1, 1), (9, 2)])
        m = metrics(step, layers, experts)
        out.append(dynamics(RUN_A if step % 2 else RUN_B, step, metrics=m))
    spoilers = [
        lambda t: t["norm"][0].__setitem__(1, math.nan),
        lambda t: t["norm"][0].__setitem__(1, math.inf),
        lambda t: t["top_norm"][1].__setitem__(0, -1.0),
        lambda t: t["divergence"][1].__setitem__(1, -0.5),  # allowed: not range-checked
        lambda t: t["top_norm"][1].__setitem__(0, -0.0),
        lambda t: t["norm"][0].__setitem__(0, 2),  # an int: cleaned to a float
        lambda t: t["norm"][0].__setitem__(0, True),
        lambda t: t["norm"][0].__setitem__(0, "1.0"),
        lambda t: t["nonfinite"][0].__setitem__(0, 3.0),
        lambda t: t["nonfinite"][0].__setitem__(0, 2.5),
        lambda t: t["norm"][0].append(1.0),  # ragged
        lambda t: t["norm"].append([1.0, 1.0, 1.0]),  # more layers than the others
        lambda t: t.__setitem__("bogus", t["norm"]),
        lambda t: t.__setitem__("norm", {"a": 1}),
        lambda t: t["norm"].__setitem__(0, "abc"),
        lambda t: t.pop("divergence"),  # another metric set
        lambda t: [row.__setitem__(0, None) for row in t["top_norm"]],  # no value at all
        lambda t: t["top_norm"][0].__setitem__(0, 1e308) or t["top_norm"][1].__setitem__(0, 1e308),
    ]
    for i, spoil in enumerate(spoilers):
        m = metrics(100 + i)
        spoil(m)
        out.append(dynamics(RUN_A, 100 + i, metrics=m))
    out.append(dynamics(RUN_A, 200, metrics={}))
    out.append(dynamics(RUN_A, 201, metrics=[1, 2]))
    out.append(dynamics(RUN_A, 202, loss=math.nan))
    out.append({**dynamics(RUN_A, 203), "step": -1})
    out.append({**dynamics(RUN_A, 204), "v": 2})
    rng.shuffle(out)
    return out


def _decode_one(data: bytes) -> Any:
    try:
        return wire.decode(data)
    except ProtocolError as exc:
        return exc.reason


def test_a_burst_decodes_as_messages_one_by_one() -> None:
    messages = _variants(random.Random(1))
    datas = [wire.encode(m) for m in messages] + [b"\xc1", b"\x90"]
    burst = decode_burst(datas)
    fast = 0
    for data, result in zip(datas, burst, strict=True):
        expected = _decode_one(data)
        if isinstance(result, ProtocolError):
            assert result.reason == expected
            continue
        message, prepared = result
        assert message == expected
        if prepared is not None:
            fast += 1
            assert prepared.layer_mean == mean_over_layers(expected["metrics"])
            assert _same_floats(prepared.layer_mean, mean_over_layers(expected["metrics"]))
    assert fast >= 20  # the plainly valid, but for some next to trouble


def _same_floats(a: Any, b: Any) -> bool:
    """Equal down to the sign of zero."""
    return repr(a) == repr(b)


def _dump(path: Path) -> tuple[list, list]:
    conn = sqlite3.connect(path)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(dynamics)") if r[1] != "updated"]
        wide = conn.execute(f"SELECT {', '.join(cols)} FROM dynamics ORDER BY step").fetchall()
        layers = conn.execute("SELECT * FROM layer_dynamics ORDER BY step, layer, expert")
        return wide, layers.fetchall()
    finally:
        conn.close()


def _feed(collector: Collector, datas: list[bytes], in_bursts: bool) -> None:
    if not in_bursts:
        for data in datas:
            collector.handle_bytes(data)
        collector.shutdown()
        return
    for start in range(0, len(datas), 700):
        chunk = datas[start : start + 700]
        collector._burst = Burst(chunk)
        for data in chunk:
            collector.handle_bytes(data)
        collector._burst = None
    collector.shutdown()


def test_bursts_store_what_single_messages_store(tmp_path: Path) -> None:
    rng = random.Random(2)
    messages = [run_start(RUN_A), run_start(RUN_B)] + _variants(rng)
    for step in range(1000, 1000 + 2 * CHUNK):  # several chunks of the common case
        messages.append(dynamics(RUN_A, step))
    datas = [wire.encode(m) for m in messages]
    one, many = Collector(runs_dir=tmp_path / "one"), Collector(runs_dir=tmp_path / "many")
    _feed(one, copy.deepcopy(datas), in_bursts=False)
    _feed(many, datas, in_bursts=True)
    assert one.stats.rejected == many.stats.rejected
    assert one.stats.nonfinite_values == many.stats.nonfinite_values
    assert one.stats.received == many.stats.received
    for run in (RUN_A, RUN_B):
        wide, layers = _dump(tmp_path / "one" / run / "dynamics.db")
        assert (wide, layers) == _dump(tmp_path / "many" / run / "dynamics.db")
        assert repr(wide) == repr(_dump(tmp_path / "many" / run / "dynamics.db")[0])
        assert len(layers) > (12 * 2 * CHUNK if run == RUN_A else 0)


def test_a_message_not_of_the_burst_is_decoded_alone() -> None:
    datas = [wire.encode(dynamics(RUN_A, s)) for s in range(3)]
    burst = Burst(datas)
    assert burst.take(wire.encode(dynamics(RUN_A, 9))) is None
    assert burst.take(datas[0]) is not None
    assert burst.take(datas[2]) is None  # out of order


def test_layer_means_of_different_lengths_are_stored_cell_by_cell(tmp_path: Path) -> None:
    from collector.store import RunStore, StepRow

    store = RunStore(tmp_path / RUN_A)
    means = {"top_norm": [1.0, 2.0], "norm": [3.0], "routing_weight": [0.5, 0.25, 0.25]}
    per_layer = {m: [v] for m, v in means.items()}
    store.add_step(StepRow(7, 1.0, None, None, 1, 0.0, 0, means, per_layer))
    store.close()
    conn = sqlite3.connect(tmp_path / RUN_A / "dynamics.db")
    try:
        got = conn.execute(
            "SELECT expert_0_top_norm, expert_1_top_norm, expert_0_clean_norm, "
            "expert_1_perturbed_norm, expert_1_routing_weight FROM dynamics WHERE step=7"
        ).fetchone()
    finally:
        conn.close()
    assert got == (1.0, 2.0, 3.0, None, 0.25)


# --- tier 1: metrics maps read from their bytes (collector/layout.py) ---------------------------


def _trainer_burst(n: int = 24) -> list[bytes]:
    """Messages encoded as the trainer encodes them: one layout for all."""
    return [wire.encode(dynamics(RUN_A, step, spool_offset=step * 1000)) for step in range(n)]


def _assert_decodes_as_alone(datas: list[bytes]) -> int:
    """decode_burst gives what wire.decode gives, message by message; returns how many were
    prepared in a fast path."""
    prepared = 0
    for data, result in zip(datas, decode_burst(datas), strict=True):
        expected = _decode_one(data)
        if isinstance(result, ProtocolError):
            assert result.reason == expected, (data, result)
            continue
        message, ready = result
        assert message == expected
        assert repr(message) == repr(expected)  # the same floats, down to the sign of zero
        if ready is not None:
            prepared += 1
            assert _same_floats(ready.layer_mean, mean_over_layers(expected["metrics"]))
    return prepared


def test_the_trainers_messages_take_tier_1(monkeypatch: Any) -> None:
    import collector.burst as burst

    handed_on: list[int] = []
    objects = burst.decode_objects
    monkeypatch.setattr(
        burst, "decode_objects", lambda datas: handed_on.append(len(datas)) or objects(datas)
    )
    datas = _trainer_burst()
    assert _assert_decodes_as_alone(datas) == len(datas)
    assert sum(handed_on) == 0


def test_tier_1_hands_on_what_it_cannot_take_and_it_decodes_as_alone() -> None:
    datas = _trainer_burst(40)
    odd = [
        dynamics(RUN_A, 1, extra="field"),  # an unknown field
        dynamics(RUN_A, 2, loss=math.nan),
        dynamics(RUN_A, 3, loss=math.inf, val_loss=-math.inf, lr=2),  # counted, cleaned
        dynamics(RUN_A, 4, rank=True),
        dynamics(RUN_A, 5, seq=1.0),
        dynamics(RUN_A, 6, ts=1.0),
        {**dynamics(RUN_A, 7), "run": "ABCDEF012"},
        {**dynamics(RUN_A, 8), "run": "abcdef012\n"},
        {**dynamics(RUN_A, 9), "step": 10**12 + 1},
        dynamics(RUN_A, 10, spool_offset=-1),
        {**dynamics(RUN_A, 11), "kind": "run_end"},
    ]
    datas += [wire.encode(m) for m in odd]
    datas.append(wire.encode(dynamics(RUN_A, 12)) + b"\x00")  # extra bytes
    datas.append(wire.encode(dynamics(RUN_A, 13))[:-3])  # cut short
    float32 = msgpack.packb(dynamics(RUN_A, 14), use_bin_type=True, use_single_float=True)
    datas.append(float32)
    random.Random(3).shuffle(datas)
    assert _assert_decodes_as_alone(datas) >= 40


def _payload_positions(data: bytes) -> list[int]:
    """Where each float64 of the message's metrics map starts (after its marker)."""
    from collector.burst import _header
    from collector.layout import layout_of

    header = _header(data)
    assert header is not None
    raw = bytes(header.metrics)
    layout = layout_of(raw)
    assert layout is not None
    return [data.index(raw) + int(p) for p in layout.payload[:, 0]]


_SPECIAL = [math.nan, -math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e308, 5e-324, 3.0]


@given(
    changes=st.lists(
        st.tuples(
            st.integers(0, 23),  # which message
            st.integers(0, 10_000),  # where (a byte, or a float's slot)
            st.one_of(st.integers(0, 255), st.sampled_from(_SPECIAL)),  # a byte or a float
        ),
        max_size=8,
    )
)
@settings(max_examples=300, deadline=None)
def test_bytes_changed_in_a_burst_decode_as_alone(changes: list[tuple[int, int, Any]]) -> None:
    """Bytes of any message of a one-layout burst changed, or a float's 8 bytes set to a special
    value: every message still decodes exactly as it does alone."""
    datas = [bytearray(d) for d in _trainer_burst()]
    slots = _payload_positions(bytes(datas[0]))
    for which, where, what in changes:
        data = datas[which]
        if isinstance(what, float):
            start = slots[where % len(slots)]
            data[start : start + 8] = struct.pack(">d", what)
        else:
            data[where % len(data)] = what
    _assert_decodes_as_alone([bytes(d) for d in datas])


def test_tier_1_rows_of_ranks_shards_and_wide_tables_store_what_single_messages_store(
    tmp_path: Path,
) -> None:
    """Tier 1 leaves a message's tables as bytes until a rank merge or a table too wide for
    the built records needs them as lists: stored rows are still those of one at a time."""
    run_c = "c00000003"
    messages = [run_start(RUN_A, world_size=2), run_start(RUN_B, world_size=2, shards=True)]
    for step in range(0, 40, 2):
        for rank in (0, 1):
            messages.append(dynamics(RUN_A, step, rank=rank))
            messages.append(dynamics(RUN_B, step, rank=rank))
        messages.append(dynamics(run_c, step, metrics=metrics(step, layers=9, experts=32)))
    datas = [wire.encode(m) for m in messages]
    assert _assert_decodes_as_alone(datas) == len(datas) - 2  # all but the run_starts
    one, many = Collector(runs_dir=tmp_path / "one"), Collector(runs_dir=tmp_path / "many")
    _feed(one, copy.deepcopy(datas), in_bursts=False)
    _feed(many, datas, in_bursts=True)
    assert one.stats.rejected == many.stats.rejected == {}
    for run in (RUN_A, RUN_B, run_c):
        expected = _dump(tmp_path / "one" / run / "dynamics.db")
        assert repr(_dump(tmp_path / "many" / run / "dynamics.db")) == repr(expected)
        assert len(expected[0]) == 20


def test_layer_means_near_the_float64_limit_are_finite_in_both_paths(tmp_path: Path) -> None:
    """Finite values whose sum overflows: the mean is still theirs, never Inf (a norm of
    1.7e308 in every layer averages to 1.7e308), one message at a time and in bursts."""
    big = 1.7e308
    messages: list[dict[str, Any]] = [run_start(RUN_A)]
    for step in range(CHUNK + 2):
        m = dynamics(RUN_A, step)
        m["metrics"]["norm"] = [[big, 1.0, 2.0] for _ in range(4)]
        m["metrics"]["divergence"] = [[None, 1e308, 0.5] for _ in range(4)]
        messages.append(m)
    datas = [wire.encode(m) for m in messages]
    one, many = Collector(runs_dir=tmp_path / "one"), Collector(runs_dir=tmp_path / "many")
    _feed(one, copy.deepcopy(datas), in_bursts=False)
    _feed(many, datas, in_bursts=True)
    for collector in ("one", "many"):
        conn = sqlite3.connect(tmp_path / collector / RUN_A / "dynamics.db")
        rows = conn.execute(
            "SELECT expert_0_clean_norm, expert_1_divergence, expert_2_perturbed_norm FROM dynamics"
        ).fetchall()
        conn.close()
        assert len(rows) == CHUNK + 2
        assert set(rows) == {(big, 1e308, 2.0)}, collector
    assert _dump(tmp_path / "one" / RUN_A / "dynamics.db") == _dump(
        tmp_path / "many" / RUN_A / "dynamics.db"
    )


def test_rank_combining_near_the_float64_limit_stays_finite() -> None:
    from prismatic.aggregate import combine_ranks

    big = 1.5e308
    table = [[big, 3e200]]
    merged, _ = combine_ranks([{"norm": table}, {"norm": table}], shards=False)
    assert merged["norm"] == [[big, 3e200]]
    merged, _ = combine_ranks([{"norm": table}, {"norm": table}], shards=True)
    assert merged["norm"][0][1] == math.hypot(3e200, 3e200)  # squares overflow, hypot does not
    assert merged["norm"][0][0] is None  # the norm of two 1.5e308 is beyond float64: no value
    # shards' divergence recombined from large norms: no product of two norms overflows
    shard = {"norm": [[1e200, 1e200]], "divergence": [[None, 0.5]]}
    merged, _ = combine_ranks([shard, shard], shards=True)
    assert merged["divergence"][0][1] == pytest.approx(0.5)
