"""`prismatic up`: the whole topology as local processes on loopback.

Starts a collector, one trainer per config and the dashboard as child processes, prefixes
their output lines with who said them, and stops them all cleanly on Ctrl-C or SIGTERM.
Exits 0 once every trainer finished and the collector flushed. This is the same topology as
docker-compose.yml, from the same configs (DEFAULT_CONFIGS).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from prismatic.config import load_config, run_hash
from prismatic.errors import ConfigError

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIGS = ("configs/default.yaml", "configs/control-scale0.yaml")


def _resolve_config(text: str) -> Path:
    path = Path(text)
    if not path.is_file() and (REPO / text).is_file():
        path = REPO / text
    if not path.is_file():
        raise ConfigError(f"config: {text!r} is not a file; see the configs/ folder")
    return path


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "prismatic.cli", *args]


class Child:
    def __init__(self, label: str, argv: list[str], quiet: bool = False) -> None:
        self.label = label
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.quiet = quiet
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not self.quiet or "ERROR" in line or "Traceback" in line:
                print(f"[{self.label}] {line.rstrip()}", flush=True)

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def up(args: argparse.Namespace) -> int:
    configs = [_resolve_config(c) for c in (args.configs or DEFAULT_CONFIGS)]
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    # Validate every config before starting anything: errors are one line, exit 2.
    labels = []
    for path in configs:
        cfg = load_config(path, overrides)
        labels.append(f"{cfg.name} {run_hash(cfg)}")
    address = f"tcp://127.0.0.1:{args.collector_port}"
    runs_dir = str(args.runs_dir)

    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame):
        if received:
            os._exit(128 + signum)
        received.append(signum)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    collector = Child(
        "collector", _command("collect", "--bind", address, "--runs-dir", runs_dir), quiet=True
    )
    time.sleep(1.0)
    if collector.proc.poll() is not None:
        print(
            f"prismatic: error: the collector could not start on {address} "
            "(port in use? try --collector-port)",
            file=sys.stderr,
        )
        return 1
    dashboard = None
    if not args.no_dashboard:
        dashboard = Child(
            "dashboard",
            _command("dashboard", "--runs-dir", runs_dir, "--port", str(args.port)),
            quiet=True,
        )
        print(f"dashboard: http://127.0.0.1:{args.port}", flush=True)
    trainers = [
        Child(
            label,
            _command(
                "train",
                str(path),
                "--collector",
                address,
                "--runs-dir",
                runs_dir,
                *[a for o in overrides for a in ("--set", o)],
            ),
        )
        for label, path in zip(labels, configs, strict=True)
    ]
    code = _wait_for_trainers(trainers, stopping)

    # Trainers are done (or stopped): the collector flushes and commits on SIGTERM.
    collector.signal(signal.SIGTERM)
    collector_code = collector.wait(30)
    if dashboard is not None:
        if args.keep_dashboard and not stopping.is_set():
            print(
                f"trainers finished; dashboard still at http://127.0.0.1:{args.port} "
                "(Ctrl-C to stop)",
                flush=True,
            )
            stopping.wait()
        dashboard.signal(signal.SIGTERM)
        dashboard.wait(10)
    print(f"runs in {runs_dir}: " + ", ".join(labels), flush=True)
    if stopping.is_set():
        return 130
    return code or (collector_code or 0)


def _wait_for_trainers(trainers: list[Child], stopping: threading.Event) -> int:
    while any(t.proc.poll() is None for t in trainers):
        if stopping.wait(0.5):
            for t in trainers:
                t.signal(signal.SIGINT)  # the trainer sends run_end "interrupted"
            for t in trainers:
                t.wait(30)
            break
    failed = [t.label for t in trainers if t.proc.returncode not in (0, None)]
    if failed and not stopping.is_set():
        print(f"prismatic: trainers failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
