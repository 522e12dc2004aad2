"""3. Swaps: alternate A/B requests (max_tokens 1) on real llama-server.

Three ways to get the answer of a model that is not loaded, interleaved round by
round so background noise hits all of them alike:

* llamaswap with two model ids (same GGUF, different --ctx-size), one at a time;
* llama.cpp router mode (``--models-dir`` with two names for the GGUF,
  ``--models-max 1``, the same per-model arguments in a preset);
* by hand: stop the old llama-server, spawn the new one, poll /health every 2 ms,
  ask, i.e. the floor any supervisor can reach.

The readiness lag is measured on the child's own clock, in rounds of their own
after the swap rounds: llamaswap and router mode take turns swapping, every child
running with ``readylag.c`` preloaded (the router's children inherit it from the
router).  The shim stamps, inside the child, the entry of its ``fprintf`` of
``cmd_child_to_router:state:{"state":"ready",...}`` and the entry of the ``recv``
that reads the waiting ``POST /v1/chat/completions``: the supervisor reading the
line, marking the model ready and relaying the request, and the child's thread
waking for it.  Nothing is stopped to take the stamps (strace, used before, stops
the child at every traced call and stamps it when it gets round to it).

A secondary, coarse figure comes from llamaswap's live log stream, read in
``BREAKDOWN_SWAPS`` swaps after the timed ones (a reader of the log is work
router mode does not have, so the timed swaps go without one): the time
between the child's "listening on http" line and llamaswap's "model X ready"
line (both read from one /logs/stream connection).  It is 0 when both arrive
in one read; else it holds the child's own 0.2-3.3 ms from that line to
``ready`` (llamaswap logs its line after relaying the waiting request).
"""

from __future__ import annotations

import http.client as httpclient
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .common import (
    CpuMonitor,
    Llamaswap,
    Procs,
    child_env,
    config_text,
    free_port,
    health_status,
    http,
    log,
    median,
    percentile,
    wait_http,
    which,
)
from .proxy import free_port_base

MODELS = {
    "bench-a": ["--ctx-size", "2048", "--parallel", "2"],
    "bench-b": ["--ctx-size", "1024", "--parallel", "1"],
}
COMMON_ARGS = ["--threads", "2", "--no-webui"]

CONFIG_MODEL = """\
    cmd: >-
      {wrapper}"${{env.LLAMA_SERVER}}" --host 127.0.0.1 --port ${{PORT}}
      -m "${{env.LLAMASWAP_MODEL}}" {args}"""


def request(model: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "max_tokens": 1,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Say hi."}],
        }
    ).encode()


_clients: dict[int, httpclient.HTTPConnection] = {}


def ask(port: int, model: str) -> None:
    """One request, on the keep-alive connection this client keeps per server (as the
    openai SDK and other clients do; a server that closed it gets a new one)."""
    for attempt in (1, 2):
        conn = _clients.get(port)
        if conn is None:
            conn = _clients[port] = httpclient.HTTPConnection("127.0.0.1", port, timeout=180)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=request(model),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            status, reply = response.status, response.read()
        except (OSError, httpclient.HTTPException):
            conn.close()
            del _clients[port]
            if attempt == 2:
                raise
            continue  # the server had closed the kept connection before this request
        if response.will_close:
            conn.close()
            del _clients[port]
        if status != 200:
            raise RuntimeError(f"{model} on :{port}: HTTP {status} {reply[:300]!r}")
        return


class LogStream(threading.Thread):
    """Reads llamaswap's /logs/stream and stamps each line on arrival."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.lines: list[tuple[float, str]] = []
        self.conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=None)

    def run(self) -> None:
        try:
            self.conn.request("GET", "/logs/stream?no-history")
            response = self.conn.getresponse()
            while True:
                line = response.readline()
                if not line:
                    return
                self.lines.append((time.perf_counter(), line.decode(errors="replace").rstrip("\n")))
        except (OSError, httpclient.HTTPException, AttributeError, ValueError):
            return

    def close(self) -> None:
        try:
            if self.conn.sock is not None:
                self.conn.sock.shutdown(2)
        except OSError:
            pass
        self.conn.close()

    def first(self, start: float, end: float, pattern: str) -> tuple[float, str] | None:
        regex = re.compile(pattern)
        for t, line in self.lines:
            if start <= t <= end and regex.search(line):
                return t, line
        return None


class Direct:
    """llama-server by hand: stop the old one, spawn, poll /health every 2 ms, ask."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.proc: Any = None

    def swap_to(self, model: str) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.proc is not None:
            self.procs.stop(self.proc)
        t1 = time.perf_counter()
        port = free_port()
        argv = [
            os.environ["LLAMA_SERVER"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-m",
            os.environ["LLAMASWAP_MODEL"],
            *COMMON_ARGS,
            *MODELS[model],
        ]
        self.proc = self.procs.spawn(argv, "direct-llama-server")
        while health_status(port) != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            time.sleep(0.002)
        t2 = time.perf_counter()
        ask(port, model)
        t3 = time.perf_counter()
        return {"total": t3 - t0, "stop": t1 - t0, "start_ready": t2 - t1, "answer": t3 - t2}

    def close(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None


def start_router(
    procs: Procs, label: str = "router", env: dict[str, str] | None = None
) -> tuple[int, list[str], Any]:
    """llama.cpp's router mode (``env``: added to its environment)."""
    directory = procs.workdir / label
    models = directory / "models"
    models.mkdir(parents=True, exist_ok=True)
    preset = ["version = 1"]
    for name, args in MODELS.items():
        link = models / f"{name}.gguf"
        if not link.exists():
            link.symlink_to(os.environ["LLAMASWAP_MODEL"])
        preset.append(f"[{name}]")
        preset.extend(f"{args[i].lstrip('-')} = {args[i + 1]}" for i in range(0, len(args), 2))
    (directory / "preset.ini").write_text("\n".join(preset) + "\n")
    port = free_port()
    argv = [
        os.environ["LLAMA_SERVER"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--models-dir",
        str(models),
        "--models-preset",
        str(directory / "preset.ini"),
        "--models-max",
        "1",
        *COMMON_ARGS,
    ]
    proc = procs.spawn(argv, label, env=child_env(env))
    wait_http(port, "/health", timeout=30)
    status, body = http(port, "GET", "/v1/models")
    ids = [m["id"] for m in json.loads(body)["data"]] if status == 200 else []
    missing = [m for m in MODELS if m not in ids]
    if missing:
        raise RuntimeError(f"router mode lists {ids}, not {missing}")
    return port, ids, proc


BREAKDOWN_SWAPS = 8
"""Swaps through llamaswap read from its live log, after the timed ones."""


def run(
    procs: Procs,
    monitor: CpuMonitor,
    *,
    swaps: int = 10,
    lag_swaps: int = 20,
    profile: Any = None,
) -> dict[str, Any]:
    config = config_text(
        f"healthCheckTimeout: 120\nstartPort: {free_port_base() + 200}\n",
        {
            name: CONFIG_MODEL.format(wrapper="", args=" ".join(COMMON_ARGS + args))
            for name, args in MODELS.items()
        },
    )
    swap = Llamaswap(procs, "llamaswap-swap", config).start()
    # the live log is read in rounds of its own: during the timed swaps it would add
    # llamaswap's work for a reader router mode does not have
    stream = LogStream(swap.port)
    router_port, router_ids, router = start_router(procs)
    direct = Direct(procs)
    ls_proc = psutil.Process(swap.pid)

    names = list(MODELS)
    times: dict[str, list[float]] = {"llamaswap": [], "router": [], "direct": []}
    cold: dict[str, float] = {}
    direct_parts: list[dict[str, float]] = []
    details: list[dict[str, float]] = []
    ls_cpu = 0.0
    monitor.wait_quiet()
    start_all = time.perf_counter()
    try:
        for i in range(swaps + 1):  # round 0 starts from nothing: a cold start, not a swap
            model = names[i % 2]
            order = ["llamaswap", "router", "direct"]
            order = order[i % 3 :] + order[: i % 3]
            for mode in order:
                if mode == "llamaswap":
                    cpu0 = sum(ls_proc.cpu_times()[:2])
                    t_req = time.perf_counter()
                    ask(swap.port, model)
                    elapsed = time.perf_counter() - t_req
                    if i:
                        ls_cpu += sum(ls_proc.cpu_times()[:2]) - cpu0
                elif mode == "router":
                    t_req = time.perf_counter()
                    ask(router_port, model)
                    elapsed = time.perf_counter() - t_req
                else:
                    parts = direct.swap_to(model)
                    elapsed = parts["total"]
                    if i:
                        direct_parts.append(parts)
                if i == 0:
                    cold[mode] = elapsed
                else:
                    times[mode].append(elapsed)
            log(
                f"  swap {i:>2} -> {model}: "
                + "  ".join(f"{m} {times[m][-1] * 1000:.0f} ms" for m in times if i and times[m])
            )
        others, steal = monitor.others(start_all, time.perf_counter())

        stream.start()
        time.sleep(0.2)  # its connection is up before the first of these swaps
        for j in range(BREAKDOWN_SWAPS):
            model, other = names[(swaps + 1 + j) % 2], names[(swaps + j) % 2]
            t_req = time.perf_counter()
            stream.lines.append((t_req, f"--- bench: request for {model}"))
            ask(swap.port, model)
            t_end = time.perf_counter()
            stream.lines.append((t_end, f"--- bench: answer from {model}"))
            time.sleep(0.05)  # let the log lines arrive
            details.append(_breakdown(stream, model, other, t_req, t_end))

        profile_result = None
        if profile is not None:
            direct.close()

            def loop() -> None:
                for j in range(6):
                    ask(swap.port, names[(swaps + 1 + BREAKDOWN_SWAPS + j) % 2])

            profile_result = profile(swap.pid, loop, "swap")
    finally:
        stream.close()
        direct.close()
        with open(procs.workdir / "swap-logstream.txt", "w") as dump:
            for t, line in sorted(stream.lines):
                dump.write(f"{(t - start_all) * 1000:10.1f} {line}\n")

    rows = []
    for mode in ("llamaswap", "router", "direct"):
        values = times[mode]
        rows.append(
            {
                "target": mode,
                "swaps": len(values),
                "p50_ms": median(values) * 1000,
                "p90_ms": percentile(values, 90) * 1000,
                "min_ms": min(values) * 1000,
                "cold_ms": cold.get(mode, float("nan")) * 1000,
            }
        )
    swap.stop()
    procs.stop(router)
    lags = [d["lag_ms"] for d in details if d.get("lag_ms") is not None]
    result = {
        "rows": rows,
        "router_ids": router_ids,
        "others_cores": others,
        "steal_cores": steal,
        "direct_parts_ms": {
            k: median([p[k] for p in direct_parts]) * 1000
            for k in ("stop", "start_ready", "answer")
        },
        "llamaswap_parts_ms": {
            k: median([d[k] for d in details if d.get(k) is not None])
            for k in ("stop_ms", "start_ready_ms", "lag_ms", "after_ready_ms")
            if any(d.get(k) is not None for d in details)
        },
        "lag_ms": lags,
        "lag_p50_ms": median(lags) if lags else None,
        "lag_p95_ms": percentile(lags, 95) if lags else None,
        "lag_max_ms": max(lags) if lags else None,
        "overhead_ms": (median(times["llamaswap"]) - median(times["direct"])) * 1000,
        "router_overhead_ms": (median(times["router"]) - median(times["direct"])) * 1000,
        "llamaswap_cpu_ms_per_swap": ls_cpu / max(1, swaps) * 1000,
        "profile": profile_result,
    }
    try:
        result["ready_lag"] = ready_lag(procs, monitor, swaps=lag_swaps)
    except (OSError, RuntimeError, ValueError, httpclient.HTTPException, psutil.Error) as e:
        log(f"  readiness lag not measured: {e!r}")
    return result


def _breakdown(
    stream: LogStream, model: str, other: str, t_req: float, t_end: float
) -> dict[str, Any]:
    """Where a llamaswap swap's time went, from its log stream (bench arrival times)."""
    end = t_end + 1.0
    q = re.escape
    stopping = stream.first(t_req, end, rf"stopping {q(other)} \(swap[,)]")
    stopped = stream.first(t_req, end, rf"model {q(other)} stopped")
    starting = stream.first(t_req, end, rf"starting {q(model)}:")
    loaded = stream.first(t_req, end, rf"^\[{q(model)}\] .*listening on http")
    ready = stream.first(t_req, end, rf"model {q(model)} ready in")
    out: dict[str, Any] = {}
    if stopping and stopped:
        out["stop_ms"] = (stopped[0] - stopping[0]) * 1000
    if starting and loaded:
        out["start_ready_ms"] = (loaded[0] - starting[0]) * 1000
    if loaded and ready:
        out["lag_ms"] = (ready[0] - loaded[0]) * 1000
    if ready:
        out["after_ready_ms"] = (t_end - ready[0]) * 1000
    return out


# --- readiness lag, on the child's own clock ------------------------------------

SHIM_SOURCE = Path(__file__).with_name("readylag.c")


def build_shim(workdir: Path) -> Path | None:
    """Compile ``readylag.c`` (a C compiler is needed; None without one)."""
    cc = which("cc") or which("gcc")
    if cc is None:
        return None
    shim = workdir / "readylag.so"
    built = subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(shim), str(SHIM_SOURCE), "-ldl"],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        log(f"  readylag.c did not compile: {built.stderr.strip()[:300]}")
        return None
    return shim


class LagFile:
    """The lines the shim writes, one per child: ``pid ready_ns request_ns``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new(self, skip_pid: int | None = None) -> list[float]:
        """Lags (ms) written since the last call, except process ``skip_pid``'s."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        cut = text.rfind(b"\n") + 1
        self.offset += cut
        lags = []
        for line in text[:cut].decode().splitlines():
            pid, ready, request = (int(x) for x in line.split())
            if pid != skip_pid:
                lags.append((request - ready) / 1e6)
        return lags


def _summary(lags: list[float], times: list[float]) -> dict[str, Any]:
    return {
        "lags_ms": lags,
        "p50_ms": median(lags) if lags else None,
        "p95_ms": percentile(lags, 95) if lags else None,
        "max_ms": max(lags) if lags else None,
        "swap_p50_ms": median(times) * 1000 if times else None,
    }


def ready_lag(procs: Procs, monitor: CpuMonitor, *, swaps: int) -> dict[str, Any]:
    """``swaps`` swaps each through llamaswap and router mode, every child stamping
    its own ``ready`` and the request reaching it: the lag between them (ms)."""
    shim = build_shim(procs.workdir)
    if shim is None:
        log("  no C compiler: readiness lag not measured")
        return {}
    files = {mode: LagFile(procs.workdir / f"readylag-{mode}.txt") for mode in LAG_MODES}

    def preload(mode: str) -> dict[str, str]:
        return {"LD_PRELOAD": str(shim), "READYLAG_FILE": str(files[mode].path)}

    env = "\n    env: [" + ", ".join(f'"{k}={v}"' for k, v in preload("llamaswap").items()) + "]"
    models = {
        name: CONFIG_MODEL.format(wrapper="", args=" ".join(COMMON_ARGS + args)) + env
        for name, args in MODELS.items()
    }
    config = config_text(f"healthCheckTimeout: 120\nstartPort: {free_port_base() + 300}\n", models)
    swap = Llamaswap(procs, "llamaswap-lag", config).start()
    # the router runs with the shim too (its children inherit it); its own lines,
    # if any, are left out by its pid
    router_port, _, router = start_router(procs, "router-lag", env=preload("router"))
    names = list(MODELS)
    lags: dict[str, list[float]] = {mode: [] for mode in LAG_MODES}
    times: dict[str, list[float]] = {mode: [] for mode in LAG_MODES}
    monitor.wait_quiet()
    try:
        for i in range(swaps + 1):  # round 0 starts from nothing
            model = names[i % 2]
            for mode in LAG_MODES if i % 2 else LAG_MODES[::-1]:
                t0 = time.perf_counter()
                ask(swap.port if mode == "llamaswap" else router_port, model)
                elapsed = time.perf_counter() - t0
                # written by the child as it read the request, before it answered
                found = files[mode].new(skip_pid=router.pid if mode == "router" else None)
                if len(found) != 1:
                    log(f"  {mode}: {len(found)} lags for one swap")
                    continue
                if i:
                    lags[mode].append(found[0])
                    times[mode].append(elapsed)
            log(
                f"  lag swap {i:>2} -> {model}: "
                + "  ".join(f"{m} {lags[m][-1]:.2f} ms" for m in lags if lags[m])
            )
    finally:
        swap.stop()
        procs.stop(router)
    return {mode: _summary(lags[mode], times[mode]) for mode in LAG_MODES}


LAG_MODES = ("llamaswap", "router")
