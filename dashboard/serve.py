"""`prismatic dashboard`: run the Streamlit server on the app in this folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent / "app.py"
RUNS_DIR_ENV = "PRISMATIC_RUNS_DIR"


def streamlit_command(port: int, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        "true",
        "--server.runOnSave",
        "false",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--theme.base",
        "light",
    ]


def serve(runs_dir: Path, port: int, address: str = "127.0.0.1") -> int:
    """Run the Streamlit server as a child until it exits; SIGTERM or Ctrl-C stop it first, so
    no server outlives `prismatic dashboard`."""
    env = {**os.environ, RUNS_DIR_ENV: str(Path(runs_dir).resolve())}
    print(f"dashboard: http://{address}:{port} (runs folder {runs_dir})", flush=True)
    proc = subprocess.Popen(streamlit_command(port, address), env=env)

    def stop(signum: int, frame: object) -> None:
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
