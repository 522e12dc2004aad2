"""1. Proxy overhead: small non-streaming requests, direct vs llamaswap vs nginx."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from .common import (
    REPO,
    VENV_BIN,
    CpuMonitor,
    Llamaswap,
    Procs,
    child_env,
    config_text,
    free_port,
    hist_percentile,
    http,
    log,
    wait_http,
    which,
)

CHAT_PATH = "/v1/chat/completions"


def body(model: str, size: int = 0) -> str:
    """A chat request; with ``size``, a conversation of about that many bytes."""
    messages = [{"role": "user", "content": "hi"}]
    turn = "The quick brown fox jumps over the lazy dog. " * 20  # ~900 bytes
    while size and len(json.dumps(messages)) < size:
        messages[:0] = [{"role": "user", "content": turn}, {"role": "assistant", "content": turn}]
    return json.dumps({"model": model, "messages": messages, "max_tokens": 1})


BIG = 256 * 1024


def config(start_port: int) -> str:
    return config_text(
        f"healthCheckTimeout: 30\nstartPort: {start_port}\n",
        {
            "fast": "    cmd: python -m bench.fast_upstream --port ${PORT}",
            # the same upstream printing 7 llama-server-like log lines per request
            "fast-chatty": "    cmd: python -m bench.fast_upstream --port ${PORT} --log-lines 7",
        },
    )


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    upstream model {{
        server 127.0.0.1:{upstream};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class LoadGen:
    """wrk when installed (C, one thread), else the asyncio fallback in bench/loadgen.py."""

    def __init__(self, workdir: Path, force_python: bool = False) -> None:
        self.workdir = workdir
        self.wrk = None if force_python else which("wrk")
        self.name = "wrk -t1 (C)" if self.wrk else "bench/loadgen.py (Python asyncio)"
        self.count = 0

    def run(self, port: int, body: str, concurrency: int, duration: float) -> dict[str, Any]:
        self.count += 1
        out = self.workdir / f"load-{self.count}.json"
        body_file = None
        if len(body) > 32_000:  # too long for an environment variable or argv
            body_file = self.workdir / "body.json"
            body_file.write_text(body)
        if self.wrk:
            argv = [
                self.wrk,
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
                "--timeout",
                "10s",
                "-s",
                str(REPO / "bench" / "wrk_report.lua"),
                f"http://127.0.0.1:{port}{CHAT_PATH}",
            ]
            env = {**os.environ, "BENCH_OUT": str(out)}
            env.update({"BENCH_BODY_FILE": str(body_file)} if body_file else {"BENCH_BODY": body})
        else:
            argv = [
                str(VENV_BIN / "python"),
                "-m",
                "bench.loadgen",
                "--port",
                str(port),
                "--path",
                CHAT_PATH,
                *(["--body-file", str(body_file)] if body_file else ["--body", body]),
                "--concurrency",
                str(concurrency),
                "--duration",
                str(duration),
                "--out",
                str(out),
            ]
            env = child_env()
        subprocess.run(
            argv, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, timeout=duration + 60
        )
        result: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        return result


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    hist: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    requests = 0
    duration = 0.0
    rates = []
    for r in results:
        for value, count in r["hist"]:
            hist[int(value)] += int(count)
        errors.update(r["errors"])
        requests += r["requests"]
        duration += r["duration_us"] / 1e6
        rates.append(r["requests"] / (r["duration_us"] / 1e6))
    return {
        "requests": requests,
        "rps": requests / duration if duration else float("nan"),
        "rps_min": min(rates),
        "rps_max": max(rates),
        "p50_ms": hist_percentile(hist, 50) / 1000,
        "p99_ms": hist_percentile(hist, 99) / 1000,
        "errors": sum(errors.values()),
        "error_kinds": {k: v for k, v in errors.items() if v},
    }


def start_nginx(procs: Procs, upstream_port: int, name: str = "nginx") -> int | None:
    nginx = which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        log("nginx is not installed; skipping the nginx reference")
        return None
    directory = procs.workdir / name
    (directory / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, upstream=upstream_port, port=port))
    procs.spawn(
        [nginx, "-e", str(directory / "nginx-error.log"), "-p", str(directory), "-c", str(conf)],
        name,
    )
    try:
        wait_http(port, "/health", timeout=10)
    except TimeoutError:
        log(f"nginx did not start (see {directory}); skipping it")
        return None
    return port


def run(
    procs: Procs,
    monitor: CpuMonitor,
    *,
    concurrencies: tuple[int, ...] = (1, 16, 64),
    rounds: int = 3,
    duration: float = 3.0,
    force_python: bool = False,
    profile: Any = None,
) -> dict[str, Any]:
    loadgen = LoadGen(procs.workdir, force_python)
    log(f"proxy overhead: load generator {loadgen.name}")
    swap = Llamaswap(procs, "llamaswap-proxy", config(free_port_base()))
    swap.start()
    status, reply = http(swap.port, "POST", CHAT_PATH, body("fast").encode())
    assert status == 200, reply
    upstream = swap.upstream_port("fast")
    nginx = start_nginx(procs, upstream)
    targets: dict[str, tuple[int, str]] = {"direct": (upstream, body("fast"))}
    targets["llamaswap"] = (swap.port, body("fast"))
    if nginx is not None:
        targets["nginx"] = (nginx, body("fast"))
    ls_proc = psutil.Process(swap.pid)

    # warm every path (connection pools, code caches)
    for port, b in targets.values():
        loadgen.run(port, b, 16, 1.0)

    results: dict[str, Any] = {"loadgen": loadgen.name, "rounds": rounds, "duration": duration}
    rows = []
    for concurrency in concurrencies:
        monitor.wait_quiet()
        start = time.perf_counter()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        cpu: dict[str, float] = dict.fromkeys(targets, 0.0)
        conns: dict[str, int] = dict.fromkeys(targets, 0)
        for _ in range(rounds):  # interleaved, so drift hits every target alike
            for name, (port, b) in targets.items():
                before = sum(ls_proc.cpu_times()[:2])
                seen = upstream_stats(upstream)
                r = loadgen.run(port, b, concurrency, duration)
                cpu[name] += sum(ls_proc.cpu_times()[:2]) - before
                conns[name] += upstream_stats(upstream)["connections"] - seen["connections"] - 1
                runs[name].append(r)
        others, steal = monitor.others(start, time.perf_counter())
        for name in targets:
            m = merge(runs[name])
            m.update(
                target=name,
                concurrency=concurrency,
                others_cores=others,
                steal_cores=steal,
                llamaswap_cpu_us_per_req=(cpu[name] / m["requests"] * 1e6 if m["requests"] else 0),
                upstream_conns=conns[name],
                upstream_conns_per_1k=conns[name] / m["requests"] * 1000 if m["requests"] else 0,
            )
            rows.append(m)
            log(
                f"  c={concurrency:<3} {name:<10} p50 {m['p50_ms']:.3f} ms"
                f"  p99 {m['p99_ms']:.3f} ms"
                f"  {m['rps']:.0f} req/s  errors {m['errors']}"
            )
    results["rows"] = rows
    results["rss_after_load_mb"] = ls_proc.memory_info().rss / 2**20

    # a long conversation (256 KiB body), as agents and IDE plugins send: body parsing
    big = {name: (port, body("fast", BIG)) for name, (port, _) in targets.items()}
    for port, b in big.values():
        loadgen.run(port, b, 1, 1.0)
    monitor.wait_quiet()
    start = time.perf_counter()
    big_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in big}
    big_cpu: dict[str, float] = dict.fromkeys(big, 0.0)
    for _ in range(max(1, rounds - 1)):
        for name, (port, b) in big.items():
            before = sum(ls_proc.cpu_times()[:2])
            big_runs[name].append(loadgen.run(port, b, 1, duration))
            big_cpu[name] += sum(ls_proc.cpu_times()[:2]) - before
    others, steal = monitor.others(start, time.perf_counter())
    big_rows = []
    for name in big:
        m = merge(big_runs[name])
        m.update(
            target=name,
            concurrency=1,
            others_cores=others,
            llamaswap_cpu_us_per_req=big_cpu[name] / m["requests"] * 1e6 if m["requests"] else 0,
        )
        big_rows.append(m)
        log(f"  c=1 256KiB {name:<10} p50 {m['p50_ms']:.3f} ms  {m['rps']:.0f} req/s")
    results["big_rows"] = big_rows
    results["big_bytes"] = len(body("fast", BIG))

    # the same upstream printing llama-server-like log lines: the cost of log handling
    status, reply = http(swap.port, "POST", CHAT_PATH, body("fast-chatty").encode())
    assert status == 200, reply
    loadgen.run(swap.port, body("fast-chatty"), 16, 1.0)
    monitor.wait_quiet()
    start = time.perf_counter()
    before = sum(ls_proc.cpu_times()[:2])
    chatty = merge(
        [loadgen.run(swap.port, body("fast-chatty"), 16, duration) for _ in range(rounds)]
    )
    used = sum(ls_proc.cpu_times()[:2]) - before
    chatty.update(
        target="llamaswap, upstream logs 7 lines/req",
        concurrency=16,
        others_cores=monitor.others(start, time.perf_counter())[0],
        llamaswap_cpu_us_per_req=used / chatty["requests"] * 1e6,
    )
    results["chatty"] = chatty
    log(f"  c=16  chatty     p50 {chatty['p50_ms']:.3f} ms  {chatty['rps']:.0f} req/s")

    if profile is not None:
        # back to the quiet upstream, then profile llamaswap under concurrency 16
        http(swap.port, "POST", CHAT_PATH, body("fast").encode())
        loadgen.run(swap.port, body("fast"), 16, 1.0)
        results["profile"] = profile(
            swap.pid, lambda: loadgen.run(swap.port, body("fast"), 16, 10.0), "proxy-c16"
        )
        results["profile64"] = profile(
            swap.pid, lambda: loadgen.run(swap.port, body("fast"), 64, 10.0), "proxy-c64"
        )
        results["profile_big"] = profile(
            swap.pid, lambda: loadgen.run(swap.port, body("fast", BIG), 1, 5.0), "proxy-big"
        )

    procs.stop_named("nginx")
    swap.stop()
    results["log_tail"] = swap.log_path.read_text(errors="replace").splitlines()[-5:]
    return results


def upstream_stats(port: int) -> dict[str, int]:
    status, reply = http(port, "GET", "/bench/stats")
    assert status == 200, reply
    return dict(json.loads(reply))


def free_port_base() -> int:
    """A startPort for llamaswap away from the default 5800 other runs may use."""
    return 21000 + (os.getpid() % 400) * 10
