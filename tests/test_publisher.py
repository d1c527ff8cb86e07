"""The publisher: every message spooled then queued without blocking, and a message over the
wire format's size limit neither spooled nor sent."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from trainer_support import Inbox

from collector.replay import read_spool
from prismatic import wire
from trainer.publisher import Publisher

RUN = "abcdef012"


def _metrics(layers: int, experts: int) -> dict[str, list[list[float]]]:
    """Every metric, float64 values as the probe sends them (counts whole)."""
    tables = {
        name: [
            [0.5 + layer + expert / 1000 for expert in range(experts)] for layer in range(layers)
        ]
        for name in wire.EXPERT_METRICS
    }
    tables["nonfinite"] = [[0.0] * experts for _ in range(layers)]
    return tables


def test_the_largest_model_the_wire_format_takes_fits_its_size_limit() -> None:
    message = wire.header(wire.KIND_DYNAMICS, RUN, 0, 1) | {
        "step": 1,
        "loss": 1.0,
        "metrics": _metrics(wire.MAX_LAYERS, wire.MAX_EXPERTS),
    }
    assert len(wire.encode(message)) <= wire.MAX_MESSAGE_BYTES


def test_an_oversized_message_is_neither_spooled_nor_sent_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="trainer.publisher")
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 4096)  # a small limit, a small test
    spool = tmp_path / "rank0.msgpack"
    with Inbox() as inbox:
        publisher = Publisher(inbox.address, RUN, spool_path=str(spool))  # a str, as in the README
        assert publisher.send("dynamics", step=0, loss=1.0, metrics=_metrics(4, 3))
        for step in (10, 20):
            assert not publisher.send("dynamics", step=step, loss=1.0, metrics=_metrics(64, 8))
        assert publisher.send("run_end", status="completed")
        publisher.close()
        received = inbox.receive()
    assert [(m["kind"], m.get("step")) for m in received] == [("dynamics", 0), ("run_end", None)]
    assert [raw["kind"] for raw, _ in read_spool(spool)] == ["dynamics", "run_end"]
    assert (publisher.sent, publisher.dropped, publisher.oversized) == (2, 2, 2)
    over = [r.getMessage() for r in caplog.records if "over the wire format" in r.getMessage()]
    assert len(over) == 1 and "4096-byte limit" in over[0], over
    assert any(
        "2 messages over 4096 bytes were neither sent nor spooled" in r.getMessage()
        for r in caplog.records
    )
