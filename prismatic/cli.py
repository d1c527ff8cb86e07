"""The `prismatic` command: train, collect, dashboard, up, keys.

Bad flags and config errors print one line naming the key, the value and what is accepted,
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from prismatic.config import DEFAULT_COLLECTOR, DEFAULT_RUNS_DIR
from prismatic.errors import PrismaticError

log = logging.getLogger("prismatic")
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"prismatic: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted; expected a whole number"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; expected 1 or more")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not accepted; expected a finite number of seconds above 0"
        ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text} is not accepted; expected a finite number of seconds above 0"
        )
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not accepted; expected 1..65535")
    return value


def _add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs-dir",
        default=DEFAULT_RUNS_DIR,
        help=f"where run folders live (default: {DEFAULT_RUNS_DIR})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="prismatic", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train one model and publish its gradient dynamics")
    train.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set train.steps=200",
    )
    train.add_argument(
        "--collector", help=f"collector address (default: the config's, {DEFAULT_COLLECTOR})"
    )
    _add_runs_dir(train)
    train.add_argument(
        "--resume", action="store_true", help="continue this run from its last checkpoint"
    )

    collect = sub.add_parser("collect", help="receive dynamics and write dynamics.db per run")
    collect.add_argument(
        "--bind",
        default=DEFAULT_COLLECTOR,
        help=f"address to listen on (default: {DEFAULT_COLLECTOR})",
    )
    _add_runs_dir(collect)
    collect.add_argument(
        "--stale-after",
        type=_positive_seconds,
        default=120.0,
        metavar="SECONDS",
        help="mark a run stale after this long without a message (default: 120)",
    )
    collect.add_argument(
        "--rank-timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="write a step without its missing ranks after this long (default: 30)",
    )
    collect.add_argument(
        "--writer",
        choices=("process", "inline"),
        default="process",
        help="where SQLite's inserts run: a writer process on another core (default), or "
        "inline in the receiving loop (one core)",
    )
    collect.add_argument(
        "--allow-remote", action="store_true", help="allow binding to a non-loopback address"
    )
    collect.add_argument("--curve-dir", help="folder made by `prismatic keys`: turn on CURVE")
    collect.add_argument(
        "--replay",
        metavar="RUN_DIR",
        nargs="+",
        help="ingest these run folders' spool files, then exit",
    )

    dash = sub.add_parser("dashboard", help="serve the Streamlit dashboard")
    _add_runs_dir(dash)
    dash.add_argument("--port", type=_port, default=8501, help="port to serve on (default: 8501)")
    dash.add_argument(
        "--address", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)"
    )
    dash.add_argument(
        "--allow-remote", action="store_true", help="allow serving on a non-loopback address"
    )

    up = sub.add_parser("up", help="collector + trainers + dashboard as local processes")
    up.add_argument(
        "configs", nargs="*", help="configs to train (default: the stack in configs/stack.yaml)"
    )
    up.add_argument("--steps", type=_positive_int, help="override train.steps for every run")
    _add_runs_dir(up)
    up.add_argument("--port", type=_port, default=8501, help="dashboard port (default: 8501)")
    up.add_argument(
        "--collector-port", type=_port, default=5557, help="collector port (default: 5557)"
    )
    up.add_argument(
        "--resume",
        action="store_true",
        help="continue each run that has a checkpoint from it (the others start at step 0)",
    )
    up.add_argument("--no-dashboard", action="store_true", help="start no dashboard")
    up.add_argument(
        "--keep-dashboard",
        action="store_true",
        help="keep serving the dashboard after the trainers finish (Ctrl-C to stop)",
    )
    up.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key in every run",
    )

    keys = sub.add_parser("keys", help="generate CURVE key files for the collector and trainers")
    keys.add_argument("directory", help="folder for the key files (created if missing)")
    keys.add_argument(
        "--clients",
        nargs="+",
        default=["trainer"],
        help="names of the client key pairs to make (default: trainer)",
    )
    return parser


def _is_loopback(address: str) -> bool:
    import ipaddress

    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host or interface name (127.0.0.1.example.com): could be anything
        return False


def _usable_dir(flag: str, path: str) -> Path:
    """The folder, created if missing; ConfigError (one line, exit 2) if it cannot be."""
    from prismatic.errors import ConfigError

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{flag}: {path!r} is not accepted; cannot create that folder ({exc.strerror})"
        ) from None
    return folder


# `prismatic train`'s exit status per run_end status: a stopped run (Ctrl-C, SIGTERM) exits as
# a shell expects of an interrupted command, after its checkpoint.
EXIT_CODES = {"completed": 0, "failed": 1, "interrupted": 130}


def cmd_train(args: argparse.Namespace) -> int:
    from prismatic.config import check_address, load_config
    from trainer.loop import train

    cfg = load_config(args.config, args.set)
    if args.collector is not None:
        check_address("--collector", args.collector)
    runs_dir = _usable_dir("--runs-dir", args.runs_dir)
    status = train(cfg, runs_dir, args.collector, resume=args.resume)
    return EXIT_CODES[status]


def cmd_collect(args: argparse.Namespace) -> int:
    from collector.service import Collector, serve
    from prismatic.config import check_address
    from prismatic.errors import ConfigError

    runs_dir = _usable_dir("--runs-dir", args.runs_dir)
    if args.replay:
        from collector.replay import replay_dirs

        return 0 if replay_dirs([Path(p) for p in args.replay], runs_dir, args.writer) else 1
    check_address("--bind", args.bind, bind=True)
    if args.bind.startswith("tcp://") and not _is_loopback(args.bind) and not args.allow_remote:
        raise ConfigError(
            f"--bind: {args.bind!r} is not loopback; add --allow-remote to expose "
            "the collector (and see --curve-dir to require keys)"
        )
    curve = None
    if args.curve_dir:
        from collector.curve import ServerCurve

        curve = ServerCurve.from_dir(Path(args.curve_dir))
    collector = Collector(
        args.bind,
        runs_dir,
        rank_timeout_s=args.rank_timeout,
        stale_after_s=args.stale_after,
        curve=curve,
        writer=args.writer,
    )
    # First SIGTERM/SIGINT: stop, flush, commit, exit 0. A second one: exit at once.
    return serve(collector)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from dashboard.serve import serve
    from prismatic.errors import ConfigError

    if not _is_loopback(args.address) and not args.allow_remote:
        raise ConfigError(f"--address: {args.address!r} is not loopback; add --allow-remote")
    _check_host("--address", args.address, args.port)
    return serve(Path(args.runs_dir), args.port, args.address)


def _check_host(flag: str, host: str, port: int) -> None:
    """A host name or address this machine can serve on (Streamlit would fail with a
    traceback after printing the URL)."""
    import socket

    from prismatic.errors import ConfigError

    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ConfigError(
            f"{flag}: {host!r} is not accepted; expected an IP address or a host name that "
            "resolves, e.g. 127.0.0.1"
        ) from None


def cmd_up(args: argparse.Namespace) -> int:
    from prismatic.up import up

    return up(args)


def cmd_keys(args: argparse.Namespace) -> int:
    from prismatic.errors import ConfigError
    from prismatic.keys import generate

    try:
        written = generate(Path(args.directory), args.clients)
    except OSError as exc:
        raise ConfigError(
            f"keys: {args.directory!r} is not accepted; cannot write key files there "
            f"({exc.strerror})"
        ) from None
    for path in written:
        print(path)
    return 0


COMMANDS = {
    "train": cmd_train,
    "collect": cmd_collect,
    "dashboard": cmd_dashboard,
    "up": cmd_up,
    "keys": cmd_keys,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    try:
        return COMMANDS[args.command](args)
    except PrismaticError as exc:
        sys.stderr.write(f"prismatic: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
