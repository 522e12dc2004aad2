"""Shared plumbing: child processes that never outlive the run, llamaswap itself,
small HTTP helpers, percentiles, and a monitor of CPU used by other processes."""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RUN_ID = f"lsbench-{uuid.uuid4().hex[:10]}"
MARKER_ENV = "LLAMASWAP_BENCH_RUN"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, venv first on PATH, plus the run marker."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env[MARKER_ENV] = RUN_ID
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if extra:
        env.update(extra)
    return env


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- processes ------------------------------------------------------------------


class Procs:
    """Every process the bench starts; ``close`` ends them all (and their groups)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: list[str],
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        stdout: Any = None,
        stderr: Any = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in its own session (so its whole group can be signalled)."""
        log_path = self.workdir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=dict(env) if env is not None else child_env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else out,
            stderr=stderr if stderr is not None else subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        proc.bench_name = name  # type: ignore[attr-defined]
        proc.bench_log = log_path  # type: ignore[attr-defined]
        self.items.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15.0) -> float:
        """SIGTERM the process (its group if it leads one), SIGKILL the group after
        ``grace``; returns the seconds it took to exit."""
        start = time.perf_counter()
        if proc.poll() is None:
            descendants = _descendants(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{getattr(proc, 'bench_name', proc.pid)} ignored SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            _kill_survivors(descendants)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
        if proc in self.items:
            self.items.remove(proc)
        return time.perf_counter() - start

    def stop_named(self, prefix: str) -> None:
        for proc in list(self.items):
            if getattr(proc, "bench_name", "").startswith(prefix):
                self.stop(proc)

    def close(self) -> None:
        for proc in reversed(list(self.items)):
            try:
                self.stop(proc)
            except Exception as e:  # keep going: every child must go
                log(f"stopping {proc.pid} failed: {e}")
        sweep()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _kill_survivors(processes: Iterable[psutil.Process]) -> None:
    procs = list(processes)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running():
                p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def marked_processes() -> list[psutil.Process]:
    """Processes started by this run (they inherit the marker environment variable)."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        with contextlib.suppress(psutil.Error):
            if p.environ().get(MARKER_ENV) == RUN_ID:
                found.append(p)
    return found


def sweep() -> list[str]:
    """Kill (by pid) anything of this run still alive; returns what it found."""
    left = marked_processes()
    names = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
    _kill_survivors(left)
    return names


# --- HTTP --------------------------------------------------------------------------


def http(
    port: int,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    timeout: float = 120.0,
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def health_status(port: int, path: str = "/health") -> int | None:
    """One fast GET on a fresh connection; None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            # a Host llamaswap accepts (its allow-list answers 421 to others)
            host = f"127.0.0.1:{port}"
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64)
        return int(head.split(b" ", 2)[1])
    except (OSError, IndexError, ValueError):
        return None


def wait_http(
    port: int, path: str = "/health", timeout: float = 60.0, interval: float = 0.02
) -> float:
    """Poll until ``path`` answers 200; returns the time it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if health_status(port, path) == 200:
            return time.perf_counter() - start
        time.sleep(interval)
    raise TimeoutError(f"127.0.0.1:{port}{path} did not answer 200 within {timeout:g}s")


# --- llamaswap ------------------------------------------------------------------

NO_LIMIT = 100_000


def _known_keys() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """This llamaswap's top-level and per-model keys (older ones listed them as
    ``TOP_LEVEL_KEYS``/``MODEL_KEYS``; newer ones declare them in ``config.settings``)."""
    from llamaswap import config as ls_config

    top = getattr(ls_config, "TOP_LEVEL_KEYS", None)
    model = getattr(ls_config, "MODEL_KEYS", None)
    if top is None or model is None:
        try:
            from llamaswap.config import settings
        except ImportError:
            return (), ()
        return settings.yaml_names(settings.Top), settings.yaml_names(settings.ModelSettings)
    return tuple(top), tuple(model)


def config_text(head: str, models: Mapping[str, str]) -> str:
    """A llamaswap config: ``head`` (top-level keys) and ``models`` (id → YAML body,
    indented by 4).  Admission limits, where this llamaswap has them
    (``concurrencyLimit`` per model, default 10; ``queueLimit``;
    ``connections.maxPerClient``, default 64), are lifted so the bench measures the
    proxy rather than its 429s and 503s (all its clients share one address)."""
    top, model_keys = _known_keys()
    lines = [head.rstrip("\n")]
    if "queueLimit" in top:
        lines.append(f"queueLimit: {NO_LIMIT}")
    if "connections" in top:
        lines.append(f"connections: {{maxPerClient: {NO_LIMIT}}}")
    lines.append("models:")
    for model_id, body in models.items():
        lines.append(f"  {model_id}:")
        lines.append(body.rstrip("\n"))
        if "concurrencyLimit" in model_keys:
            lines.append(f"    concurrencyLimit: {NO_LIMIT}")
    return "\n".join(lines) + "\n"


def lifted_limits() -> list[str]:
    top, model_keys = _known_keys()
    found = []
    if "queueLimit" in top:
        found.append("queueLimit")
    if "concurrencyLimit" in model_keys:
        found.append("concurrencyLimit")
    if "connections" in top:
        found.append("connections.maxPerClient")
    return found


class Llamaswap:
    """``twistd -n llamaswap`` on a config written to the work dir."""

    def __init__(self, procs: Procs, name: str, config: str) -> None:
        self.procs = procs
        self.name = name
        self.config_path = procs.workdir / f"{name}.yaml"
        self.config_path.write_text(config)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> Llamaswap:
        argv = [
            str(VENV_BIN / "twistd"),
            "-n",
            "--pidfile=",
            "llamaswap",
            "--config",
            str(self.config_path),
            "--listen",
            f"tcp:{self.port}:interface=127.0.0.1",
        ]
        # its state (activity log, saved KV states) in the work dir, not the user's
        state = {"XDG_STATE_HOME": str(self.procs.workdir / f"{self.name}-state")}
        self.proc = self.procs.spawn(argv, self.name, env=child_env({**state, **(env or {})}))
        try:
            wait_http(self.port, "/health", timeout=30)
        except TimeoutError:
            raise RuntimeError(f"llamaswap did not start; see {self.log_path}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.procs.workdir / f"{self.name}.log"

    def running(self) -> list[dict[str, Any]]:
        status, body = http(self.port, "GET", "/running")
        assert status == 200, body
        return list(json.loads(body)["running"])

    def upstream_port(self, model: str) -> int:
        for entry in self.running():
            if entry["model"] == model:
                return int(entry["proxy"].rsplit(":", 1)[1].split("/")[0])
        raise RuntimeError(f"{model} is not running")

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, grace=30)
            self.proc = None


def which(name: str) -> str | None:
    return shutil.which(name)


# --- numbers ---------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0-100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))
    return ordered[min(rank, len(ordered)) - 1]


def hist_percentile(hist: Mapping[int, int], p: float) -> float:
    total = sum(hist.values())
    if not total:
        return float("nan")
    want = max(1, -(-p * total // 100))
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= want:
            return float(value)
    return float(max(hist))


def median(values: list[float]) -> float:
    return percentile(values, 50)


# --- noise -----------------------------------------------------------------------


class CpuMonitor:
    """Samples, every ``interval`` s, the CPU used by this run's processes and by
    everything else on the machine (other users' tests, builds...), plus steal."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float, float, float]] = []  # t, mine, others, steal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._times: dict[int, float] = {}

    def start(self) -> CpuMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _mine(self) -> float:
        # own user+system time only: children's times move into their parent's
        # "children" counters when they exit, which would count them twice
        me = psutil.Process()
        total = 0.0
        seen: dict[int, float] = {}
        for p in [me, *_descendants(me.pid)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                value = t.user + t.system
                seen[p.pid] = value
                if p.pid in self._times:
                    total += max(0.0, value - self._times[p.pid])
                elif time.time() - p.create_time() < 2 * self.interval:
                    total += value  # born since the last sample
        self._times = seen
        return total

    def _run(self) -> None:
        last = psutil.cpu_times()
        self._mine()
        last_t = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = psutil.cpu_times()
            mine = self._mine()
            t = time.perf_counter()
            busy = sum(
                getattr(now, f) - getattr(last, f)
                for f in ("user", "nice", "system", "irq", "softirq")
            )
            steal = getattr(now, "steal", 0.0) - getattr(last, "steal", 0.0)
            dt = t - last_t
            self.samples.append((t, mine / dt, max(0.0, busy - mine) / dt, steal / dt))
            last, last_t = now, t

    def others(self, start: float, end: float) -> tuple[float, float]:
        """Mean cores used by other processes, and steal, between two perf_counter times."""
        window = [s for s in self.samples if start <= s[0] <= end + self.interval]
        if not window:
            return float("nan"), float("nan")
        return (
            sum(s[2] for s in window) / len(window),
            sum(s[3] for s in window) / len(window),
        )

    budget = 120.0  # seconds of waiting for quiet, for the whole run

    def wait_quiet(self, limit: float = 0.25, max_wait: float = 30.0) -> float:
        """Wait (at most ``max_wait`` s, and within the run's budget) until other
        processes use < ``limit`` cores over 2 s; returns their use."""
        start = time.perf_counter()
        while True:
            time.sleep(self.interval * 4.2)
            recent = self.samples[-4:]
            level = sum(s[2] for s in recent) / max(1, len(recent))
            waited = time.perf_counter() - start
            if level < limit or waited > min(max_wait, CpuMonitor.budget):
                CpuMonitor.budget -= waited
                if level >= limit:
                    log(f"other processes still use {level:.2f} cores; going on anyway")
                return level
