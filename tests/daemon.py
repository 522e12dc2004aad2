"""Starting a real ``twistd -n llamaswap``, the way users do, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from . import STATE_HOME

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def daemon_env(**extra: str) -> dict[str, str]:
    """The environment of a daemon under test: this venv first on PATH (so ``python``
    in configs is this one) and a state directory of its own (not another test's)."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "XDG_STATE_HOME": tempfile.mkdtemp(dir=STATE_HOME),
        **extra,
    }


def start_twistd(
    config: Path | str,
    port: int,
    output: IO[str] | int = subprocess.DEVNULL,
    file_limit: int | None = None,
) -> subprocess.Popen[bytes]:
    """``twistd -n llamaswap --config CONFIG`` on ``127.0.0.1:port``, in
    :func:`daemon_env`; ``file_limit`` sets its ``RLIMIT_NOFILE`` (soft and hard)."""

    def limit_files() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (file_limit, file_limit))

    env = daemon_env()
    listen = f"tcp:{port}:interface=127.0.0.1"
    return subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "llamaswap", "--config", str(config), "--listen", listen],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        preexec_fn=limit_files if file_limit is not None else None,
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Daemon:
    """``twistd -n llamaswap`` on a free loopback port, its output in ``log``, up and
    answering ``/health`` once built."""

    def __init__(self, config: Path, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115
        self.process = start_twistd(config, self.port, self.log)
        deadline = time.monotonic() + 20
        while not self.up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"llamaswap did not come up:\n{self.tail()}")
            time.sleep(0.05)

    def tail(self, lines: int = 60) -> str:
        """The end of its log (shown with a failed test: CI keeps no artifacts)."""
        self.log.flush()
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=30) as answer:
            return json.load(answer)

    def post(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.load(answer)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
