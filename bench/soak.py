"""Soak: many senders against one collector for a long time; nothing lost, memory flat.

Starts a real `prismatic collect` process on a free loopback port, then SENDERS publishers (one
per simulated trainer, each its own run, spooling like a trainer does) spread over a few worker
processes. Each sender publishes run_start, then one dynamics message of the default model's
shape (4 Prismatic layers x 3 experts, every metric) per 1/RATE seconds, then run_end.

The default rate, 1 message per second per sender, is `dynamics.log_freq` = 10 at 10 optimizer
steps per second (the default 4-layer d_model=256 model on one GPU). `--rate` raises it to make
a 10-minute soak carry more traffic.

Measured: messages sent, rows stored (read back from every dynamics.db after the collector
stopped), lost = sent - stored, messages the publishers dropped (queue full) and the collector
then replayed from the spools, and the collector's resident memory sampled every second: peak,
after warm-up, at the end, and the slope after warm-up. The last line is one JSON object.

    .venv/bin/python bench/soak.py                      # 32 senders, 600 s, 1 msg/s each
    .venv/bin/python bench/soak.py --duration 60 --rate 5
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import multiprocessing as mp
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prismatic import wire  # noqa: E402

LAYERS, EXPERTS = 4, 3  # configs/default.yaml


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of sending")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="dynamics messages per second per sender"
    )
    parser.add_argument("--workers", type=int, default=4, help="sender processes")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds (default: 10%% of the duration)"
    )
    parser.add_argument("--runs-dir", help="default: a temporary folder, removed afterwards")
    parser.add_argument("--samples", help="write the collector's RSS, one line a second, here")
    parser.add_argument(
        "--memory-breakdown",
        type=int,
        metavar="STEPS",
        help="instead: feed STEPS messages per sender to an in-process collector and print "
        "where its memory goes (SQLite vs Python heap) every 500 steps",
    )
    return parser.parse_args()


def run_hash(sender: int) -> str:
    return hashlib.sha256(f"soak-{sender}".encode()).hexdigest()[:9]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- senders (worker processes) ---------------------------------------------------------------


def metrics(rng: random.Random) -> dict[str, list[list[float]]]:
    """Every metric of every expert in every layer; `nonfinite` is a count (0 in a good run)."""
    return {
        name: [
            [0 if name in wire.COUNT_METRICS else rng.random() for _ in range(EXPERTS)]
            for _ in range(LAYERS)
        ]
        for name in wire.EXPERT_METRICS
    }


def sender_worker(
    senders: list[int], address: str, runs_dir: str, duration: float, rate: float, go, out
) -> None:
    """Publish from `senders` on a shared schedule; put {sender: (sent, dropped)} on `out`.

    Every worker waits at the `go` barrier once its publishers are up, so that all senders
    start together and the soak's clock starts with them, not with the process start-up."""
    from trainer.publisher import Publisher  # imports torch (trainer/__init__): workers only

    rng = random.Random(senders[0])
    pubs = {}
    for sender in senders:
        run = run_hash(sender)
        spool = Path(runs_dir) / run / "spool" / "rank0.msgpack"
        pubs[sender] = Publisher(address, run, 0, spool_path=spool, linger_ms=5000)
        pubs[sender].send(
            wire.KIND_RUN_START,
            name=f"soak-{sender}",
            config={"name": f"soak-{sender}"},
            model={"layers": LAYERS, "experts": EXPERTS, "mixing": "outputs"},
            world_size=1,
            shards=False,
        )

    # Each sender at its own phase, so the load is spread as independent trainers spread it.
    go.wait()
    start = time.monotonic()
    period = 1.0 / rate
    queue = [(start + rng.random() * period, sender, 0) for sender in senders]
    heapq.heapify(queue)
    logged = dict.fromkeys(senders, 0)
    while queue:
        due, sender, step = heapq.heappop(queue)
        if due - start >= duration:
            continue
        time.sleep(max(0.0, due - time.monotonic()))
        pubs[sender].send(wire.KIND_DYNAMICS, step=step, loss=1.0, lr=3e-4, metrics=metrics(rng))
        logged[sender] += 1
        heapq.heappush(queue, (due + period, sender, step + 10))

    result = {}
    for sender, pub in pubs.items():
        pub.send(wire.KIND_RUN_END, status="completed", last_step=(logged[sender] - 1) * 10)
        result[sender] = (logged[sender], pub.dropped)
        pub.close()
    out.put(result)


# --- the collector and its memory ---------------------------------------------------------------


def start_collector(address: str, runs_dir: Path, log_path: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "prismatic.cli", "collect", "--bind", address]
    argv += ["--runs-dir", str(runs_dir), "--stale-after", "3600"]
    log = open(log_path, "w")  # noqa: SIM115 - the child holds it
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while "listening on" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"soak: the collector did not start; see {log_path}")
        time.sleep(0.1)
    return proc


def stored_rows(runs_dir: Path) -> int:
    total = 0
    for path in runs_dir.glob("*/dynamics.db"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            total += conn.execute("SELECT count(*) FROM dynamics").fetchone()[0]
        except sqlite3.OperationalError:
            pass  # tables not created yet
        finally:
            conn.close()
    return total


def memory_summary(
    sending: list[tuple[float, float]], draining: list[tuple[float, float]], warmup: float
) -> dict:
    """Peak over the whole soak; flatness while sending, after warm-up (least-squares slope in
    MB/min and growth). Draining the backlog after the senders stop is reported apart: the
    messages still queued in the collector's socket take memory until they are handled."""
    everything = sending + draining
    after = [(t, mb) for t, mb in sending if t >= warmup] or sending[-1:]
    t0, at_warmup = after[0]
    n = len(after)
    mean_t = sum(t for t, _ in after) / n
    mean_mb = sum(mb for _, mb in after) / n
    var = sum((t - mean_t) ** 2 for t, _ in after)
    slope = sum((t - mean_t) * (mb - mean_mb) for t, mb in after) / var if var else 0.0
    growth = max(mb for _, mb in after) - at_warmup
    return {
        "peak_rss_mb": round(max(mb for _, mb in everything), 1),
        "rss_after_warmup_mb": round(at_warmup, 1),
        "rss_end_of_sending_mb": round(sending[-1][1], 1),
        "growth_after_warmup_mb": round(growth, 1),
        "slope_mb_per_min": round(slope * 60, 3),
        # Flat: after warm-up it grew by less than 5 % (and 10 MB), with no steady climb left.
        "flat": growth < min(10.0, 0.05 * at_warmup) and slope * 60 < 0.5,
        "peak_rss_draining_mb": round(max((mb for _, mb in draining), default=0.0), 1),
    }


def memory_breakdown(senders: int, steps: int, runs_dir: Path) -> dict:
    """Resident memory vs SQLite's own allocations vs the Python heap, as databases grow."""
    import ctypes
    import ctypes.util
    import tracemalloc

    from collector.service import Collector

    sqlite = ctypes.CDLL(ctypes.util.find_library("sqlite3"))
    sqlite.sqlite3_memory_used.restype = ctypes.c_int64
    collector = Collector(runs_dir=runs_dir, writer="inline")  # SQLite's memory in this process
    rng = random.Random(0)
    runs = [run_hash(sender) for sender in range(senders)]
    tracemalloc.start()
    for run in runs:
        start = wire.header(wire.KIND_RUN_START, run, 0, 0)
        collector.handle_bytes(wire.encode({**start, "config": {}, "model": {}, "world_size": 1}))
    row = {}
    for step in range(steps):
        for run in runs:
            message = {**wire.header(wire.KIND_DYNAMICS, run, 0, step + 1), "step": step}
            collector.handle_bytes(wire.encode({**message, "metrics": metrics(rng)}))
        if step % 5 == 4:
            collector.flush()
        if step % 500 == 499 or step == steps - 1:
            row = {
                "step": step + 1,
                "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                "sqlite_mb": round(sqlite.sqlite3_memory_used() / 2**20, 1),
                "python_heap_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 1),
            }
            print(f"soak: breakdown {row}", flush=True)
    collector.shutdown()
    return row


def replayed_messages(log_text: str) -> int:
    return sum(int(n) for n in re.findall(r"gaps: replayed (\d+) messages", log_text))


# --- main ---------------------------------------------------------------------------------------


class CollectorMemory:
    """The collector's resident memory with its writer process's (and any other child's)."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process

    def mb(self) -> float:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / 2**20


def soak(args: argparse.Namespace, runs_dir: Path) -> dict:
    address = f"tcp://127.0.0.1:{free_port()}"
    log_path = runs_dir / "collector.log"
    collector = start_collector(address, runs_dir, log_path)
    rss = CollectorMemory(psutil.Process(collector.pid))
    warmup = args.warmup if args.warmup is not None else 0.1 * args.duration
    print(
        f"soak: {args.senders} senders x {args.rate:g} msg/s for {args.duration:g} s "
        f"-> {address} (collector pid {collector.pid}, warm-up {warmup:g} s)",
        flush=True,
    )

    # Senders, split over worker processes.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    groups = [g for i in range(args.workers) if (g := list(range(args.senders))[i :: args.workers])]
    go = ctx.Barrier(len(groups) + 1)
    workers = [
        ctx.Process(
            target=sender_worker,
            args=(g, address, str(runs_dir), args.duration, args.rate, go, results),
        )
        for g in groups
    ]
    for w in workers:
        w.start()
    go.wait(timeout=300)
    started = time.monotonic()

    # Sample the collector's memory until the senders are done.
    samples: list[tuple[float, float]] = []
    per_sender: dict[int, tuple[int, int]] = {}
    next_report = started + 60
    while len(per_sender) < args.senders:
        samples.append((time.monotonic() - started, rss.mb()))
        while not results.empty():
            per_sender.update(results.get())
        if time.monotonic() >= next_report:
            next_report += 60
            print(
                f"soak: {samples[-1][0]:.0f} s, collector rss (with its writer) "
                f"{samples[-1][1]:.1f} MB, {stored_rows(runs_dir)} rows stored",
                flush=True,
            )
        if not any(w.is_alive() for w in workers) and results.empty():
            break
        time.sleep(1.0)
    for w in workers:
        w.join(30)
    sent = sum(n for n, _ in per_sender.values())
    dropped = sum(d for _, d in per_sender.values())

    # Let the collector store what is in flight (or replay it), then stop it cleanly. Samples
    # past the sending window (publishers closing, backlog) count as draining.
    draining = [(t, mb) for t, mb in samples if t > args.duration]
    samples = [(t, mb) for t, mb in samples if t <= args.duration]
    drain_started = time.monotonic()
    stored, progress_at = stored_rows(runs_dir), time.monotonic()
    while stored < sent and time.monotonic() - progress_at < 30:
        draining.append((time.monotonic() - started, rss.mb()))
        time.sleep(1.0)
        now_stored = stored_rows(runs_dir)
        if now_stored > stored:
            stored, progress_at = now_stored, time.monotonic()
    drain_s = time.monotonic() - drain_started
    collector.send_signal(signal.SIGTERM)
    collector.wait(60)
    stored = stored_rows(runs_dir)
    log_text = log_path.read_text()
    if args.samples:
        lines = [
            f"{t:.1f},{mb:.1f},{'sending' if t <= args.duration else 'draining'}"
            for t, mb in samples + draining
        ]
        Path(args.samples).write_text("t_s,rss_mb,phase\n" + "\n".join(lines) + "\n")
    return {
        "sent": sent,
        "stored": stored,
        "lost": sent - stored,
        **memory_summary(samples, draining, warmup),
        "drain_s": round(drain_s, 1),
        "senders": args.senders,
        "duration_s": args.duration,
        "rate_per_sender": args.rate,
        "dropped_by_senders": dropped,
        "replayed_from_spool": replayed_messages(log_text),
        "collector_errors": log_text.count(" ERROR "),
    }


def main() -> None:
    args = parse_args()
    if args.memory_breakdown:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            row = memory_breakdown(args.senders, args.memory_breakdown, Path(tmp))
        print(json.dumps(row), flush=True)
        return
    if args.runs_dir:
        runs_dir = Path(args.runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        result = soak(args, runs_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            result = soak(args, Path(tmp))
    print(
        f"soak: sent {result['sent']}, stored {result['stored']}, lost {result['lost']}; "
        f"collector rss peak {result['peak_rss_mb']} MB; while sending: after warm-up "
        f"{result['rss_after_warmup_mb']} MB, at the end {result['rss_end_of_sending_mb']} MB "
        f"({result['slope_mb_per_min']:+} MB/min: {'flat' if result['flat'] else 'NOT flat'}); "
        f"{result['drain_s']} s to store the backlog",
        flush=True,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
