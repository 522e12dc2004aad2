"""Sampling profiles of llamaswap with py-spy (when installed): top self and total time."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import VENV_BIN, log, which

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
RATE = 200

# Where the time goes, one bucket per sample.  An *owning* bucket claims every
# sample with its frame anywhere on the stack (the first bucket in this list wins):
# all the work done on behalf of that call.  Other samples go to the *generic*
# bucket of the frame nearest the leaf.
OWNING: list[tuple[str, tuple[str, ...]]] = [
    ("access-log line per request (twisted.web `HTTPFactory.log`)", ("HTTPFactory.log ",)),
    (
        "Content-Type parsed with the email package (twisted.web `http._parseContentType`)",
        ("_parseContentType ",),
    ),
    (
        "other log events (twisted.logger, llamaswap's log observers)",
        ("Logger.emit ", "LogPublisher.__call__ ", "_ProxyLogObserver", "LogHub."),
    ),
    (
        "child output lines (`ChildProtocol.childDataReceived`)",
        ("ChildProtocol.", "ModelProcess._line "),
    ),
    (
        "upstream endpoint built per request (`Agent._getEndpoint`: URI, HostnameEndpoint, IDNA)",
        ("Agent._getEndpoint ", "URI.fromBytes ", "_StandardEndpointFactory"),
    ),
    (
        "activity log: SQLite writes in a thread (`ActivityStore._write`)",
        ("ActivityStore.", "(llamaswap/activity.py)"),
    ),
    (
        "request records, events and Prometheus metrics (recorder, events, metrics)",
        (
            "RequestRecord.",
            "Recorder.",
            "(llamaswap/recorder.py)",
            "(llamaswap/events.py)",
            "(llamaswap/metrics.py)",
            "(prometheus_client/",
        ),
    ),
    (
        "name resolution via the thread pool (`GAIResolver`, getaddrinfo)",
        (
            "getaddrinfo ",
            "GAIResolver",
            "ThreadPool.",
            "_threadworker",
            "callInThread",
            "LockWorker",
            "ThreadWorker",
            "Team.",
            "deferToThreadPool",
            "ThreadedResolver",
        ),
    ),
    (
        "new upstream TCP connections (connect, setup, teardown)",
        (
            "HostnameEndpoint.connect",
            "HostnameEndpoint._",
            "TCP4ClientEndpoint",
            "BaseClient.",
            "Client.__init__ ",
            "Connector.",
            "Client._connectDone",
            "HTTPConnectionPool._newConnection ",
            "_HTTP11ClientFactory",
            "HTTP11ClientProtocol.connectionLost ",
        ),
    ),
    ("JSON body parsing and filters (`Api.model_from_body`)", ("Api.model_from_body ",)),
    ("scheduler (leases)", ("Scheduler.", "Lease.")),
    ("header copying (`relay.end_to_end`)", ("end_to_end ",)),
    ("upstream request write (`HTTP11ClientProtocol.request`)", ("HTTP11ClientProtocol.request ",)),
    (
        "response to the client (`Request.write`/`finish`)",
        ("Request.write ", "Request.finish ", "Request._cleanup"),
    ),
    ("Klein routing and dispatch (werkzeug)", ("MapAdapter.", "Map.bind")),
    (
        "upstream response parsing (`HTTPClientParser`, minus the above)",
        ("HTTPClientParser.", "HTTPParser."),
    ),
]
GENERIC: list[tuple[str, tuple[str, ...]]] = [
    ("relay bookkeeping (relay.py)", ("(llamaswap/relay.py)",)),
    ("other llamaswap code", ("(llamaswap/",)),
    ("Klein routing and dispatch (werkzeug)", ("(klein/", "(werkzeug/")),
    (
        "client request parsing (twisted.web `HTTPChannel`, `Request`)",
        ("(twisted/web/http.py)", "(twisted/web/server.py)", "(twisted/protocols/basic.py)"),
    ),
    ("Deferred / coroutine machinery", ("(twisted/internet/defer.py)",)),
    (
        "socket reads/writes",
        ("(twisted/internet/tcp.py)", "(twisted/internet/abstract.py)", "untilConcludes "),
    ),
    (
        "reactor loop (epoll, timers)",
        (
            "(twisted/internet/epollreactor.py)",
            "(twisted/internet/base.py)",
            "(twisted/internet/posixbase.py)",
            "(twisted/python/log.py)",
            "(twisted/python/context.py)",
        ),
    ),
]


def centre_of(names: list[str]) -> str:
    for label, keys in OWNING:
        if any(key in name + " " for name in names for key in keys):
            return label
    for name in reversed(names):
        for label, keys in GENERIC:
            if any(key in name + " " for key in keys):
                return label
    return "other"


STDLIB = {
    "json",
    "email",
    "socket",
    "threading",
    "queue",
    "asyncio",
    "http",
    "urllib",
    "selectors",
    "re",
    "functools",
    "collections",
    "enum",
    "typing",
    "subprocess",
    "os",
    "posixpath",
    "genericpath",
    "shutil",
    "datetime",
    "time",
    "contextlib",
    "abc",
    "weakref",
    "codecs",
    "encodings",
    "logging",
    "io",
    "traceback",
    "linecache",
}


def short(path: str) -> str:
    """py-spy already prints paths relative to sys.path; mark the standard library."""
    for anchor in ("site-packages/", "lib/python3."):
        at = path.find(anchor)
        if at >= 0:
            path = path[at + len(anchor) :]
            if anchor == "lib/python3.":
                path = path.split("/", 1)[-1]
            break
    head = path.split("/", 1)[0].removesuffix(".py")
    if head in STDLIB:
        return "stdlib/" + path
    return path


def package(file: str) -> str:
    parts = file.split("/")
    if parts[0] == "stdlib":
        return "stdlib " + parts[1].removesuffix(".py")
    if parts[0] == "twisted" and len(parts) > 2:
        return "twisted." + parts[1]
    return parts[0].removesuffix(".py")


def parse(raw: str) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    centres: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    samples = 0
    idle_threads = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        names = []
        for frame in stack.split(";"):
            m = FRAME.match(frame)
            if m is None:
                names.append((frame, ""))
                continue
            file = short(m["file"])
            names.append((f"{m['func']} ({file})", file))
        if not names:
            continue
        leaf, leaf_file = names[-1]
        if leaf.startswith("Condition.wait") and any("_threadworker" in f for _, f in names):
            idle_threads += count  # an idle thread-pool worker waiting for work
            samples -= count
            continue
        self_time[leaf] += count
        by_package[package(leaf_file) if leaf_file else "?"] += count
        centres[centre_of([n for n, _ in names])] += count
        for name in {n for n, _ in names}:
            total_time[name] += count
        for name in {n for n, file in names if file.startswith("llamaswap/")}:
            ours[name] += count
    return {
        "samples": samples,
        "idle_thread_samples": idle_threads,
        "self": self_time.most_common(15),
        # drop the reactor plumbing that is on (nearly) every stack
        "total": [
            (name, count) for name, count in total_time.most_common(80) if count < 0.8 * samples
        ][:25],
        "packages": by_package.most_common(12),
        "centres": centres.most_common(),
        "ours": ours.most_common(12),
    }


def make_profiler(workdir: Path) -> Callable[[int, Callable[[], Any], str], dict[str, Any]] | None:
    spy = which("py-spy") or (str(VENV_BIN / "py-spy") if (VENV_BIN / "py-spy").exists() else None)
    if spy is None:
        log("py-spy is not installed; skipping profiles (pip install py-spy)")
        return None

    def profile(pid: int, action: Callable[[], Any], name: str) -> dict[str, Any]:
        out = workdir / f"profile-{name}.txt"
        proc = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(RATE),
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(1.0)  # attach
            start = time.perf_counter()
            action()
            elapsed = time.perf_counter() - start
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
        if not out.exists():
            log(f"py-spy failed: {err.decode(errors='replace')[-300:]}")
            return {"error": err.decode(errors="replace")[-300:]}
        result = parse(out.read_text())
        result["seconds"] = elapsed
        result["rate"] = RATE
        result["file"] = str(out)
        return result

    return profile
