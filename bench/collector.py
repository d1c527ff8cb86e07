"""Collector benchmark: N sender processes -> collector -> SQLite, against a bare PULL ceiling.

Three phases, side by side in one run, with the same sender processes' code and messages shaped
like the default model's (4 layers x 3 experts, every metric), one run per sender:

1. ceiling:    senders as fast as they can -> a bare PULL socket that only decodes (msgpack);
2. throughput: senders as fast as they can -> the collector -> committed rows in SQLite;
3. latency:    senders paced to a total of --rate messages/s -> the collector; the time from
               publish (the message's own timestamp) to commit, per row.

    .venv/bin/python bench/collector.py [--senders 16] [--messages 100000] [--rate 5000]
                                        [--writer process|inline] [--rounds 3]

Phases 1 and 2 run --rounds times, in alternating order (ceiling first, then the collector
first, ...), so a change in this shared machine's speed between two phases falls on both
sides: each round gives one ratio, and the result is the round of the median ratio, with its
own committed rate and ceiling (every round printed).

Targets (issue 4): >= 20,000 messages/s committed from 16 senders, >= 25 % of the ceiling,
p99 <= 500 ms at 5,000 messages/s. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prismatic import wire  # noqa: E402  (the senders import only this and zmq)

LAYERS, EXPERTS = 4, 3
START_DELAY_S = 5.0  # senders start together this long after launch (imports, connects)


# --- the sender process ------------------------------------------------------------------------


def message(run: str, step: int, rng: random.Random) -> dict:
    metrics: dict[str, list[list[float | None]]] = {m: [] for m in wire.EXPERT_METRICS}
    for _ in range(LAYERS):
        base = rng.uniform(0.5, 2.0)
        metrics["top_norm"].append([base * rng.uniform(0.9, 1.1) for _ in range(EXPERTS)])
        metrics["bottom_norm"].append([base * rng.uniform(0.01, 0.1) for _ in range(EXPERTS)])
        metrics["middle_norm"].append([base * rng.uniform(1.5, 2.5) for _ in range(EXPERTS)])
        metrics["norm"].append([base * rng.uniform(2.0, 3.0) for _ in range(EXPERTS)])
        metrics["divergence"].append([None] + [rng.uniform(0, 0.2) for _ in range(EXPERTS - 1)])
        metrics["weight_drift"].append([None] + [rng.uniform(0, 1) for _ in range(EXPERTS - 1)])
        metrics["routing_weight"].append([1.0 / EXPERTS] * EXPERTS)
        metrics["nonfinite"].append([0.0] * EXPERTS)
    out = wire.header(wire.KIND_DYNAMICS, run, 0, step + 1)
    out.update(step=step, loss=rng.uniform(2, 5), lr=3e-4, metrics=metrics)
    return out


def sender(address: str, run: str, count: int, rate: float, start: float) -> None:
    """Send `count` dynamics messages for `run` from `start` (epoch seconds): as fast as
    possible when rate is 0 (pre-encoded), else paced, each stamped when it is sent."""
    rng = random.Random(run)
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)  # never drop: the benchmark counts every message
    sock.setsockopt(zmq.LINGER, 60_000)
    sock.connect(address)
    templates = [message(run, 0, rng) for _ in range(16)]
    encoded = []
    if not rate:
        for step in range(count):
            templates[step % 16]["step"] = step
            encoded.append(wire.encode(templates[step % 16]))
    time.sleep(max(0.0, start - time.time()))
    if rate:
        began = time.monotonic()
        for step in range(count):
            delay = began + step / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            template = templates[step % 16]
            template.update(step=step, seq=step + 1, ts=time.time())
            sock.send(wire.encode(template))
    else:
        for data in encoded:
            sock.send(data)
    sock.close()
    context.term()


def start_senders(address: str, n: int, per_sender: int, rate: float) -> list[subprocess.Popen]:
    start = time.time() + START_DELAY_S
    procs = []
    for i in range(n):
        run = f"{0xB0000000 + i:09x}"
        command = [sys.executable, __file__, "sender", address, run, str(per_sender)]
        procs.append(subprocess.Popen([*command, str(rate / n), str(start)]))
    return procs


def wait_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.wait(600) != 0:
            raise SystemExit(f"bench: a sender exited with {proc.returncode}")


# --- the receiving side ------------------------------------------------------------------------


def ceiling(n: int, per_sender: int) -> float:
    """Messages/s a bare PULL socket receives and decodes, from the same senders."""
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind("tcp://127.0.0.1:*")
    procs = start_senders(sock.getsockopt_string(zmq.LAST_ENDPOINT), n, per_sender, 0)
    total = n * per_sender
    sock.recv()
    first = time.perf_counter()
    for _ in range(total - 1):
        msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
    elapsed = time.perf_counter() - first
    wait_all(procs)
    sock.close(linger=0)
    context.term()
    return (total - 1) / elapsed


class CommitClock:
    """Collector.on_commit: when each row was committed, and its publish-to-commit time."""

    def __init__(self) -> None:
        self.rows = 0
        self.first: float | None = None
        self.last = 0.0
        self.latencies: list[float] = []

    def __call__(self, run_hash: str, rows: list) -> None:
        now = time.time()
        self.rows += len(rows)
        self.last = time.perf_counter()
        self.latencies += [now - r.sent_ts for r in rows if r.sent_ts is not None]


def through_collector(
    n: int, per_sender: int, rate: float, writer: str = "process"
) -> tuple[float, CommitClock]:
    """(rows committed per second from the first message received, the commit clock)."""
    from collector.service import Collector

    runs_dir = Path(tempfile.mkdtemp(prefix="bench-collector-"))
    collector = Collector("tcp://127.0.0.1:*", runs_dir, stats_interval_s=3600, writer=writer)
    clock = CommitClock()
    collector.on_commit = clock
    first: list[float] = []
    receive = collector.handle_bytes

    def timed(data: bytes) -> bool:
        if not first:
            first.append(time.perf_counter())
        return receive(data)

    collector.handle_bytes = timed  # type: ignore[method-assign]
    thread = threading.Thread(target=collector.run, name="collector")
    thread.start()
    collector.ready.wait(30)
    assert collector.bound_address is not None
    procs = start_senders(collector.bound_address, n, per_sender, rate)
    total = n * per_sender
    while clock.rows < total and thread.is_alive():
        time.sleep(0.01)
    wait_all(procs)
    collector.stop()
    thread.join()
    shutil.rmtree(runs_dir, ignore_errors=True)
    if clock.rows < total:
        raise SystemExit(f"bench: only {clock.rows} of {total} rows were committed")
    return total / (clock.last - first[0]), clock


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--messages", type=int, default=100_000, help="per throughput phase")
    parser.add_argument("--rate", type=float, default=5000.0, help="latency phase, messages/s")
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument(
        "--writer",
        choices=("process", "inline"),
        default="process",
        help="the collector's writer (prismatic collect --writer)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="ceiling/throughput pairs, alternating order"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = args.senders
    per_sender = args.messages // n
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")

    ceilings: list[float] = []
    committed: list[float] = []
    for r in range(args.rounds):
        # Alternate which phase runs first, so a drift in the machine's speed cancels out.
        order = ("ceiling", "collector") if r % 2 == 0 else ("collector", "ceiling")
        for phase in order:
            if phase == "ceiling":
                ceilings.append(ceiling(n, per_sender))
            else:
                committed.append(through_collector(n, per_sender, 0, args.writer)[0])
        print(
            f"round {r + 1}/{args.rounds}: ceiling (bare PULL + msgpack decode) "
            f"{ceilings[-1]:,.0f} msg/s; {n} senders -> collector ({args.writer} writer) -> "
            f"SQLite {committed[-1]:,.0f} msg/s committed ({committed[-1] / ceilings[-1]:.1%})",
            flush=True,
        )
    ratios = [c / x for c, x in zip(committed, ceilings, strict=True)]
    # The round of the median ratio (the lower middle one for an even count): its committed
    # rate, its ceiling and their ratio are quoted together, so the three agree.
    median = sorted(range(len(ratios)), key=ratios.__getitem__)[(len(ratios) - 1) // 2]
    ceiling_rate, committed_rate = ceilings[median], committed[median]
    ratio = committed_rate / ceiling_rate
    print(
        f"throughput: round {median + 1}, the median ratio: {committed_rate:,.0f} msg/s "
        f"committed, ceiling {ceiling_rate:,.0f}, ratio {ratio:.1%} "
        f"(rounds: {', '.join(f'{x:.1%}' for x in ratios)})",
        flush=True,
    )
    paced = int(args.rate * args.latency_seconds) // n
    _, clock = through_collector(n, paced, args.rate, args.writer)
    p50, p99 = percentile(clock.latencies, 0.5), percentile(clock.latencies, 0.99)
    print(
        f"latency at {args.rate:,.0f} msg/s: publish-to-commit p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms over {len(clock.latencies):,} rows",
        flush=True,
    )
    print(
        json.dumps(
            {
                "committed_per_s": round(committed_rate),
                "ceiling_per_s": round(ceiling_rate),
                "ratio_to_ceiling": round(ratio, 3),
                "p50_ms": round(p50 * 1000, 1),
                "p99_ms": round(p99 * 1000, 1),
                "rounds": args.rounds,
                "ratio_per_round": [round(x, 3) for x in ratios],
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sender":
        address, run, count, rate, start = sys.argv[2:7]
        sender(address, run, int(count), float(rate), float(start))
    else:
        main()
