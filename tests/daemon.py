"""Starting a real ``twistd -n llamaswap``, the way users do, for the end-to-end tests."""

from __future__ import annotations

import os
import resource
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
    config: Path | str,
    port: int,
    output: IO[str] | int = subprocess.DEVNULL,
    file_limit: int | None = None,
) -> subprocess.Popen[bytes]:
    """``twistd -n llamaswap --config CONFIG`` on ``127.0.0.1:port``, with this venv first
    on PATH (so ``python`` in configs is this one); ``file_limit`` sets its
    ``RLIMIT_NOFILE`` (soft and hard)."""

    def limit_files() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    listen = f"tcp:{port}:interface=127.0.0.1"
    return subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "llamaswap", "--config", str(config), "--listen", listen],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_files if file_limit is not None else None,
    )
