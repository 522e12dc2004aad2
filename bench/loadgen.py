"""Closed-loop HTTP/1.1 load generator, the fallback when ``wrk`` is not installed.

``python -m bench.loadgen --port N --path /v1/chat/completions --body JSON
--concurrency C --duration S --out FILE`` writes the same JSON as
``bench/wrk_report.lua``: counters and a latency histogram in microseconds.

Raw asyncio sockets, one keep-alive connection per worker, a pre-built request:
about as cheap as a Python client gets, but still far costlier than wrk, so on a
2-core machine it competes with the server it measures (the report says which
generator ran).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter


async def worker(
    port: int, request: bytes, deadline: float, hist: Counter[int], stats: dict[str, int]
) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats["connect"] += 1
        return
    try:
        while True:
            start = time.perf_counter()
            if start >= deadline:
                return
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                await reader.readexactly(int(lower[at + 17 : stop]))
            elif b"chunked" in lower:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            hist[int((time.perf_counter() - start) * 1e6)] += 1
            stats["requests"] += 1
            stats["bytes"] += len(head)
            if not 200 <= status < 400:
                stats["status"] += 1
            if b"connection: close" in lower:
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        stats["read"] += 1
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    if args.body_file:
        with open(args.body_file, "rb") as f:
            body = f.read()
    else:
        body = args.body.encode()
    request = (
        f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    hist: Counter[int] = Counter()
    stats = dict.fromkeys(("requests", "bytes", "connect", "read", "write", "status"), 0)
    start = time.perf_counter()
    deadline = start + args.duration
    await asyncio.gather(
        *(worker(args.port, request, deadline, hist, stats) for _ in range(args.concurrency))
    )
    elapsed = time.perf_counter() - start
    return {
        "requests": stats["requests"],
        "duration_us": int(elapsed * 1e6),
        "bytes": stats["bytes"],
        "errors": {
            "connect": stats["connect"],
            "read": stats["read"],
            "write": stats["write"],
            "status": stats["status"],
            "timeout": 0,
        },
        "hist": sorted(hist.items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--body", default="")
    parser.add_argument("--body-file")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
