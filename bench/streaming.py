"""2. Streaming: time to first token and tokens/s, via llamaswap vs the same child directly."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import time
from typing import Any

import psutil

from .common import CpuMonitor, Llamaswap, Procs, config_text, log, median, percentile
from .proxy import free_port_base, start_nginx

MAX_TOKENS = 64

# Both cores compute (llama.cpp's default here), then one: with a core to spare, as on
# a GPU machine whose CPU mostly waits, the proxy's own cost shows apart from the
# compute it displaces on a machine whose every core is busy.
THREADS = (2, 1)


def model(threads: int) -> str:
    return f"""\
    cmd: >-
      "${{env.LLAMA_SERVER}}" --host 127.0.0.1 --port ${{PORT}} -m "${{env.LLAMASWAP_MODEL}}"
      --threads {threads} --no-webui --ctx-size 2048 --parallel 1"""


REQUEST = {
    "model": "smollm2",
    "stream": True,
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "ignore_eos": True,  # llama.cpp extension: always generate max_tokens
    "messages": [{"role": "user", "content": "Tell me a long story about a cat and a boat."}],
}


def stream_once(port: int) -> dict[str, float]:
    """One streamed chat; times from just before sending the request."""
    body = json.dumps(REQUEST).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.connect()
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        times = []
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                # read the response to its end, as the openai SDK and curl do: a client
                # that hangs up right after [DONE] costs llamaswap its upstream connection
                while response.read(65536):
                    pass
                break
            event = json.loads(payload)
            choices = event.get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                times.append(time.perf_counter())
        end = time.perf_counter()
    finally:
        conn.close()
    if len(times) < 2:
        raise RuntimeError(f"only {len(times)} tokens streamed")
    return {
        "ttft_ms": (times[0] - start) * 1000,
        "tokens": len(times),
        "tok_s": (len(times) - 1) / (times[-1] - times[0]),
        "total_ms": (end - start) * 1000,
        "max_gap_ms": max(b - a for a, b in itertools.pairwise(times)) * 1000,
    }


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User and system CPU of these processes so far (those that ended count 0)."""
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def nginx_processes(procs: Procs, name: str) -> list[psutil.Process]:
    """The nginx started as ``name``: its master and its worker."""
    master = psutil.Process(next(p.pid for p in procs.items if p.bench_name == name))  # type: ignore[attr-defined]
    return [master, *master.children(recursive=True)]


def run(procs: Procs, monitor: CpuMonitor, *, runs: int = 24) -> dict[str, Any]:
    """Each of :data:`THREADS` in turn; the first is the one the targets judge."""
    first, *others = (run_threads(procs, monitor, runs, threads) for threads in THREADS)
    return {**first, "threads": THREADS[0], "also": others}


def run_threads(procs: Procs, monitor: CpuMonitor, runs: int, threads: int) -> dict[str, Any]:
    swap = Llamaswap(
        procs,
        f"llamaswap-stream-t{threads}",
        config_text(
            f"healthCheckTimeout: 120\nstartPort: {free_port_base() + 100}\n",
            {"smollm2": model(threads)},
        ),
    )
    swap.start()
    ports = {"llamaswap": swap.port}
    stream_once(swap.port)  # start the model, warm its prompt cache
    ports["direct"] = swap.upstream_port("smollm2")
    stream_once(ports["direct"])
    # whose CPU a stream through each target costs, besides the client's and the child's
    # (llamaswap's own process only: the child it started is the model server)
    proxies = {"direct": [], "llamaswap": [psutil.Process(swap.pid)]}
    nginx = start_nginx(procs, ports["direct"], "nginx-stream")
    if nginx is not None:
        ports["nginx"] = nginx
        proxies["nginx"] = nginx_processes(procs, "nginx-stream")
        stream_once(nginx)
    monitor.wait_quiet()
    start = time.perf_counter()
    names = list(ports)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i in range(runs):  # interleaved, rotating who goes first
        for name in names[i % len(names) :] + names[: i % len(names)]:
            before = cpu_seconds(proxies[name])
            sample = stream_once(ports[name])
            sample["proxy_cpu_s"] = cpu_seconds(proxies[name]) - before
            samples[name].append(sample)
    others, steal = monitor.others(start, time.perf_counter())
    rows = []
    for name in ("direct", "llamaswap", "nginx"):
        if name not in samples:
            continue
        s = samples[name]
        row = {
            "target": name,
            "runs": len(s),
            "tokens": median([x["tokens"] for x in s]),
            "ttft_p50_ms": median([x["ttft_ms"] for x in s]),
            "ttft_max_ms": max(x["ttft_ms"] for x in s),
            "tok_s_p50": median([x["tok_s"] for x in s]),
            "tok_s_min": min(x["tok_s"] for x in s),
            "total_p50_ms": median([x["total_ms"] for x in s]),
            "gap_p90_ms": percentile([x["max_gap_ms"] for x in s], 90),
        }
        if proxies[name]:
            # the kernel counts CPU in clock ticks: summed over all the runs, then divided
            cpu = sum(x["proxy_cpu_s"] for x in s)
            row["proxy_cpu_us_per_token"] = cpu / sum(x["tokens"] for x in s) * 1e6
        if name != "direct":
            # each round's pair, so a spell of slowness on the shared machine (which
            # moves every target in that round) cancels out
            pairs = list(zip(s, samples["direct"], strict=True))
            row["ttft_extra_paired_ms"] = median([x["ttft_ms"] - d["ttft_ms"] for x, d in pairs])
            row["tok_s_ratio_paired"] = median([x["tok_s"] / d["tok_s"] for x, d in pairs])
        rows.append(row)
        log(
            f"  --threads {threads} {name:<10} TTFT p50 {row['ttft_p50_ms']:.1f} ms"
            f"  {row['tok_s_p50']:.1f} tok/s  ({row['tokens']:.0f} tokens)"
        )
    procs.stop_named("nginx")
    swap.stop()
    return {"rows": rows, "others_cores": others, "steal_cores": steal, "threads": threads}
