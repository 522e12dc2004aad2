"""4. Footprint: llamaswap's memory idle and with 500 concurrent streaming clients."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import psutil

from .common import CpuMonitor, Llamaswap, Procs, config_text, http, log, median, percentile
from .proxy import free_port_base

TOKENS = 20
DELAY = 0.5

MODEL = (
    "    cmd: python -m llamaswap.testing.fake_server --port ${PORT} --model fake"
    f" --token-delay {DELAY} --tokens {TOKENS}"
)

BODY = (
    b'{"model": "fake", "stream": true, "messages": [{"role": "user", "content": "hi"}], '
    b'"fake": {"tokens": %d, "delay": %g}}' % (TOKENS, DELAY)
)


def mb(proc: psutil.Process) -> tuple[float, float]:
    """RSS and USS (memory only this process holds), MiB."""
    info = proc.memory_full_info()
    return info.rss / 2**20, info.uss / 2**20


async def one_client(port: int, start: float) -> dict[str, Any]:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    ) + BODY
    result: dict[str, Any] = {"ok": False}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
    except (TimeoutError, OSError) as e:
        result["error"] = f"connect: {e!r}"
        return result
    result["connected"] = time.perf_counter() - start
    try:
        writer.write(request)
        data = b""
        first = None
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 60)
            if not chunk:
                break
            if first is None:
                first = time.perf_counter() - start
            data += chunk
        result["first_byte"] = first
        result["done"] = time.perf_counter() - start
        result["events"] = data.count(b"data: {")
        result["ok"] = data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in data
        if not result["ok"]:
            result["error"] = data[:200].decode(errors="replace")
    except (TimeoutError, OSError) as e:
        result["error"] = repr(e)
    finally:
        writer.close()
    return result


async def clients(port: int, count: int) -> list[dict[str, Any]]:
    start = time.perf_counter()
    return await asyncio.gather(*(one_client(port, start) for _ in range(count)))


def without_tls(procs: Procs) -> dict[str, str]:
    """An environment in which pyOpenSSL cannot be imported, as in an install
    without the ``dev`` and ``tls`` extras (the bench's venv has it, via treq)."""
    hidden = procs.workdir / "no-tls"
    (hidden / "OpenSSL").mkdir(parents=True, exist_ok=True)
    (hidden / "OpenSSL" / "__init__.py").write_text(
        'raise ImportError("hidden by the bench: installed without the tls extra")\n'
    )
    path = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(hidden) + (os.pathsep + path if path else "")}


def idle_without_tls(procs: Procs) -> tuple[float, float]:
    """Idle RSS and USS of a llamaswap that runs without pyOpenSSL."""
    swap = Llamaswap(
        procs,
        "llamaswap-footprint-notls",
        config_text(
            f"healthCheckTimeout: 30\nstartPort: {free_port_base() + 350}\n", {"fake": MODEL}
        ),
    ).start(env=without_tls(procs))
    try:
        time.sleep(2.0)
        return mb(psutil.Process(swap.pid))
    finally:
        swap.stop()


def run(procs: Procs, monitor: CpuMonitor, *, clients_count: int = 500) -> dict[str, Any]:
    bare_rss, bare_uss = idle_without_tls(procs)
    log(f"  idle without pyOpenSSL: RSS {bare_rss:.1f} MiB, USS {bare_uss:.1f} MiB")
    swap = Llamaswap(
        procs,
        "llamaswap-footprint",
        config_text(
            f"healthCheckTimeout: 30\nstartPort: {free_port_base() + 300}\n", {"fake": MODEL}
        ),
    ).start()
    proc = psutil.Process(swap.pid)
    time.sleep(2.0)
    idle_rss, idle_uss = mb(proc)
    log(f"  idle: RSS {idle_rss:.1f} MiB, USS {idle_uss:.1f} MiB")

    status, _ = http(swap.port, "POST", "/v1/chat/completions", BODY.replace(b"true", b"false", 1))
    assert status == 200
    fake_pid = next(c.pid for c in proc.children() if c.is_running())
    fake = psutil.Process(fake_pid)
    one_rss, _ = mb(proc)

    samples: list[tuple[float, float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            try:
                samples.append(
                    (
                        time.perf_counter(),
                        proc.memory_info().rss / 2**20,
                        fake.memory_info().rss / 2**20,
                    )
                )
            except psutil.Error:
                return

    cpu0 = sum(proc.cpu_times()[:2])
    fake_cpu0 = sum(fake.cpu_times()[:2])
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        results = asyncio.run(clients(swap.port, clients_count))
    finally:
        stop.set()
        sampler.join()
    elapsed = time.perf_counter() - start
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    fake_cpu = sum(fake.cpu_times()[:2]) - fake_cpu0
    others, _ = monitor.others(start, time.perf_counter())
    time.sleep(2.0)
    after_rss, after_uss = mb(proc)
    ok = [r for r in results if r["ok"]]
    errors = sorted({str(r.get("error"))[:120] for r in results if not r["ok"]})
    firsts = [r["first_byte"] for r in ok if r.get("first_byte") is not None]
    connects = [r["connected"] for r in results if "connected" in r]
    result = {
        "clients": clients_count,
        "ok": len(ok),
        "errors": errors[:5],
        "events_p50": median([r["events"] for r in ok]) if ok else 0,
        "expected_events": TOKENS + 2,
        "idle_rss_mb": idle_rss,
        "idle_uss_mb": idle_uss,
        "bare_idle_rss_mb": bare_rss,
        "bare_idle_uss_mb": bare_uss,
        "one_model_rss_mb": one_rss,
        "peak_rss_mb": max(s[1] for s in samples) if samples else float("nan"),
        "after_rss_mb": after_rss,
        "after_uss_mb": after_uss,
        "fake_peak_rss_mb": max(s[2] for s in samples) if samples else float("nan"),
        "elapsed_s": elapsed,
        "ideal_s": TOKENS * DELAY,
        "llamaswap_cpu_s": cpu,
        "fake_cpu_s": fake_cpu,
        "first_byte_p50_ms": median(firsts) * 1000 if firsts else None,
        "first_byte_p99_ms": percentile(firsts, 99) * 1000 if firsts else None,
        "first_byte_max_ms": max(firsts) * 1000 if firsts else None,
        "connect_max_ms": max(connects) * 1000 if connects else None,
        "others_cores": others,
    }
    log(
        f"  {clients_count} streams: {len(ok)} ok, peak RSS {result['peak_rss_mb']:.1f} MiB,"
        f" first byte p50 {result['first_byte_p50_ms']} ms max {result['first_byte_max_ms']} ms,"
        f" {elapsed:.1f} s (ideal {TOKENS * DELAY:g} s)"
    )
    swap.stop()
    return result
