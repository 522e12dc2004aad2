"""Starting a real ``twistd -n llamaswap``, the way users do, for the end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_twistd(
    config: Path | str, port: int, output: IO[str] | int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``twistd -n llamaswap --config CONFIG`` on ``127.0.0.1:port``, with this venv first
    on PATH (so ``python`` in configs is this one)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    listen = f"tcp:{port}:interface=127.0.0.1"
    return subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "llamaswap", "--config", str(config), "--listen", listen],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
