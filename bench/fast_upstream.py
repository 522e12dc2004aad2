"""A tiny, fast OpenAI-shaped upstream, so a benchmark measures the proxy, not the model.

``python -m bench.fast_upstream --port N [--log-lines K]``

Plain asyncio protocol, HTTP/1.1 keep-alive, a fixed ~600-byte ``chat.completion``
body for any ``POST``, ``{"status": "ok"}`` for ``GET /health`` and the connections
and requests it has seen for ``GET /bench/stats``.  It costs a few
tens of microseconds of CPU per request, far less than any Python proxy in front
of it.  ``--log-lines K`` prints K llama-server-like lines to stderr per request
(llama-server prints about 7 per chat completion), to measure what reading a
child's log costs llamaswap.  Unknown arguments are ignored (so a marker can be
passed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

CHAT = json.dumps(
    {
        "choices": [
            {
                "finish_reason": "length",
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
            }
        ],
        "created": 1700000000,
        "model": "fast",
        "system_fingerprint": "b1-bench",
        "object": "chat.completion",
        "usage": {"completion_tokens": 1, "prompt_tokens": 9, "total_tokens": 10},
        "id": "chatcmpl-benchbenchbenchbenchbenchbench",
        "timings": {
            "prompt_n": 9,
            "prompt_ms": 1.5,
            "prompt_per_token_ms": 0.16,
            "prompt_per_second": 6000.0,
            "predicted_n": 1,
            "predicted_ms": 0.001,
            "predicted_per_token_ms": 0.001,
            "predicted_per_second": 1000.0,
        },
    }
).encode()
HEALTH = b'{"status":"ok"}'
NOT_FOUND = b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'

LOG_TEMPLATE = (
    "slot print_timing: id  0 | task {task} | prompt eval time =       1.50 ms /"
    "     9 tokens (    0.17 ms per token,  6000.00 tokens per second) line {line}\n"
)


def response(status: bytes, body: bytes, close: bool) -> bytes:
    head = (
        b"HTTP/1.1 "
        + status
        + b"\r\nServer: bench-upstream\r\nContent-Type: application/json; charset=utf-8\r\n"
        + b"Content-Length: "
        + str(len(body)).encode()
        + (b"\r\nConnection: close" if close else b"")
        + b"\r\n\r\n"
    )
    return head + body


CHAT_KEEP = response(b"200 OK", CHAT, False)
CHAT_CLOSE = response(b"200 OK", CHAT, True)
HEALTH_KEEP = response(b"200 OK", HEALTH, False)
HEALTH_CLOSE = response(b"200 OK", HEALTH, True)
NF_KEEP = response(b"404 Not Found", NOT_FOUND, False)
NF_CLOSE = response(b"404 Not Found", NOT_FOUND, True)


class Server(asyncio.Protocol):
    log_lines = 0
    task = 0
    connections = 0
    requests = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        Server.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else None])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            close = b"\r\nconnection: close" in lower
            line = head.split(b"\r\n", 1)[0]
            method, _, rest = line.partition(b" ")
            path = rest.partition(b" ")[0]
            if method == b"POST":
                Server.requests += 1
                self.transport.write(CHAT_CLOSE if close else CHAT_KEEP)
                if self.log_lines:
                    Server.task += 1
                    sys.stderr.write(
                        "".join(
                            LOG_TEMPLATE.format(task=Server.task, line=i)
                            for i in range(self.log_lines)
                        )
                    )
                    sys.stderr.flush()
            elif path in (b"/health", b"/v1/health"):
                self.transport.write(HEALTH_CLOSE if close else HEALTH_KEEP)
            elif path == b"/bench/stats":
                stats = b'{"connections": %d, "requests": %d}' % (
                    Server.connections,
                    Server.requests,
                )
                self.transport.write(response(b"200 OK", stats, close))
            else:
                self.transport.write(NF_CLOSE if close else NF_KEEP)
            if close:
                self.transport.close()
                return


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Server, host, port, backlog=1024)
    sys.stderr.write(
        f"main: server is listening on http://{host}:{port} - starting the main loop\n"
    )
    sys.stderr.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--log-lines", type=int, default=0)
    args, _ = parser.parse_known_args()
    Server.log_lines = args.log_lines
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
