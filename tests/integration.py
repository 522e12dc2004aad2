"""A real llamaswap (real sockets) in front of real fake-llama-server children."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap.api import Api
from llamaswap.config import parse_config
from llamaswap.relay import BytesProducer
from llamaswap.tap import build

from .daemon import free_port, start_twistd

FAKE = f"{sys.executable} -m llamaswap.testing.fake_server --port ${{PORT}} --model ${{MODEL_ID}}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by someone else) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_quietly(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists (cleanup of processes a test let loose)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)


class Reply:
    def __init__(self, response: IResponse, body: bytes) -> None:
        self.code = response.code
        self.headers = response.headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode() if values else None


class LiveTestCase(TestCase):
    """Starts llamaswap from a YAML text and talks to it over HTTP."""

    timeout = 60

    async def serve(self, yaml_text: str, listen_port: int = 0) -> Api:
        config = parse_config(yaml_text, "test.yaml")
        if "startPort" not in yaml_text:
            # away from the default, so parallel runs on one machine rarely meet
            config = attrs.evolve(config, start_port=random.randrange(20000, 40000))
        config = attrs.evolve(config, store_path=":memory:")
        self.service = build(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        api: Api = self.service.api
        self.api = api
        site: Any = self.service.site
        port: IListeningPort = reactor.listenTCP(listen_port, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        return api

    async def serve_in_front_of(self, upstream: Any, model_keys: str = "") -> Api:
        """llamaswap with one model ``m`` whose server is ``upstream`` (a server
        factory, listening here on a free port); ``model_keys``: more of its YAML."""
        port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port  # type: ignore[attr-defined]
        return await self.serve(
            f"models:\n  m:\n    cmd: sleep 60\n    proxy: http://127.0.0.1:{number}\n"
            f"    checkEndpoint: none\n{model_keys}"
        )

    async def daemon(
        self, config: Path, output: IO[str] | int = subprocess.DEVNULL, **options: Any
    ) -> tuple[subprocess.Popen[bytes], int]:
        """A real ``twistd -n llamaswap`` on a free port, answering /health; the
        requests below go to it."""
        port = free_port()
        twistd = start_twistd(config, port, output, **options)
        self.addCleanup(twistd.wait)
        self.addCleanup(twistd.terminate)
        self.base = f"http://127.0.0.1:{port}"
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        for _ in range(200):
            try:
                await self.request("GET", "/health")
                break
            except ConnectError:
                await deferLater(reactor, 0.05)
        return twistd, port

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        response: IResponse = await self.agent.request(
            method.encode(),
            (self.base + path).encode(),
            Headers({k: [v] for k, v in (headers or {}).items()}),
            BytesProducer(body) if body is not None else None,
        )
        return Reply(response, await treq.content(response))

    async def post(self, path: str, document: object) -> Reply:
        return await self.request(
            "POST", path, json.dumps(document).encode(), {"content-type": "application/json"}
        )

    async def chat(self, model: str, **extra: Any) -> Reply:
        messages = [{"role": "user", "content": "hi"}]
        return await self.post(
            "/v1/chat/completions", {"model": model, "messages": messages, **extra}
        )

    async def stream(self, document: dict[str, Any]) -> tuple[IResponse, StreamReader]:
        """POST a chat document; the body is read chunk by chunk as it comes."""
        response: IResponse = await self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(json.dumps(document).encode()),
        )
        reader = StreamReader()
        response.deliverBody(reader)
        return response, reader

    async def running(self) -> dict[str, Any]:
        reply = await self.request("GET", "/running")
        return {entry["model"]: entry for entry in reply.json()["running"]}

    async def eventually(
        self,
        check: Any,
        what: str,
        tries: int = 200,
        *,
        within: float | None = None,
        seen: Callable[[], object] | None = None,
    ) -> None:
        """Poll a real process's observable state (bounded; no fixed sleeps).

        ``within``: poll for that many seconds of wall clock instead of ``tries``
        times; a check that costs a request takes far longer on a loaded machine,
        where a count of tries can outlast the test's own ``timeout`` (which fails
        saying nothing of what was seen).  ``seen``: what the check last saw, for
        the failure message."""
        deadline = None if within is None else reactor.seconds() + within
        attempt = 0
        while (reactor.seconds() < deadline) if deadline is not None else (attempt < tries):
            attempt += 1
            if await check():
                return
            await deferLater(reactor, 0.02)
        last = f"; last seen: {seen()}" if seen is not None else ""
        self.fail(f"never happened: {what} ({attempt} checks){last}")


class StreamReader(Protocol):
    """Collects a streamed body chunk by chunk; can hang up mid-stream."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[None] = Deferred()
        self.waiting: tuple[bytes, Deferred[None]] | None = None

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.waiting is not None and self.waiting[0] in b"".join(self.chunks):
            _marker, d = self.waiting
            self.waiting = None
            d.callback(None)

    def until(self, marker: bytes) -> Deferred[None]:
        """Fires once ``marker`` has come; fails if the body ends without it."""
        d: Deferred[None] = Deferred()
        if marker in b"".join(self.chunks):
            d.callback(None)
        elif self.done.called:
            d.errback(self._ended_without(marker))
        else:
            self.waiting = (marker, d)
        return d

    def _ended_without(self, marker: bytes) -> AssertionError:
        return AssertionError(f"the body ended without {marker!r}: {self.text[-500:]!r}")

    def hang_up(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.waiting is not None:  # it will never come: fail, rather than hang the test
            marker, d = self.waiting
            self.waiting = None
            d.errback(self._ended_without(marker))
        if not self.done.called:
            self.done.callback(None)


class SlowClients(ClientFactory):
    """Slowloris: connections that send the start of a request and never the rest."""

    noisy = False

    def __init__(self) -> None:
        self.connected: list[_SlowClient] = []
        self.answers: list[bytes] = []
        self.started = 0
        self.closed = 0
        self.failed = 0

    def open(self, port: int, count: int, source: str = "127.0.0.2") -> None:
        """``count`` connections to 127.0.0.1:``port`` from another loopback address."""
        self.started += count
        for _ in range(count):
            reactor.connectTCP("127.0.0.1", port, self, timeout=30, bindAddress=(source, 0))

    @property
    def settled(self) -> bool:
        return len(self.connected) + self.failed == self.started

    @property
    def held(self) -> int:
        return len(self.connected) - self.closed

    def buildProtocol(self, addr: Any) -> _SlowClient:
        return _SlowClient(self)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.failed += 1

    def close_all(self) -> None:
        for client in self.connected:
            client.transport.abortConnection()  # type: ignore[union-attr]


class _SlowClient(Protocol):
    def __init__(self, crowd: SlowClients) -> None:
        self.crowd = crowd

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        self.crowd.connected.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.crowd.answers.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.crowd.closed += 1
