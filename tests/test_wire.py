"""The wire format: what `decode` accepts, how it normalises, and the reason it rejects with."""

from __future__ import annotations

import math

import msgpack
import pytest
from collector_support import RUN_A, dynamics, metrics, run_end, run_start

from prismatic import wire
from prismatic.errors import ProtocolError


def _reason(message: object) -> str:
    data = message if isinstance(message, bytes) else msgpack.packb(message, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        wire.decode(data)
    assert info.value.reason in (*wire.REJECT_REASONS,), info.value.reason
    return info.value.reason


def test_each_kind_round_trips_through_encode_and_decode() -> None:
    start = wire.decode(wire.encode(run_start(RUN_A, world_size=2, shards=True)))
    assert (start["kind"], start["world_size"], start["shards"]) == ("run_start", 2, True)
    assert start["config"] == {"name": f"run-{RUN_A}", "model": {"num_experts": 3}}

    step = wire.decode(wire.encode(dynamics(RUN_A, 40, rank=1, val_loss=2.5)))
    assert (step["step"], step["rank"], step["val_loss"], step["nonfinite_values"]) == (
        40,
        1,
        2.5,
        0,
    )
    assert step["metrics"] == metrics(40, rank=1)

    end = wire.decode(wire.encode(run_end(RUN_A, "interrupted", last_step=40)))
    assert (end["status"], end["last_step"], end["sent"]) == ("interrupted", 40, 10)


def test_integer_map_keys_are_accepted() -> None:
    message = run_start(RUN_A)
    message["config"] = {1: "one", "nested": {2: 2.0}}
    decoded = wire.decode(wire.encode(message))
    # Stored as JSON later, so keys become strings here.
    assert decoded["config"] == {"1": "one", "nested": {"2": 2.0}}


def test_design_note_nested_dict_is_accepted_as_one_layer() -> None:
    message = dynamics(RUN_A, 10)
    del message["metrics"]
    message["expert_gradients"] = {
        "expert_0": {"top_norm": 1.0, "bottom_norm": 0.1, "middle_norm": 2.0, "clean_norm": 3.0},
        1: {"top_norm": 1.5, "bottom_norm": 0.4, "middle_norm": 2.0, "perturbed_norm": 3.5},
    }
    message["divergence_scores"] = {"expert_1_divergence": 0.07}
    decoded = wire.decode(wire.encode(message))["metrics"]
    assert decoded["norm"] == [[3.0, 3.5]]
    assert decoded["bottom_norm"] == [[0.1, 0.4]]
    assert decoded["divergence"] == [[None, 0.07]]


@pytest.mark.parametrize(
    "gradients, divergences",
    [
        ({"expert_1": {"top_norm": 1.0}, 1: {"top_norm": 2.0}}, {}),
        ({"expert_1": {"norm": 1.0, "perturbed_norm": 2.0}}, {}),
        ({"expert_1": {"divergence": 0.1}}, {"expert_1_divergence": 0.2}),
    ],
    ids=["expert-key-twice", "norm-and-its-alias", "divergence-twice"],
)
def test_a_value_given_twice_in_the_design_note_form_is_refused(gradients, divergences) -> None:
    message = dynamics(RUN_A, 10)
    del message["metrics"]
    message["expert_gradients"] = gradients
    message["divergence_scores"] = divergences
    with pytest.raises(ProtocolError) as caught:
        wire.decode(wire.encode(message))
    assert caught.value.reason == "bad_field" and "given twice" in caught.value.detail


def test_nan_and_inf_become_none_and_are_counted() -> None:
    message = dynamics(RUN_A, 10, loss=math.nan, lr=math.inf)
    message["metrics"]["top_norm"][0][1] = math.nan
    message["metrics"]["divergence"][2][2] = -math.inf
    decoded = wire.decode(wire.encode(message))
    assert decoded["metrics"]["top_norm"][0][1] is None
    assert decoded["metrics"]["divergence"][2][2] is None
    assert (decoded["loss"], decoded["lr"]) == (None, None)
    assert decoded["nonfinite_values"] == 4


def test_the_fast_path_and_the_slow_path_agree() -> None:
    # Whole numbers sent as msgpack ints take the slow path; the result is the same floats.
    fast = wire.validate_metrics(metrics(3))
    slow_input = {
        name: [[v if v is None or not v.is_integer() else int(v) for v in row] for row in table]
        for name, table in metrics(3).items()
    }
    slow = wire.validate_metrics(slow_input)
    assert slow == fast
    assert all(type(v) is float for t in slow[0].values() for r in t for v in r if v is not None)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "bad_version"),
        ({"v": True}, "bad_version"),
        ({"kind": "drop_table"}, "unknown_kind"),
        ({"run": "../../etc"}, "bad_run_hash"),
        ({"run": "A00000001"}, "bad_run_hash"),
        ({"run": "a00000001\n"}, "bad_run_hash"),
        ({"run": "a0000001"}, "bad_run_hash"),
        ({"run": "a000000012"}, "bad_run_hash"),
        ({"run": "a0000000١"}, "bad_run_hash"),  # an Arabic-Indic digit: \d would take it
        ({"run": 123456789}, "bad_run_hash"),
        ({"rank": -1}, "bad_field"),
        ({"rank": 1.0}, "bad_field"),
        ({"seq": True}, "bad_field"),
        ({"seq": None}, "bad_field"),
        ({"ts": "now"}, "bad_field"),
        ({"ts": math.nan}, "bad_field"),
        ({"ts": 1e30}, "bad_field"),
        ({"step": -1}, "absurd_step"),
        ({"step": 10**13}, "absurd_step"),
        ({"step": 2**64 - 1}, "absurd_step"),
        ({"step": "10"}, "bad_field"),
        ({"step": None}, "bad_field"),
        ({"loss": "low"}, "bad_field"),
        ({"metrics": {}}, "bad_field"),
        ({"metrics": [1, 2]}, "bad_field"),
        ({"metrics": {'top_norm"; DROP TABLE dynamics; --': [[1.0]]}}, "unknown_metric"),
        ({"metrics": {1: [[1.0]]}}, "unknown_metric"),
        ({"metrics": {"top_norm": [[1.0, 2.0], [1.0]]}}, "bad_shape"),
        ({"metrics": {"top_norm": [[1.0]], "norm": [[1.0, 2.0]]}}, "bad_shape"),
        ({"metrics": {"top_norm": [[1.0] * 257]}}, "bad_shape"),
        ({"metrics": {"top_norm": [[1.0]] * 513}}, "bad_shape"),
        ({"metrics": {"top_norm": []}}, "bad_shape"),
        ({"metrics": {"top_norm": [[]]}}, "bad_shape"),
        ({"metrics": {"top_norm": [["1.0"]]}}, "bad_value"),
        ({"metrics": {"top_norm": [[True]]}}, "bad_value"),
        ({"metrics": {"top_norm": [[-1.0]]}}, "bad_value"),
        ({"metrics": {"nonfinite": [[-2]]}}, "bad_value"),
        ({"metrics": {"nonfinite": [[1e300]]}}, "bad_value"),  # not a count SQLite can hold
        ({"metrics": {"nonfinite": [[0.5]]}}, "bad_value"),
    ],
)
def test_malformed_dynamics_are_rejected_with_their_reason(change: dict, reason: str) -> None:
    message = dynamics(RUN_A, 10)
    message.update(change)
    assert _reason(message) == reason


def test_missing_fields_are_rejected() -> None:
    for field in ("v", "kind", "run", "rank", "seq", "step"):
        message = dynamics(RUN_A, 10)
        del message[field]
        assert _reason(message) in ("bad_version", "unknown_kind", "bad_run_hash", "bad_field")
    message = dynamics(RUN_A, 10)
    del message["metrics"]
    assert _reason(message) == "bad_field"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"world_size": 0}, "bad_field"),
        ({"world_size": "2"}, "bad_field"),
        ({"shards": "yes"}, "bad_field"),
        ({"config": "not a map"}, "bad_field"),
        ({"host": 12}, "bad_field"),
        ({"versions": [1]}, "bad_field"),
        ({"config": {"blob": b"\x00\x01"}}, "bad_field"),
    ],
)
def test_malformed_run_start_is_rejected(change: dict, reason: str) -> None:
    message = run_start(RUN_A)
    message.update(change)
    assert _reason(message) == reason


def test_run_end_needs_a_known_status() -> None:
    assert _reason(run_end(RUN_A, status="exploded")) == "bad_field"
    message = run_end(RUN_A)
    message["last_step"] = 10**15
    assert _reason(message) == "absurd_step"


def test_bytes_that_are_not_a_message() -> None:
    assert _reason(b"\xc1") == "bad_msgpack"  # 0xc1 is never used in msgpack
    assert _reason(b"\x92\x01") == "bad_msgpack"  # an array cut short
    assert _reason(b"\xa2\xff\xfe") == "bad_msgpack"  # a string that is not UTF-8
    assert _reason(msgpack.packb([1, 2, 3])) == "not_a_map"
    assert _reason(b"\x91" * 2000 + b"\xc0") == "bad_msgpack"  # nested past msgpack's stack
    assert _reason(b"\x00" * (wire.MAX_MESSAGE_BYTES + 1)) == "oversized"


def test_deep_and_huge_maps_are_rejected() -> None:
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["x"] = {}
        node = node["x"]
    message = run_start(RUN_A)
    message["config"] = deep
    assert _reason(message) == "too_deep"

    message = run_start(RUN_A)
    message["config"] = {str(i): i for i in range(wire.MAX_TREE_NODES + 1)}
    assert _reason(message) == "too_large"


def test_nonfinite_values_in_a_config_become_null() -> None:
    message = run_start(RUN_A)
    message["config"] = {"lr": math.nan, "steps": [1, math.inf]}
    assert wire.decode(wire.encode(message))["config"] == {"lr": None, "steps": [1, None]}


def test_host_and_name_are_cut_to_length() -> None:
    message = run_start(RUN_A)
    message["host"] = "h" * 10_000
    assert len(wire.decode(wire.encode(message))["host"]) == wire.MAX_TEXT
