"""3. Swaps: alternate A/B requests (max_tokens 1) on real llama-server.

Three ways to get the answer of a model that is not loaded, interleaved round by
round so background noise hits all of them alike:

* llamaswap with two model ids (same GGUF, different --ctx-size), one at a time;
* llama.cpp router mode (``--models-dir`` with two names for the GGUF,
  ``--models-max 1``, the same per-model arguments in a preset);
* by hand: stop the old llama-server, spawn the new one, poll /health every 2 ms,
  ask, i.e. the floor any supervisor can reach.

The readiness lag is measured on the child's own clock, in rounds of their own
after the swap rounds (strace slows the child, so it stays out of the swap
times): llamaswap (its model commands wrapped in ``strace``, ``childProtocol:
on``) and router mode (the router under ``strace -f``: it spawns its children as
``/proc/self/exe``, so they cannot be wrapped) take turns swapping, each child
traced with ``--seccomp-bpf`` so that only its ``write`` and ``recvfrom`` calls
stop it.  The lag is the time from the child's ``write`` of its
``cmd_child_to_router:state:{"state":"ready",...}`` line on stdout to its first
``recvfrom`` holding the waiting ``POST /v1/chat/completions`` (each stamped at
the call's entry, see ``syscalls``): the supervisor reading the line, marking the
model ready and relaying the request, and the child's thread waking for it.
Router mode's own ``write`` and ``recvfrom`` calls are traced too (``strace -f``
follows the router's whole tree), which can only lengthen its lag.

A secondary, coarse figure comes from llamaswap's live log stream, read in
``BREAKDOWN_SWAPS`` swaps after the timed ones (a reader of the log is work
router mode does not have, so the timed swaps go without one): the time
between the child's "listening on http" line and llamaswap's "model X ready"
line (both read from one /logs/stream connection).  It is 0 when both arrive
in one read; else it holds the child's own 0.2-3.3 ms from that line to
``ready`` and the relay (llamaswap's line reaches the stream after it).
"""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

from .common import (
    CpuMonitor,
    Llamaswap,
    Procs,
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
    procs: Procs, label: str = "router", wrapper: list[str] | None = None
) -> tuple[int, list[str], Any]:
    """llama.cpp's router mode (``wrapper``: a command it runs under, e.g. strace)."""
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
        *(wrapper or []),
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
    proc = procs.spawn(argv, label)
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

# only the traced calls stop the child (seccomp-bpf); -z: no EAGAIN reads
TRACED = ["write", "recvfrom"]
STRACE_ARGS = ["-f", "-ttt", "-z", "--seccomp-bpf", "-e", f"trace={','.join(TRACED)}"]
STRACE_ARGS += ["-e", "signal=none", "-s", "128"]
# llama-server starts each message on a line of its own
READY_WRITE = re.compile(r'write\(1, "(?:\\n)?cmd_child_to_router:state:\{\\"state\\":\\"ready\\"')
REQUEST_READ = re.compile(r'recvfrom\(\d+, "POST /v1/chat/completions ')
STRACE_LINE = re.compile(r"(\d+) +(\d+\.\d+) (.*)")
RESUMED = re.compile(r"<\.\.\. \w+ resumed>")
UNFINISHED = " <unfinished ...>"


def syscalls(lines: Iterable[str]) -> Iterator[tuple[int, float, str]]:
    """(thread id, time of entry, call) of each call in an ``strace -f -ttt`` log; a
    call cut in two by another thread's (``<unfinished ...>``, ``<... resumed>``)
    is joined.

    The entry, not the return: strace stamps a call when it gets round to the stop,
    which on a busy machine can be a millisecond late, and a ``write`` returns only
    after strace has handled its exit stop, long after the bytes are in the pipe
    (the reader can see them before the writer's return is stamped).  A ``recvfrom``
    entered by a woken server thread has its data waiting.
    """
    pending: dict[int, tuple[float, str]] = {}
    for line in lines:
        m = STRACE_LINE.fullmatch(line.rstrip("\n"))
        if m is None:
            continue
        tid, at, call = int(m[1]), float(m[2]), m[3]
        if call.endswith(UNFINISHED):
            pending[tid] = (at, call[: -len(UNFINISHED)])
        elif (resumed := RESUMED.match(call)) is not None:
            if tid in pending:
                entered, start = pending.pop(tid)
                yield tid, entered, start + call[resumed.end() :]
        elif not call.startswith("+++"):
            yield tid, at, call


def ready_to_request(lines: Iterable[str], tids: set[int] | None = None) -> float | None:
    """Seconds from the child's ``write`` of ``ready`` to its first ``recvfrom`` of a
    chat request (only threads ``tids``, if given)."""
    ready = None
    for tid, at, call in syscalls(lines):
        if tids is not None and tid not in tids:
            continue
        if ready is None:
            if READY_WRITE.match(call):
                ready = at
        elif REQUEST_READ.match(call):
            return at - ready
    return None


def _summary(lags: list[float], times: list[float]) -> dict[str, Any]:
    return {
        "lags_ms": lags,
        "p50_ms": median(lags) if lags else None,
        "p95_ms": percentile(lags, 95) if lags else None,
        "max_ms": max(lags) if lags else None,
        "swap_p50_ms": median(times) * 1000 if times else None,
    }


class TracedRouter:
    """Router mode under ``strace -f``: its children's calls, thread by thread."""

    def __init__(self, procs: Procs, strace: str) -> None:
        self.trace = procs.workdir / "strace-router.txt"
        wrapper = [strace, *STRACE_ARGS, "-o", str(self.trace)]
        self.procs = procs
        self.port, _, self.proc = start_router(procs, "router-traced", wrapper)
        self.offset = 0

    def stop(self) -> None:
        """SIGTERM the router itself, then strace (signalled together as a group, they
        outlived the bench's 15 s grace)."""
        for router in psutil.Process(self.proc.pid).children():
            router.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.procs.stop(self.proc)

    def lag(self) -> float | None:
        """The lag of the child that just answered, from the trace written since the
        last call."""
        (router,) = psutil.Process(self.proc.pid).children()
        tids = {
            t.id
            for child in router.children()
            if child.status() != psutil.STATUS_ZOMBIE
            for t in child.threads()
        }
        with open(self.trace, "rb") as f:
            f.seek(self.offset)
            text = f.read()
        lag = ready_to_request(text.decode(errors="replace").splitlines(), tids)
        if lag is not None:
            self.offset += len(text)
        return lag


def ready_lag(procs: Procs, monitor: CpuMonitor, *, swaps: int) -> dict[str, Any]:
    """``swaps`` swaps each through llamaswap and router mode, children traced: the
    lag from each child's ``ready`` to the request reaching it (ms)."""
    strace = which("strace")
    if strace is None:
        log("  no strace: readiness lag not measured")
        return {}
    traces = procs.workdir / "strace"
    traces.mkdir(exist_ok=True)
    models = {}
    for name, args in MODELS.items():
        # -D: strace as the child's grandchild, not its parent (which would wait for
        # every child of its own: the lifeline watcher forked before the exec too)
        trace = traces / f"{name}.txt"
        wrapper = shlex.join([strace, "-D", *STRACE_ARGS, "-o", str(trace)])
        body = CONFIG_MODEL.format(wrapper=wrapper + " ", args=" ".join(COMMON_ARGS + args))
        # the executable is strace: say that the child speaks llama-server's protocol
        models[name] = body + '\n    childProtocol: "on"'
    config = config_text(f"healthCheckTimeout: 120\nstartPort: {free_port_base() + 300}\n", models)
    swap = Llamaswap(procs, "llamaswap-traced", config).start()
    router = TracedRouter(procs, strace)
    names = list(MODELS)
    lags: dict[str, list[float]] = {"llamaswap": [], "router": []}
    times: dict[str, list[float]] = {"llamaswap": [], "router": []}
    monitor.wait_quiet()
    try:
        for i in range(swaps + 1):  # round 0 starts from nothing
            model = names[i % 2]
            for mode in ("llamaswap", "router") if i % 2 else ("router", "llamaswap"):
                t0 = time.perf_counter()
                ask(swap.port if mode == "llamaswap" else router.port, model)
                elapsed = time.perf_counter() - t0
                for _ in range(20):  # strace may not have written the lines yet
                    if mode == "llamaswap":
                        lag = ready_to_request(_lines(traces / f"{model}.txt"))
                    else:
                        lag = router.lag()
                    if lag is not None:
                        break
                    time.sleep(0.05)
                else:
                    log(f"  {mode}: no ready → request in the child's trace")
                    continue
                if i:
                    lags[mode].append(lag * 1000)
                    times[mode].append(elapsed)
            log(
                f"  traced swap {i:>2} -> {model}: "
                + "  ".join(f"{m} {lags[m][-1]:.2f} ms" for m in lags if lags[m])
            )
    finally:
        swap.stop()
        router.stop()
    return {mode: _summary(lags[mode], times[mode]) for mode in lags}


def _lines(path: Path) -> list[str]:
    with open(path, errors="replace") as f:
        return f.readlines()
