"""`prismatic up`: the whole topology as local processes on loopback.

Starts a collector, one trainer per config (torchrun for a config with train.world_size above
1) and the dashboard, each as a child process in its own process group, prefixes their output
lines with who said them, and stops them all on Ctrl-C, SIGTERM or SIGHUP: trainers first (they
send `run_end`), then the collector (it flushes and commits), then the dashboard. Exits 0 once
every trainer finished, the collector flushed, and every trainer's spool was ingested (a last
replay catches messages still queued when a trainer exited).

With no configs it starts the stack listed in configs/stack.yaml, the same list that
docker-compose.yml runs (tests/test_stack.py keeps the two in step).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from prismatic import db
from prismatic.config import load_config, load_yaml_file, run_hash
from prismatic.errors import ConfigError

log = logging.getLogger(__name__)
_ALWAYS_SHOWN = ("listening on", "WARNING", "ERROR", "Traceback")
REPO = Path(__file__).resolve().parent.parent
STACK_FILE = "configs/stack.yaml"
COLLECTOR_READY_S = 60.0
TRAINER_STOP_S = 30.0
COLLECTOR_STOP_S = 30.0
DASHBOARD_STOP_S = 10.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class TrainerSpec:
    """One trainer of the topology: its config file and how many ranks it runs."""

    label: str
    config: Path
    world_size: int
    run_hash: str


def resolve_path(text: str | Path) -> Path:
    """A path as given, or else relative to the repository (so `up` works from any folder)."""
    path = Path(text)
    if not path.exists() and not path.is_absolute() and (REPO / path).exists():
        path = REPO / path
    return path


def load_stack(path: str | Path = STACK_FILE) -> dict[str, Path]:
    """configs/stack.yaml as {name: config path}, in file order."""
    stack_path = resolve_path(path)
    if not stack_path.is_file():
        raise ConfigError(f"stack: {str(path)!r} is not a file; pass configs to `prismatic up`")
    data = load_yaml_file(stack_path, "stack") or {}
    trainers = data.get("trainers") if isinstance(data, dict) else None
    if not isinstance(trainers, dict) or not trainers:
        raise ConfigError(f"stack: {stack_path} needs a non-empty `trainers:` map of name: config")
    return {str(name): resolve_path(str(config)) for name, config in trainers.items()}


def plan_trainers(configs: list[str], overrides: list[str]) -> list[TrainerSpec]:
    """Validate every config (with the overrides) before anything starts: errors exit 2."""
    paths = [resolve_path(c) for c in configs] if configs else list(load_stack().values())
    specs = []
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"config: {str(path)!r} is not a file; see the configs/ folder")
        cfg = load_config(path, overrides)
        digest = run_hash(cfg)
        specs.append(TrainerSpec(f"{cfg.name} {digest}", path, cfg.train.world_size, digest))
    return specs


def _prismatic(*args: str) -> list[str]:
    return [sys.executable, "-m", "prismatic.cli", *args]


def trainer_command(
    spec: TrainerSpec, address: str, runs_dir: str, overrides: list[str], resume: bool = False
) -> list[str]:
    train_args = ["train", str(spec.config), "--collector", address, "--runs-dir", runs_dir]
    train_args += [a for o in overrides for a in ("--set", o)]
    if resume:
        train_args.append("--resume")
    if spec.world_size == 1:
        return _prismatic(*train_args)
    # --standalone: a private rendezvous on a free port, so several torchrun runs can coexist.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*launcher, "--nproc_per_node", str(spec.world_size), "-m", "prismatic.cli", *train_args]


def has_checkpoint(runs_dir: str, spec: TrainerSpec) -> bool:
    return (Path(runs_dir) / spec.run_hash / db.CHECKPOINT_NAME).is_file()


def _env(spec: TrainerSpec) -> dict[str, str]:
    # torchrun sets this to 1 anyway, with a banner; setting it ourselves keeps the log quiet.
    if spec.world_size == 1:
        return {}
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Child:
    """A child process in its own process group (signals reach its own children too)."""

    def __init__(
        self, label: str, argv: list[str], quiet: bool = False, env: dict[str, str] | None = None
    ) -> None:
        self.label = label
        self.quiet = quiet
        self.stopping = False
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # A new session: Ctrl-C in the terminal reaches only `up`, which stops children in order.
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.stopping:
                # torchrun answers a stop signal with a traceback of its own: keep only errors.
                show = "ERROR" in line
            else:
                # Quiet children (collector, dashboard) still show where they listen, and every
                # warning or error: a rejected message, a database that cannot be written.
                show = not self.quiet or any(word in line for word in _ALWAYS_SHOWN)
            if show:
                print(f"[{self.label}] {line.rstrip()}", flush=True)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int, group: bool = True) -> None:
        """Signal the whole process group (torchrun's ranks, Streamlit's server), or with
        group=False only the leader (torchrun forwards a signal to its ranks itself)."""
        try:
            if group:
                os.killpg(self.proc.pid, signum)
            elif self.running:
                self.proc.send_signal(signum)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> int:
        """Wait for the child; past `timeout`, SIGKILL its process group."""
        try:
            code = self.proc.wait(max(timeout, 0.0))
        except subprocess.TimeoutExpired:
            log.warning("up: %s did not stop within %.0fs; killing it", self.label, timeout)
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        # Ranks or servers the leader left behind go with it.
        self.signal(signal.SIGKILL)
        self.thread.join(timeout=2.0)
        return code


class Stopper:
    """First stop signal: stop in order. A second one: SIGKILL every child and exit at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum = 0
        self.children: list[Child] = []

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.event.is_set():
            for child in self.children:
                child.signal(signal.SIGKILL)
            os._exit(128 + signum)
        self.signum = signum
        self.event.set()


def up(args: argparse.Namespace) -> int:
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
    specs = plan_trainers(list(args.configs), overrides)
    _check_ports(args)
    stopper = Stopper()
    stopper.install()
    try:
        return _run(args, specs, overrides, stopper)
    finally:
        # Whatever happened above, no child outlives `up`.
        for child in stopper.children:
            child.signal(signal.SIGKILL)


def _run(
    args: argparse.Namespace, specs: list[TrainerSpec], overrides: list[str], stopper: Stopper
) -> int:
    address = f"tcp://127.0.0.1:{args.collector_port}"
    runs_dir = str(args.runs_dir)
    children = stopper.children

    # The collector first: trainers would spool and retry without it, but the run is cleaner.
    collect_args = ["collect", "--bind", address, "--runs-dir", runs_dir]
    collector = Child("collector", _prismatic(*collect_args), quiet=True)
    children.append(collector)
    if not _wait_until_listening(collector, args.collector_port, stopper.event):
        collector.wait(0)
        if stopper.event.is_set():
            return 128 + stopper.signum
        print(f"prismatic: error: the collector did not start on {address}", file=sys.stderr)
        return 1

    # The dashboard, then one trainer (or one torchrun) per config.
    dashboard = None
    if not args.no_dashboard:
        dash_args = ["dashboard", "--runs-dir", runs_dir, "--port", str(args.port)]
        dashboard = Child("dashboard", _prismatic(*dash_args), quiet=True)
        children.append(dashboard)
        print(f"dashboard: http://127.0.0.1:{args.port}", flush=True)
    trainers = []
    for spec in specs:
        resume = args.resume and has_checkpoint(runs_dir, spec)
        if args.resume and not resume:
            print(f"[{spec.label}] no checkpoint to resume from: starting at step 0", flush=True)
        command = trainer_command(spec, address, runs_dir, overrides, resume)
        trainers.append(Child(spec.label, command, env=_env(spec)))
    children.extend(trainers)
    trainers_code = _wait_for_trainers(trainers, stopper.event)

    # Trainers are done (or stopped): the collector flushes and commits on SIGTERM.
    collector.signal(signal.SIGTERM)
    collector_code = collector.wait(COLLECTOR_STOP_S)
    if collector_code == 0 and not stopper.event.is_set():
        collector_code = _replay_spools(specs, runs_dir, children)
    if dashboard is not None:
        if args.keep_dashboard and not stopper.event.is_set():
            print(
                f"trainers finished; dashboard still at http://127.0.0.1:{args.port} "
                "(Ctrl-C to stop)",
                flush=True,
            )
            stopper.event.wait()
        dashboard.signal(signal.SIGTERM)
        dashboard.wait(DASHBOARD_STOP_S)
    print(f"runs in {runs_dir}: " + ", ".join(s.label for s in specs), flush=True)
    print(f"to look at them: prismatic dashboard --runs-dir {runs_dir}", flush=True)
    if stopper.event.is_set():
        return 128 + stopper.signum
    if collector_code != 0:
        print(f"prismatic: the collector exited with code {collector_code}", file=sys.stderr)
    return trainers_code or (1 if collector_code else 0)


def _replay_spools(specs: list[TrainerSpec], runs_dir: str, children: list[Child]) -> int:
    """Ingest what the collector missed at the very end: a trainer's last messages (run_end
    among them) that did not leave its queue before it exited. The collector would replay them
    itself a few seconds later, but it has just been stopped. Idempotent: a step is stored once.
    """
    run_dirs = [str(Path(runs_dir) / s.run_hash) for s in specs]
    run_dirs = [d for d in run_dirs if (Path(d) / "spool").is_dir()]
    if not run_dirs:
        return 0
    replay_args = ["collect", "--runs-dir", runs_dir, "--replay", *run_dirs]
    replay = Child("replay", _prismatic(*replay_args), quiet=True)
    children.append(replay)
    return replay.wait(COLLECTOR_STOP_S)


def _check_ports(args: argparse.Namespace) -> None:
    ports = [("--collector-port", args.collector_port)]
    if not args.no_dashboard:
        ports.append(("--port", args.port))
    for flag, port in ports:
        if not port_is_free(port):
            raise ConfigError(f"{flag}: {port} is in use on 127.0.0.1; pick another port")


def _wait_until_listening(collector: Child, port: int, stopping: threading.Event) -> bool:
    """True once the collector accepts TCP connections; False if it exited or we were told to
    stop first."""
    deadline = time.monotonic() + COLLECTOR_READY_S
    while time.monotonic() < deadline and collector.running and not stopping.is_set():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            stopping.wait(0.1)
    return False


def _wait_for_trainers(trainers: list[Child], stopping: threading.Event) -> int:
    while any(t.running for t in trainers):
        if stopping.wait(0.2):
            for t in trainers:
                t.stopping = True
                # Each rank sends run_end "interrupted". Only the leader: a rank signalled twice
                # (by us and by torchrun) could be interrupted while it sends run_end.
                t.signal(signal.SIGINT, group=False)
            break
    deadline = time.monotonic() + TRAINER_STOP_S
    codes = [t.wait(deadline - time.monotonic()) for t in trainers]
    failed = [t.label for t, code in zip(trainers, codes, strict=True) if code != 0]
    if failed and not stopping.is_set():
        print(f"prismatic: trainers failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
