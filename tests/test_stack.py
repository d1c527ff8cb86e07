"""docker-compose.yml, the Dockerfile and `prismatic up` describe one topology.

No Docker engine here: the compose file is validated offline against the Compose
Specification's JSON schema (vendored by check-jsonschema as `vendor.compose-spec`), and every
service's command is parsed by the real parsers (`prismatic` and torchrun's).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser as torchrun_parser

from prismatic.cli import build_parser
from prismatic.config import load_config, run_hash
from prismatic.up import STACK_FILE, load_stack, plan_trainers, trainer_command

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CHECK_JSONSCHEMA = Path(sys.executable).parent / "check-jsonschema"
RUNS_VOLUME = "/runs"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the file's `<<: *anchor` merges


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable substitution for the forms this file uses: ${VAR:-default}, $$."""
    env = env or {}

    def value(match: re.Match) -> str:
        return env.get(match["name"]) or match["default"]

    return re.sub(r"\$\{(?P<name>\w+):-(?P<default>[^}]*)\}", value, text).replace("$$", "$")


def service_argv(service: dict, env: dict[str, str] | None = None) -> list[str]:
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    return [interpolate(str(a), env) for a in argv]


def prismatic_args(argv: list[str]) -> list[str]:
    """The `prismatic ...` arguments of a service: plain, or the script torchrun runs."""
    if argv[0] == "prismatic":
        return argv[1:]
    assert argv[0] == "torchrun", f"{argv[0]!r} is neither prismatic nor torchrun"
    launch = torchrun_parser().parse_args(argv[1:])
    assert launch.module and launch.training_script == "prismatic.cli", launch
    return launch.training_script_args


def trainer_services() -> dict[str, dict]:
    return {k: v for k, v in compose()["services"].items() if k.startswith("trainer-")}


# --- the file itself ---------------------------------------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_is_valid_against_the_compose_specification():
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_broken_compose_file(tmp_path):
    """The validator is not a rubber stamp: a misspelt key and a wrong type both fail."""
    broken = compose()
    broken["services"]["collector"]["helthcheck"] = broken["services"]["collector"].pop(
        "healthcheck"
    )
    broken["services"]["dashboard"]["ports"] = "8501"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = check_compose_schema(path)
    assert result.returncode != 0
    assert "helthcheck" in result.stdout + result.stderr


def test_every_service_runs_a_prismatic_command_that_parses_with_an_existing_config():
    parser = build_parser()
    for name, service in compose()["services"].items():
        argv = service_argv(service)
        args = parser.parse_args(prismatic_args(argv))  # exits 2 (SystemExit) if it does not
        if args.command == "train":
            assert (REPO / args.config).is_file(), f"{name}: {args.config} does not exist"
            load_config(REPO / args.config)  # and it is a valid config
        if hasattr(args, "runs_dir"):
            assert args.runs_dir == RUNS_VOLUME, f"{name} writes outside the runs volume"


def test_trainer_services_are_exactly_the_stack_that_prismatic_up_starts():
    stack = load_stack()
    services = trainer_services()
    assert set(services) == {f"trainer-{name}" for name in stack}
    parser = build_parser()
    for name, config in stack.items():
        argv = service_argv(services[f"trainer-{name}"])
        args = parser.parse_args(prismatic_args(argv))
        assert (REPO / args.config).resolve() == config.resolve()


def test_prismatic_up_and_compose_launch_each_stack_config_the_same_way():
    """Same configs, same run hashes, and torchrun with as many ranks as the config's
    train.world_size, both in the compose file and in `prismatic up`'s own commands."""
    services = trainer_services()
    specs = plan_trainers([], [])
    by_config = {spec.config.resolve(): spec for spec in specs}
    for name, service in services.items():
        argv = service_argv(service)
        config = (REPO / build_parser().parse_args(prismatic_args(argv)).config).resolve()
        spec = by_config.pop(config)
        cfg = load_config(config)
        assert spec.label.endswith(run_hash(cfg))
        up_argv = trainer_command(spec, "tcp://127.0.0.1:5557", "build/runs", [])
        if cfg.train.world_size > 1:
            assert argv[0] == "torchrun", name
            compose_ranks = torchrun_parser().parse_args(argv[1:]).nproc_per_node
            up_ranks = up_argv[up_argv.index("--nproc_per_node") + 1]
            assert compose_ranks == up_ranks == str(cfg.train.world_size)
        else:
            assert argv[0] == "prismatic" and "torch.distributed.run" not in up_argv, name
    assert not by_config, f"in {STACK_FILE} but not in docker-compose.yml: {by_config}"


def test_the_stack_has_the_issue_s_trainers():
    configs = [load_config(p) for p in load_stack().values()]
    assert [c.name for c in configs if c.train.world_size == 1] == [
        "dual-sided",
        "control-scale0",
        "top-only",
    ]
    dp = [c for c in configs if c.train.world_size > 1]
    assert len(dp) == 1 and dp[0].train.world_size == 2


def test_trainers_find_the_collector_from_the_environment_and_wait_for_it_to_be_healthy():
    services = compose()["services"]
    bind = build_parser().parse_args(prismatic_args(service_argv(services["collector"]))).bind
    collector_port = bind.rsplit(":", 1)[1]
    assert services["collector"]["healthcheck"]["test"][0] == "CMD"
    for name, service in trainer_services().items():
        assert service["depends_on"] == {"collector": {"condition": "service_healthy"}}, name
        default = build_parser().parse_args(prismatic_args(service_argv(service))).collector
        assert default == f"tcp://collector:{collector_port}", name
        elsewhere = {"PRISMATIC_COLLECTOR": "tcp://10.0.0.5:5557"}
        moved = build_parser().parse_args(prismatic_args(service_argv(service, elsewhere)))
        assert moved.collector == "tcp://10.0.0.5:5557", name


def test_every_service_shares_the_named_runs_volume():
    data = compose()
    assert "runs" in data["volumes"]
    for name, service in data["services"].items():
        assert f"runs:{RUNS_VOLUME}" in service["volumes"], name


def test_restart_policies_are_deliberate():
    services = compose()["services"]
    assert services["collector"]["restart"] == "unless-stopped"
    assert services["dashboard"]["restart"] == "unless-stopped"
    for name, service in trainer_services().items():
        # A finished trainer restarted would train the same run again from step 0.
        assert service["restart"] == "no", name
        assert service["stop_signal"] == "SIGINT", name  # becomes run_end "interrupted"


def test_published_ports_stay_on_the_host_s_loopback():
    services = compose()["services"]
    assert services["dashboard"]["ports"] == ["127.0.0.1:8501:8501"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_collector_healthcheck_passes_against_a_listening_collector(tmp_path):
    """Run the compose healthcheck's own command against a real collector on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = compose()["services"]["collector"]["healthcheck"]["test"]
    assert check[1:3] == ["python", "-c"]
    probe = [sys.executable, "-c", check[3].replace("5557", str(port))]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0  # nobody there
    collector = subprocess.Popen(
        [sys.executable, "-m", "prismatic.cli", "collect", "--bind", f"tcp://127.0.0.1:{port}"]
        + ["--runs-dir", str(tmp_path)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
            assert collector.poll() is None and time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        collector.terminate()
        assert collector.wait(30) == 0


# --- the Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def dockerignore_allows(path: str) -> bool:
    """The .dockerignore rules (last match wins, `!` re-includes) applied to one path."""
    allowed = True
    for rule in (REPO / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        candidates = [str(Path(*parts[: i + 1])) for i in range(len(parts))] + list(parts)
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            allowed = negate
    return allowed


def test_dockerfile_builds_cpu_torch_by_default_with_a_gpu_build_argument():
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for kind, arg in instructions if kind == "ARG")
    assert args["TORCH_VARIANT"] == "cpu"
    torch_install = next(a for k, a in instructions if k == "RUN" and "torch==" in a)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in torch_install
    build_args = compose()["services"]["collector"]["build"]["args"]
    assert interpolate(build_args["TORCH_VARIANT"]) == "cpu"
    assert interpolate(build_args["TORCH_VARIANT"], {"TORCH_VARIANT": "cu126"}) == "cu126"


def test_dockerfile_copies_what_the_services_need_and_the_context_keeps_it():
    copied = []
    for kind, arg in dockerfile_instructions():
        if kind == "COPY":
            *sources, _ = arg.split()
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert dockerignore_allows(source), f"COPY {source}: excluded by .dockerignore"
    for name, service in compose()["services"].items():
        args = build_parser().parse_args(prismatic_args(service_argv(service)))
        if args.command == "train":
            assert any(Path(args.config).is_relative_to(s) for s in copied), name
    for secret in (".venv/bin/python", "build/runs/x/dynamics.db", "keys/collector.key_secret"):
        assert not dockerignore_allows(secret), f"{secret} would be sent to the Docker daemon"


def test_the_image_runs_as_an_unprivileged_user_who_owns_the_runs_folder():
    instructions = dockerfile_instructions()
    users = [arg for kind, arg in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(f"chown {users[-1]}" in arg and RUNS_VOLUME in arg for k, arg in instructions)


# --- beyond one machine ------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free now, all different: each socket is held until every port is picked."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_listening(port: int, collector: subprocess.Popen) -> None:
    """Until the collector accepts connections, so that a trainer does not start first."""
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert collector.poll() is None, "the collector exited"
            assert time.monotonic() < deadline, "the collector never listened"
            time.sleep(0.1)


def stored(path: Path) -> tuple[list[tuple], tuple | None]:
    """(step, ranks_reported) rows and (status, world_size) of a dynamics.db; ([], None)
    while it is not there yet."""
    if not path.is_file():
        return [], None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT step, ranks_reported FROM dynamics ORDER BY step").fetchall()
        return rows, conn.execute("SELECT status, world_size FROM run").fetchone()
    except sqlite3.OperationalError:  # the tables are not there yet
        return [], None
    finally:
        conn.close()


def wait_stored(path: Path, expected: tuple[list[tuple], tuple]) -> None:
    """Up to 60 s for the collector to store `expected`: a trainer that exited has sent its
    messages, but a collector signalled before it read them drops them. (The test's own
    assertions say what is missing if this runs out.)"""
    deadline = time.monotonic() + 60
    while stored(path) != expected and time.monotonic() < deadline:
        time.sleep(0.2)


def non_loopback_ip() -> str | None:
    """This machine's address on its network, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.slow
def test_a_trainer_on_another_host_reaches_a_collector_bound_with_allow_remote(tmp_path):
    """The README's recipe, with this machine's own network address standing in for another
    host: `collect --bind tcp://0.0.0.0:PORT --allow-remote`, `train --collector tcp://IP:PORT`."""
    ip = non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    (port,) = free_ports(1)
    runs = tmp_path / "runs"
    cli = [sys.executable, "-m", "prismatic.cli"]
    overrides = ["model.d_model=32", "model.n_layers=1", "model.seq_len=16"]
    overrides += ["train.batch_size=2", "train.steps=4", "dynamics.log_freq=1"]
    cfg = load_config(REPO / "configs/default.yaml", overrides)
    db = runs / run_hash(cfg) / "dynamics.db"
    collector = subprocess.Popen(
        [*cli, "collect", "--bind", f"tcp://0.0.0.0:{port}", "--allow-remote"]
        + ["--runs-dir", str(runs)],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, collector)
        trainer = subprocess.run(
            [*cli, "train", str(REPO / "configs/default.yaml"), "--collector"]
            + [f"tcp://{ip}:{port}", "--runs-dir", str(tmp_path / "trainer-host")]
            + [a for o in overrides for a in ("--set", o)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert trainer.returncode == 0, trainer.stderr
        wait_stored(db, ([(step, 1) for step in range(4)], ("completed", 1)))
    finally:
        collector.terminate()
        assert collector.wait(30) == 0
    rows, run = stored(db)
    assert [r[0] for r in rows] == [0, 1, 2, 3]
    assert run is not None and run[0] == "completed", run


@pytest.mark.slow
def test_torchrun_across_two_nodes_reports_both_ranks_into_one_run(tmp_path):
    """Two torchrun agents with --nnodes 2 (here both on this machine, each with its own runs
    folder as another host would have) train one data-parallel run; the collector, on its own
    folder, stores every step with both ranks."""
    rendezvous, collector_port = free_ports(2)
    runs = tmp_path / "collector-host"
    cli = [sys.executable, "-m", "prismatic.cli"]
    collector = subprocess.Popen(
        [*cli, "collect", "--bind", f"tcp://127.0.0.1:{collector_port}", "--runs-dir", str(runs)],
        stderr=subprocess.DEVNULL,
    )
    overrides = ["train.world_size=2", "model.d_model=32", "model.n_layers=1"]
    overrides += ["model.seq_len=16", "train.batch_size=2", "train.steps=3", "dynamics.log_freq=1"]
    cfg = load_config(REPO / "configs/default.yaml", overrides)
    db = runs / run_hash(cfg) / "dynamics.db"
    nodes = []
    try:
        wait_listening(collector_port, collector)
        for node_rank in (0, 1):
            launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
            launch += ["--node_rank", str(node_rank), "--nproc_per_node", "1"]
            launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rendezvous}"]
            launch += ["--rdzv-id", "prismatic-test", "-m", "prismatic.cli", "train"]
            launch += [str(REPO / "configs/default.yaml"), "--collector"]
            launch += [f"tcp://127.0.0.1:{collector_port}"]
            launch += ["--runs-dir", str(tmp_path / f"node{node_rank}")]
            launch += [a for o in overrides for a in ("--set", o)]
            nodes.append(
                subprocess.Popen(
                    launch,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
            )
        for node in nodes:
            output = node.communicate(timeout=300)[0]
            assert node.returncode == 0, output[-3000:]
        wait_stored(db, ([(0, 2), (1, 2), (2, 2)], ("completed", 2)))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
        collector.terminate()
        assert collector.wait(30) == 0
    rows, run = stored(db)
    assert rows == [(0, 2), (1, 2), (2, 2)]
    assert run == ("completed", 2)
