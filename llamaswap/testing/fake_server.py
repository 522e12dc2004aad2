"""A fake llama.cpp ``llama-server`` speaking the OpenAI-compatible HTTP API.

It exists so llamaswap can be tested (and demonstrated) without a GPU or model
files.  It is usable two ways:

* in memory: ``FakeLlamaServer(clock=Clock(), ...)`` plus ``.resource()``,
  driven through ``treq.testing.StubTreq`` with a deterministic clock;
* as a real child process: ``python -m llamaswap.testing.fake_server --port N``,
  which logs llama.cpp-like lines to stderr, just as the real server does.  With
  ``LLAMA_SERVER_ROUTER_PORT`` set it is a router's child, as llama-server is: it
  reports ``loading`` progress and ``ready`` on stdout
  (``cmd_child_to_router:state:{...}``), exits cleanly on
  ``cmd_router_to_child:exit`` on stdin, and with code 1 when its stdin closes.

Requests may carry test controls in a ``"fake"`` JSON object, e.g.
``{"fake": {"tokens": 3, "delay": 0.5, "status": 500, "crash_after_tokens": 2,
"hold": true}}``; see :class:`FakeControls`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final, Protocol, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.stdio import StandardIO
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from llamaswap.routes import server_unquote

__all__ = [
    "FakeControls",
    "FakeLlamaServer",
    "main",
]

JSONDict = dict[str, Any]
LogFunction = Callable[[str], None]
StateFunction = Callable[[str, JSONDict], None]
"""A router's child reports a state (``loading``, ``ready``) with its payload."""

#: Body llama.cpp sends from every endpoint while the model is still loading.
LOADING_BODY: Final[JSONDict] = {
    "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
}

_CHAT_PATHS: Final = frozenset({"/v1/chat/completions", "/chat/completions"})
_COMPLETIONS_PATHS: Final = frozenset({"/v1/completions", "/completions"})
_NATIVE_COMPLETION_PATHS: Final = frozenset({"/completion"})
_EMBEDDING_PATHS: Final = frozenset({"/v1/embeddings", "/embeddings", "/embedding"})
_RERANK_PATHS: Final = frozenset({"/v1/rerank", "/v1/reranking", "/rerank", "/reranking"})
#: llama-server GET routes the fake answers by describing the request (see _echo).
_SLOT_PATH: Final = re.compile("/slots/[^/]+")
_ECHO_GETS: Final = frozenset({"/lora-adapters", "/tools", "/cors-proxy", "/v1/stream"})
#: Paths llama-server serves without a key even when it has ``--api-key``.
_PUBLIC_PATHS: Final = frozenset({"/health", "/v1/health"})
#: llama-server's answer to a missing or wrong key.
UNAUTHORIZED_BODY: Final[JSONDict] = {
    "error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}
}
#: llama-server's answer to ``GET /metrics`` when it was started without ``--metrics``.
NO_METRICS_BODY: Final[JSONDict] = {
    "error": {
        "code": 501,
        "message": "This server does not support metrics endpoint. Start it with `--metrics`",
        "type": "not_supported_error",
    }
}
#: Paths answered even while loading, so callers can discover the model early.
_ALWAYS_AVAILABLE_GETS: Final = frozenset({"/v1/models", "/models", "/fake/stats", "/fake/env"})

_EMBEDDING_SIZE: Final = 8
_PROMPT_MS_PER_TOKEN: Final = 0.5
_FINGERPRINT: Final = "b0000-fake"


class HTTPRequest(Protocol):
    """The parts of L{twisted.web.server.Request} used here, with types.

    Twisted's own ``Request`` methods are unannotated, which ``mypy --strict``
    rejects; this protocol documents (and types) what the fake relies on.
    """

    method: bytes
    uri: bytes
    path: bytes
    args: dict[bytes, list[bytes]] | None
    content: IO[bytes] | None
    code: int
    requestHeaders: Headers
    transport: Any

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...
    def setHeader(self, name: bytes, value: bytes) -> None: ...
    def getHeader(self, key: bytes) -> bytes | None: ...
    def getClientAddress(self) -> IAddress: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...
    def notifyFinish(self) -> Deferred[None]: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


def _noop_log(line: str) -> None:
    """Discard a log line (the in-memory default: tests rarely want output)."""


class _BadRequest(Exception):
    """A client error that should be reported as a llama.cpp-style 400."""


@dataclass(frozen=True)
class FakeControls:
    """Per-request knobs read from the request body's ``"fake"`` object.

    They let a test script upstream behaviour (slow, failing, crashing or
    never-ending generations) without restarting the fake server.
    """

    tokens: int
    delay: float
    status: int | None = None
    crash_after_tokens: int | None = None
    hold: bool = False

    @classmethod
    def from_body(cls, body: JSONDict, tokens: int, delay: float) -> FakeControls:
        """Parse ``body["fake"]``, falling back to the server defaults."""
        raw = body.get("fake")
        if raw is None:
            return cls(tokens=tokens, delay=delay)
        if not isinstance(raw, dict):
            raise _BadRequest('"fake" must be an object')
        return cls(
            tokens=_int_field(raw, "tokens", tokens, minimum=0),
            delay=_float_field(raw, "delay", delay),
            status=_optional_int_field(raw, "status", minimum=100),
            crash_after_tokens=_optional_int_field(raw, "crash_after_tokens", minimum=0),
            hold=_bool_field(raw, "hold"),
        )


def _int_field(raw: JSONDict, key: str, default: int, minimum: int) -> int:
    value = _optional_int_field(raw, key, minimum)
    return default if value is None else value


def _optional_int_field(raw: JSONDict, key: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _BadRequest(f'"fake.{key}" must be an integer >= {minimum}')
    return value


def _float_field(raw: JSONDict, key: str, default: float) -> float:
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _BadRequest(f'"fake.{key}" must be a number >= 0')
    return float(value)


def _bool_field(raw: JSONDict, key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise _BadRequest(f'"fake.{key}" must be a boolean')
    return value


@dataclass(eq=False)
class _Generation:
    """One in-flight text generation (a llama.cpp "task" on slot 0)."""

    task_id: int
    kind: str  # "chat", "completions" or "completion"
    request: HTTPRequest
    controls: FakeControls
    requested_model: str
    prompt_tokens: int
    stream: bool
    created: int
    emitted: int = 0
    done: bool = False
    pending: IDelayedCall | None = field(default=None, repr=False)
    prompt_words: list[str] = field(default_factory=list)
    slot: _Slot | None = None
    cache_n: int = 0
    began: bool = False  # has a slot (with ``queue_slots``, it may wait for one)
    blocked: bool = False  # a write of it waits for the client (``blocking_writes``)

    def cancel_pending(self) -> None:
        """Drop the scheduled next step, if any."""
        if self.pending is not None and self.pending.active():
            self.pending.cancel()
        self.pending = None


@implementer(IPushProducer)
class _BlockingWrites:
    """Told by the connection when its client stops (and starts again) reading."""

    def __init__(self, server: FakeLlamaServer, generation: _Generation) -> None:
        self.server = server
        self.generation = generation

    def pauseProducing(self) -> None:
        self.server.write_blocked(self.generation)

    def resumeProducing(self) -> None:
        self.server.write_unblocked(self.generation)

    def stopProducing(self) -> None:
        pass  # the connection is lost: notifyFinish says so


@dataclass(eq=False)
class _Slot:
    """One llama.cpp slot: the tokens its KV cache holds (words, in the fake)."""

    id: int
    tokens: list[str] = field(default_factory=list)
    prompt: str | None = None  # the last task's prompt, as /slots shows it
    used: float = 0.0

    def describe(self, processing: bool) -> JSONDict:
        described: JSONDict = {"id": self.id, "n_ctx": 4096, "is_processing": processing}
        if self.prompt is not None:
            described.update({"n_prompt_tokens": len(self.tokens), "prompt": self.prompt})
        return described


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@implementer(IResource)
class _RootResource:
    """Leaf resource handing every request to its :class:`FakeLlamaServer`."""

    isLeaf = True

    def __init__(self, server: FakeLlamaServer) -> None:
        self._server = server

    def getChildWithDefault(self, name: bytes, request: object) -> IResource:
        """Never called for a leaf; present because L{IResource} demands it."""
        return self

    def putChild(self, path: bytes, child: IResource) -> None:
        """The fake's routes are fixed."""
        raise NotImplementedError("FakeLlamaServer routes are fixed")

    def render(self, request: object) -> bytes | int:
        """Dispatch to the server (Twisted passes a L{twisted.web.server.Request})."""
        return self._server.render(cast(HTTPRequest, request))


class FakeLlamaServer:
    """State and behaviour of one fake llama-server.

    All time comes from ``clock`` so unit tests can drive loading and token
    streaming with :class:`twisted.internet.task.Clock`.

    @param clock: time source for loading and token pacing.
    @param model: the served model name (llama.cpp's model path or alias).
    @param load_time: seconds from :meth:`start` until ``/health`` is 200.
    @param token_delay: default seconds between generated tokens.
    @param prompt_time: seconds a generation spends on its prompt before anything
        is answered (as llama-server's prompt processing), so the time to the first
        token is not just the proxy's few milliseconds.
    @param queue_slots: at most ``parallel`` generations run at once; the others
        wait for a slot in arrival order, as in llama-server (by default any number
        run side by side).
    @param tokens: default number of generated tokens.
    @param hang_health: never finish loading, so ``/health`` stays 503.
    @param log: receives llama.cpp-like log lines (the CLI prints them).
    @param on_crash: called for ``crash_after_tokens``; the CLI exits the
        process.  When ``None`` the client connection is aborted instead.
    @param api_keys: like ``--api-key``: every path but the health checks (and
        the fake's own ``/fake/...``) then needs one, as ``Authorization: Bearer``
        or ``X-Api-Key``.
    @param metrics: like ``--metrics``: serve ``GET /metrics`` in llama-server's
        format (a few ``llamacpp:*`` families); without it the answer is 501.
    @param blocking_writes: a streamed answer writes as llama-server's HTTP threads
        do, blocking while the client does not read: the generation waits for the
        client, and :meth:`writes_unblocked` (what the CLI's exit waits for, as
        llama-server's exit joins its HTTP threads) fires only once no write waits.
    """

    def __init__(
        self,
        clock: IReactorTime,
        model: str = "fake",
        *,
        load_time: float = 0.0,
        token_delay: float = 0.01,
        prompt_time: float = 0.0,
        queue_slots: bool = False,
        tokens: int = 8,
        hang_health: bool = False,
        log: LogFunction | None = None,
        on_crash: Callable[[], None] | None = None,
        api_keys: Sequence[str] = (),
        slot_save_path: str | None = None,
        parallel: int = 1,
        on_state: StateFunction | None = None,
        metrics: bool = False,
        api_prefix: str = "",
        blocking_writes: bool = False,
        on_damaged_slot: Callable[[], None] | None = None,
    ) -> None:
        self.clock = clock
        #: called when a slot file to restore cannot be read, instead of answering
        #: 400 (llama-server 0.3.36 aborts there: the CLI's --abort-on-damaged-slot)
        self._on_damaged_slot = on_damaged_slot
        self.blocking_writes = blocking_writes
        self._unblocked: list[Deferred[None]] = []  # waiting for no write to block
        #: like ``--api-prefix``: the routes are served under it too
        self.api_prefix = api_prefix.rstrip("/")
        #: like ``--slot-save-path``: slots keep their prompt (prefix reuse shows as
        #: ``timings.cache_n``) and ``POST /slots/{id}?action=save|restore`` works
        self.slot_save_path = slot_save_path
        self.slots: list[_Slot] = [_Slot(i) for i in range(parallel)]
        self.build_info = _FINGERPRINT  # /props: a restore is valid for one build only
        self.metrics = metrics
        #: What ``GET /metrics`` reports: tokens of finished or cancelled generations.
        self.prompt_tokens_total = 0
        self.tokens_predicted_total = 0
        self.api_keys = frozenset(api_keys)
        self.model = model
        self.load_time = load_time
        self.token_delay = token_delay
        self.prompt_time = prompt_time
        self.queue_slots = queue_slots
        self._deferred: deque[_Generation] = deque()  # waiting for a slot
        self.tokens = tokens
        self.hang_health = hang_health
        self._log: LogFunction = log if log is not None else _noop_log
        self._on_crash = on_crash
        self._on_state = on_state
        self.ready = False
        self.started = False
        #: Counters reported by ``GET /fake/stats``.
        self.requests = 0
        self.cancelled = 0
        self.completed = 0
        self.crashed = 0
        self._task_ids = 0
        self._generations: set[_Generation] = set()
        self._timers: list[IDelayedCall] = []

    # -- lifecycle ----------------------------------------------------------

    @property
    def active(self) -> int:
        """Number of generations currently in progress."""
        return len(self._generations)

    def start(self, on_ready: Callable[[], None] | None = None) -> None:
        """Begin "loading the model"; become ready ``load_time`` seconds later."""
        if self.started:
            return
        self.started = True
        self._log("main: loading model")
        self._log(
            f"llama_model_loader: loaded meta data with 32 key-value pairs"
            f" and 291 tensors from {self.model}.gguf (version GGUF V3 (latest))"
        )
        self._log("llama_model_load: loading model tensors, this can take a while...")
        self._loading(0.0)
        if self.load_time > 0:
            for percent in (25, 50, 75):
                self._timers.append(
                    self.clock.callLater(self.load_time * percent / 100, self._progress, percent)
                )
        if self.hang_health:
            return
        if self.load_time > 0:
            self._timers.append(self.clock.callLater(self.load_time, self._become_ready, on_ready))
        else:
            self._become_ready(on_ready)

    def stop(self) -> None:
        """Cancel every pending timer so nothing outlives the server."""
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for generation in self._generations:
            generation.cancel_pending()

    def writes_unblocked(self) -> Deferred[None]:
        """Fires once no streamed answer waits for its client to read."""
        waiter: Deferred[None] = Deferred()
        self._unblocked.append(waiter)
        self._check_unblocked()
        return waiter

    def _check_unblocked(self) -> None:
        if any(g.blocked for g in self._generations):
            return
        waiters, self._unblocked = self._unblocked, []
        for waiter in waiters:
            waiter.callback(None)

    def write_blocked(self, generation: _Generation) -> None:
        """The client stopped reading: the generation's thread waits in its write."""
        if generation.done or generation.blocked:
            return
        generation.blocked = True
        generation.cancel_pending()
        self._log(f"srv  send: task {generation.task_id} blocked writing to a slow client")

    def write_unblocked(self, generation: _Generation) -> None:
        if not generation.blocked:
            return
        generation.blocked = False
        if not generation.done and generation.pending is None:
            self._schedule(generation, self._stream_step)
        self._check_unblocked()

    def _progress(self, percent: int) -> None:
        self._log(f"llama_model_load: progress {percent}%")
        self._loading(percent / 100)

    def _loading(self, value: float) -> None:
        if self._on_state is not None:
            stage = "text_model"
            self._on_state("loading", {"stages": [stage], "current": stage, "value": value})

    def _become_ready(self, on_ready: Callable[[], None] | None) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self.ready = True
        self._log("llama_model_load: progress 100%")
        self._loading(1.0)
        self._log("main: model loaded")
        if on_ready is not None:
            on_ready()
        if self._on_state is not None:  # llama-server says so once it listens
            self._on_state("ready", self._models()["data"][0])

    def stats(self) -> JSONDict:
        """Counters for ``GET /fake/stats`` (and for in-memory assertions)."""
        return {
            "model": self.model,
            "pid": os.getpid(),
            "argv": list(sys.argv),
            "requests": self.requests,
            "active": self.active,
            "cancelled": self.cancelled,
            "completed": self.completed,
            "crashed": self.crashed,
            "ready": self.ready,
            "blocked": sum(1 for g in self._generations if g.blocked),
        }

    def resource(self) -> IResource:
        """The root web resource serving this fake's whole HTTP API."""
        return _RootResource(self)

    # -- dispatch -----------------------------------------------------------

    def render(self, request: HTTPRequest) -> bytes | int:
        """Route one request; returns a body or ``NOT_DONE_YET``."""
        # percent escapes (%uXXXX too) decoded before routing, as cpp-httplib does
        path = server_unquote(request.path).decode("utf-8", "replace")
        if self.api_prefix and path.startswith(self.api_prefix + "/"):
            path = path[len(self.api_prefix) :]
        method = request.method.decode("ascii", "replace")
        if method != method.upper():
            # llama-server's HTTP library knows methods in capitals only
            request.setResponseCode(400)
            return b""
        request.setHeader(b"x-fake-served-by", self.model.encode("utf-8"))
        if not path.startswith("/fake/") and path not in _PUBLIC_PATHS:
            request.notifyFinish().addBoth(self._log_request, request, method, path)
        if method == "OPTIONS":
            # as llama-server: a preflight is answered before any other check
            request.setHeader(b"access-control-allow-origin", b"*")
            request.setHeader(b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS")
            request.setHeader(b"access-control-allow-headers", b"*")
            request.setHeader(b"content-type", b"text/html")
            return b""
        if not self._authorized(request, path):
            return _json(request, 401, UNAUTHORIZED_BODY)
        if method in ("GET", "HEAD"):
            return self._render_get(request, path)
        self.requests += 1
        if not self.ready:
            return _json(request, 503, LOADING_BODY)
        body = request.content.read() if request.content is not None else b""
        try:
            if path in _CHAT_PATHS:
                return self._generate(request, "chat", _parse_json(body))
            if path in _COMPLETIONS_PATHS:
                return self._generate(request, "completions", _parse_json(body))
            if path in _NATIVE_COMPLETION_PATHS:
                return self._generate(request, "completion", _parse_json(body))
            if path in _EMBEDDING_PATHS:
                return self._embeddings(request, _parse_json(body))
            if path in _RERANK_PATHS:
                return self._rerank(request, _parse_json(body))
            if path.startswith("/slots/") and not _SLOT_PATH.fullmatch(path):
                # llama-server's /slots/:id_slot is one segment: /slots/0/.. is no route
                return _json(request, 404, _error(404, "File Not Found", "not_found_error"))
            if path.startswith("/slots/") and self.slot_save_path is not None:
                return self._slot_action(request, path, _parse_json(body) if body else {})
            return self._echo(request, method, path, body)
        except _BadRequest as e:
            return _json(
                request,
                400,
                {"error": {"code": 400, "message": str(e), "type": "invalid_request_error"}},
            )

    def _authorized(self, request: HTTPRequest, path: str) -> bool:
        if not self.api_keys or path in _PUBLIC_PATHS or path.startswith("/fake/"):
            return True
        given = request.getHeader(b"authorization") or request.getHeader(b"x-api-key") or b""
        key = given.decode("latin-1").removeprefix("Bearer ")
        return key in self.api_keys

    def _log_request(self, result: object, request: HTTPRequest, method: str, path: str) -> None:
        address = request.getClientAddress()
        host = getattr(address, "host", "-")
        self._log(f"srv  log_server_r: request: {method} {path} {host} {request.code}")

    def _render_get(self, request: HTTPRequest, path: str) -> bytes:
        if not self.ready and path not in _ALWAYS_AVAILABLE_GETS:
            return _json(request, 503, LOADING_BODY)
        if path in ("/health", "/v1/health"):
            return _json(request, 200, {"status": "ok"})
        if path in ("/v1/models", "/models"):
            return _json(request, 200, self._models())
        if path == "/props":
            return _json(request, 200, self._props())
        if path == "/slots":
            if self.slot_save_path is None:
                return _json(request, 200, [{"id": 0, "is_processing": self.active > 0}])
            busy = {g.slot.id for g in self._generations if g.slot is not None}
            return _json(request, 200, [s.describe(s.id in busy) for s in self.slots])
        if path in _ECHO_GETS:
            return self._echo(request, "GET", path, b"")
        if path == "/metrics":
            return self._metrics(request)
        if path == "/fake/stats":
            return _json(request, 200, self.stats())
        if path == "/fake/env":
            names = request.args.get(b"name") if request.args else None
            if not names:
                return _json(request, 400, _error(400, "missing ?name=", "invalid_request_error"))
            name = names[0].decode("utf-8", "replace")
            return _json(request, 200, {"name": name, "value": os.environ.get(name)})
        return _json(request, 404, _error(404, "File Not Found", "not_found_error"))

    def _metrics(self, request: HTTPRequest) -> bytes:
        """llama-server's Prometheus text (a subset of its families), or its 501."""
        if not self.metrics:
            return _json(request, 501, NO_METRICS_BODY)
        families = (
            (
                "prompt_tokens_total",
                "counter",
                "Number of prompt tokens processed, excluding cached tokens",
                self.prompt_tokens_total,
            ),
            (
                "tokens_predicted_total",
                "counter",
                "Number of generation tokens processed",
                self.tokens_predicted_total,
            ),
            ("requests_processing", "gauge", "Number of requests processing", self.active),
        )
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/plain; version=0.0.4")
        return "".join(
            f"# HELP llamacpp:{name} {text}\n# TYPE llamacpp:{name} {kind}\n"
            f"llamacpp:{name} {value}\n"
            for name, kind, text, value in families
        ).encode("utf-8")

    def _models(self) -> JSONDict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model,
                    "object": "model",
                    "created": int(self.clock.seconds()),
                    "owned_by": "llamacpp",
                    "meta": {"fake": True, "n_ctx_train": 4096, "n_embd": _EMBEDDING_SIZE},
                }
            ],
        }

    def _props(self) -> JSONDict:
        return {
            "default_generation_settings": {
                "n_ctx": 4096,
                "params": {"n_predict": -1, "temperature": 0.8, "stream": False},
            },
            "total_slots": 1,
            "model_path": f"{self.model}.gguf",
            "build_info": self.build_info,
            "fake": True,
        }

    # -- generation ---------------------------------------------------------

    def _generate(self, request: HTTPRequest, kind: str, body: JSONDict) -> bytes | int:
        controls = FakeControls.from_body(body, self.tokens, self.token_delay)
        if controls.status is not None:
            return _json(request, controls.status, _upstream_error(controls.status))
        requested = body.get("model")
        self._task_ids += 1
        generation = _Generation(
            task_id=self._task_ids,
            kind=kind,
            request=request,
            controls=controls,
            requested_model="null" if requested is None else str(requested),
            prompt_tokens=_count_prompt_tokens(kind, body),
            stream=body.get("stream") is True,
            created=int(self.clock.seconds()),
            prompt_words=_prompt_words(kind, body),
        )
        self._generations.add(generation)
        request.notifyFinish().addErrback(self._client_gone, generation)
        if self.queue_slots and self._running() >= len(self.slots):
            self._deferred.append(generation)
            self._log(f"que    post: new task, id = {generation.task_id}, deferred")
        else:
            self._begin(generation)
        return NOT_DONE_YET

    def _running(self) -> int:
        return sum(1 for g in self._generations if g.began)

    def _begin(self, generation: _Generation) -> None:
        """A slot is the generation's: process its prompt, then answer."""
        generation.began = True
        if self.slot_save_path is not None:
            self._take_slot(generation)
        self._log(
            f"slot launch_slot_: id  0 | task {generation.task_id} | processing task"
            f" (n_prompt_tokens = {generation.prompt_tokens})"
        )
        if self.prompt_time > 0:
            generation.pending = self.clock.callLater(self.prompt_time, self._answer, generation)
        else:
            self._answer(generation)

    def _answer(self, generation: _Generation) -> None:
        """The prompt is processed: stream the answer, or schedule the whole of it."""
        generation.pending = None
        request, controls = generation.request, generation.controls
        if generation.stream:
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
            if self.blocking_writes:
                request.registerProducer(_BlockingWrites(self, generation), True)
            _write_event(request, self._first_chunk(generation))
            if controls.crash_after_tokens == 0:
                self._crash(generation)
            else:
                self._schedule(generation, self._stream_step)
            return
        crash_after = controls.crash_after_tokens
        if crash_after is not None and crash_after < controls.tokens:
            generation.pending = self.clock.callLater(
                crash_after * controls.delay, self._crash, generation
            )
        elif not controls.hold:
            total = controls.tokens * controls.delay
            if total > 0:
                generation.pending = self.clock.callLater(total, self._finish_plain, generation)
            else:
                self._finish_plain(generation)

    def _take_slot(self, generation: _Generation) -> None:
        """As llama-server: the idle slot sharing the longest prefix, else the least
        recently used; the shared prefix is not evaluated again (``cache_n``)."""
        busy = {g.slot.id for g in self._generations if g.slot is not None}
        idle = [s for s in self.slots if s.id not in busy] or self.slots
        words = generation.prompt_words
        slot = max(idle, key=lambda s: (_common_prefix(s.tokens, words), -s.used))
        if _common_prefix(slot.tokens, words) == 0:
            slot = min(idle, key=lambda s: s.used)
        generation.slot = slot
        generation.cache_n = min(_common_prefix(slot.tokens, words), max(0, len(words) - 1))
        slot.tokens = list(words)
        slot.prompt = " ".join(words)
        slot.used = self.clock.seconds()

    def _slot_action(self, request: HTTPRequest, path: str, body: JSONDict) -> bytes:
        """``POST /slots/{id}?action=save|restore`` with ``{"filename": ...}``: real files."""
        assert self.slot_save_path is not None
        try:
            slot = self.slots[int(path.removeprefix("/slots/"))]
        except (ValueError, IndexError):
            raise _BadRequest("Invalid slot ID") from None
        actions = request.args.get(b"action") if request.args else None
        action = actions[-1].decode() if actions else ""  # the last, as llama-server
        if action == "erase":
            erased, slot.tokens, slot.prompt = len(slot.tokens), [], None
            return _json(request, 200, {"id_slot": slot.id, "n_erased": erased})
        filename = body.get("filename")
        if not isinstance(filename, str) or not filename or "/" in filename or ".." in filename:
            raise _BadRequest("Invalid filename")
        where = os.path.join(self.slot_save_path, filename)
        if action == "save":
            payload = json.dumps({"fake_slot": slot.tokens}).encode()
            with open(where, "wb") as file:
                file.write(payload)
            return _json(
                request,
                200,
                {
                    "id_slot": slot.id,
                    "filename": filename,
                    "n_saved": len(slot.tokens),
                    "n_written": len(payload),
                    "timings": {"save_ms": 1.0},
                },
            )
        if action == "restore":
            try:
                with open(where, "rb") as file:
                    raw = file.read()
                tokens = json.loads(raw)["fake_slot"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                if self._on_damaged_slot is not None:
                    self._on_damaged_slot()
                slot.tokens, slot.prompt = [], None
                raise _BadRequest(f"Unable to restore slot: {e}") from None
            slot.tokens = [str(t) for t in tokens]
            slot.prompt = None  # as llama-server: no task has run in it since
            return _json(
                request,
                200,
                {
                    "id_slot": slot.id,
                    "filename": filename,
                    "n_restored": len(slot.tokens),
                    "n_read": len(raw),
                    "timings": {"restore_ms": 1.0},
                },
            )
        raise _BadRequest("Invalid action")

    def _schedule(self, generation: _Generation, step: Callable[[_Generation], None]) -> None:
        generation.pending = self.clock.callLater(generation.controls.delay, step, generation)

    def _stream_step(self, generation: _Generation) -> None:
        """Emit the next token, or the final chunk once all are out."""
        generation.pending = None
        controls = generation.controls
        if generation.emitted < controls.tokens:
            _write_event(generation.request, self._token_chunk(generation, generation.emitted))
            generation.emitted += 1
            if generation.emitted == controls.crash_after_tokens:
                self._crash(generation)
            elif generation.blocked:
                pass  # the next step comes once the client reads again
            elif generation.emitted < controls.tokens or not controls.hold:
                self._schedule(generation, self._stream_step)
            # else "hold": never finish; wait for the client to go away.
            return
        request = generation.request
        _write_event(request, self._final_chunk(generation))
        request.write(b"data: [DONE]\n\n")
        self._retire(generation)
        self.completed += 1
        if self.blocking_writes:
            request.unregisterProducer()
        request.finish()

    def _finish_plain(self, generation: _Generation) -> None:
        generation.pending = None
        generation.emitted = generation.controls.tokens
        request = generation.request
        payload = _json(request, 200, self._plain_response(generation))
        self._retire(generation)
        self.completed += 1
        request.write(payload)
        request.finish()

    def _crash(self, generation: _Generation) -> None:
        """Die mid-generation, like a llama-server hitting a GGML_ASSERT."""
        self._retire(generation)
        self.crashed += 1
        self._log(f"fake: crashing in task {generation.task_id} as requested")
        if self._on_crash is not None:
            self._on_crash()
            return
        transport = getattr(generation.request, "transport", None)
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif transport is not None:
            transport.loseConnection()

    def _client_gone(self, reason: Failure, generation: _Generation) -> None:
        """The client disconnected before we finished: stop generating."""
        if generation.done:
            return
        self._retire(generation)
        self.cancelled += 1
        self._log(f"srv  cancel_tasks: cancel task, id_task = {generation.task_id}")

    def _retire(self, generation: _Generation) -> None:
        if generation.slot is not None and not generation.done:
            text = self._reply_text(generation) + "".join(
                self._token(i) for i in range(generation.emitted)
            )
            # as a chat template would: the reply follows an assistant marker
            marker = ["<|assistant|>"] if generation.kind == "chat" else []
            generation.slot.tokens.extend(marker + text.split())
        generation.done = True
        if generation.blocked:  # its connection is gone: the write fails, the thread is free
            generation.blocked = False
            self._check_unblocked()
        self.prompt_tokens_total += generation.prompt_tokens
        self.tokens_predicted_total += generation.emitted
        generation.cancel_pending()
        self._generations.discard(generation)
        if generation in self._deferred:
            self._deferred.remove(generation)
        self._log(
            f"slot      release: id  0 | task {generation.task_id} | stop processing:"
            f" n_tokens = {generation.prompt_tokens + generation.emitted}, truncated = 0"
        )
        if not self._generations:
            self._log("srv  update_slots: all slots are idle")
        while self._deferred and self._running() < len(self.slots):
            self._begin(self._deferred.popleft())

    def _reply_text(self, generation: _Generation) -> str:
        """The deterministic prefix every reply starts with."""
        return f"fake-reply model={self.model} requested={generation.requested_model} tokens:"

    @staticmethod
    def _token(index: int) -> str:
        return f" t{index}"

    def _usage(self, generation: _Generation) -> JSONDict:
        return {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.emitted,
            "total_tokens": generation.prompt_tokens + generation.emitted,
        }

    def _timings(self, generation: _Generation) -> JSONDict:
        prompt_n = generation.prompt_tokens - generation.cache_n
        prompt_ms = prompt_n * _PROMPT_MS_PER_TOKEN
        predicted_n = generation.emitted
        predicted_ms = predicted_n * generation.controls.delay * 1000.0
        return {
            "cache_n": generation.cache_n,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_second": prompt_n * 1000.0 / prompt_ms if prompt_ms > 0 else 0.0,
            "predicted_n": predicted_n,
            "predicted_ms": predicted_ms,
            "predicted_per_second": (
                predicted_n * 1000.0 / predicted_ms if predicted_ms > 0 else 0.0
            ),
        }

    def _envelope(self, generation: _Generation, obj: str) -> JSONDict:
        prefix = "chatcmpl" if generation.kind == "chat" else "cmpl"
        return {
            "id": f"{prefix}-fake-{generation.task_id}",
            "object": obj,
            "created": generation.created,
            "model": self.model,
            "system_fingerprint": _FINGERPRINT,
        }

    def _plain_response(self, generation: _Generation) -> JSONDict:
        text = self._reply_text(generation) + "".join(
            self._token(i) for i in range(generation.emitted)
        )
        if generation.kind == "completion":
            return self._native(generation, text, stop=True)
        if generation.kind == "chat":
            choice: JSONDict = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            obj = "text_completion"
        return {
            **self._envelope(generation, obj),
            "choices": [choice],
            "usage": self._usage(generation),
            "timings": self._timings(generation),
        }

    def _native(self, generation: _Generation, content: str, *, stop: bool) -> JSONDict:
        """A llama.cpp native ``/completion`` response or chunk."""
        result: JSONDict = {"content": content, "stop": stop, "id_slot": 0, "index": 0}
        if stop:
            result.update(
                {
                    "model": self.model,
                    "tokens_predicted": generation.emitted,
                    "tokens_evaluated": generation.prompt_tokens,
                    "stop_type": "eos",
                    "timings": self._timings(generation),
                }
            )
        return result

    def _chunk(
        self,
        generation: _Generation,
        text: str | None,
        finish: str | None,
        *,
        first: bool = False,
    ) -> JSONDict:
        if generation.kind == "chat":
            delta: JSONDict = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": text}
            choice: JSONDict = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {**self._envelope(generation, obj), "choices": [choice]}

    def _first_chunk(self, generation: _Generation) -> JSONDict:
        """Sent at once, so headers reach the client before the first token."""
        text = self._reply_text(generation)
        if generation.kind == "completion":
            return self._native(generation, text, stop=False)
        return self._chunk(generation, text, None, first=True)

    def _token_chunk(self, generation: _Generation, index: int) -> JSONDict:
        if generation.kind == "completion":
            return self._native(generation, self._token(index), stop=False)
        return self._chunk(generation, self._token(index), None)

    def _final_chunk(self, generation: _Generation) -> JSONDict:
        if generation.kind == "completion":
            return self._native(generation, "", stop=True)
        chunk = self._chunk(generation, None, "stop")
        chunk["usage"] = self._usage(generation)
        chunk["timings"] = self._timings(generation)
        return chunk

    # -- other endpoints ----------------------------------------------------

    def _embeddings(self, request: HTTPRequest, body: JSONDict) -> bytes:
        controls = FakeControls.from_body(body, self.tokens, self.token_delay)
        if controls.status is not None:
            return _json(request, controls.status, _upstream_error(controls.status))
        raw = body.get("input", body.get("content"))
        if raw is None:
            raise _BadRequest('"input" is required')
        inputs = raw if isinstance(raw, list) else [raw]
        texts = [item if isinstance(item, str) else json.dumps(item) for item in inputs]
        prompt_tokens = sum(_count_words(text) for text in texts)
        self.completed += 1
        return _json(
            request,
            200,
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": _fake_embedding(text)}
                    for i, text in enumerate(texts)
                ],
                "model": self.model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            },
        )

    def _rerank(self, request: HTTPRequest, body: JSONDict) -> bytes:
        controls = FakeControls.from_body(body, self.tokens, self.token_delay)
        if controls.status is not None:
            return _json(request, controls.status, _upstream_error(controls.status))
        query = body.get("query")
        documents = body.get("documents", body.get("texts"))
        if not isinstance(query, str) or not isinstance(documents, list):
            raise _BadRequest('"query" (string) and "documents" (list) are required')
        results = []
        for index, document in enumerate(documents):
            text = document if isinstance(document, str) else json.dumps(document)
            results.append({"index": index, "relevance_score": _fake_score(query, text)})
        tokens = _count_words(query) + sum(_count_words(str(d)) for d in documents)
        self.completed += 1
        return _json(
            request,
            200,
            {
                "model": self.model,
                "object": "list",
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "results": results,
            },
        )

    def _echo(self, request: HTTPRequest, method: str, path: str, body: bytes) -> bytes:
        """Describe what arrived, so proxy tests can check what got forwarded."""
        content_type = request.getHeader(b"content-type")
        content_type_str = content_type.decode("latin-1") if content_type is not None else None
        model: str | None = None
        parsed: object = None
        if content_type_str is not None and content_type_str.lower().startswith("multipart/"):
            # twisted.web already parsed multipart/form-data into request.args.
            values = request.args.get(b"model") if request.args else None
            if values:
                model = values[0].decode("utf-8", "replace")
        else:
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                controls = FakeControls.from_body(parsed, self.tokens, self.token_delay)
                if controls.status is not None:
                    return _json(request, controls.status, _upstream_error(controls.status))
                if parsed.get("model") is not None:
                    model = str(parsed["model"])
        query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        headers = {
            name.decode("latin-1").lower(): values[0].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.completed += 1
        return _json(
            request,
            200,
            {
                "path": path,
                "method": method,
                "served_by": self.model,
                "model": model,
                "content_type": content_type_str,
                "body_length": len(body),
                "query": query,
                "headers": headers,
                "json": parsed if isinstance(parsed, dict) else None,
            },
        )


# -- helpers -------------------------------------------------------------------


def _json(request: HTTPRequest, status: int, obj: object) -> bytes:
    """Set status and JSON headers, returning the encoded body."""
    payload = json.dumps(obj).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % (len(payload),))
    return payload


def _write_event(request: HTTPRequest, obj: JSONDict) -> None:
    request.write(b"data: " + json.dumps(obj).encode("utf-8") + b"\n\n")


def _error(code: int, message: str, kind: str) -> JSONDict:
    return {"error": {"code": code, "message": message, "type": kind}}


def _upstream_error(code: int) -> JSONDict:
    return _error(code, "fake upstream error", "fake")


def _parse_json(body: bytes) -> JSONDict:
    try:
        parsed = json.loads(body)
    except ValueError as e:
        raise _BadRequest(f"invalid JSON body: {e}") from None
    except RecursionError:  # how deep it may go depends on the caller's stack
        raise _BadRequest("invalid JSON body: nested too deeply") from None
    if not isinstance(parsed, dict):
        raise _BadRequest("JSON body must be an object")
    return parsed


def _count_words(text: str) -> int:
    return len(text.split())


def _count_prompt_tokens(kind: str, body: JSONDict) -> int:
    """A cheap, deterministic stand-in for tokenising the prompt."""
    parts: list[str] = []
    if kind == "chat":
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(p["text"] for p in content if isinstance(p, dict) and "text" in p)
    else:
        prompt = body.get("prompt", body.get("content"))
        if isinstance(prompt, list):
            parts.extend(p if isinstance(p, str) else json.dumps(p) for p in prompt)
        elif prompt is not None:
            parts.append(str(prompt))
    return max(1, sum(_count_words(p) for p in parts))


def _prompt_words(kind: str, body: JSONDict) -> list[str]:
    """The prompt as the fake's tokens: role markers and words, in order."""
    if kind != "chat":
        prompt = body.get("prompt", body.get("content"))
        return str(prompt).split() if prompt is not None else []
    words: list[str] = []
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        words.append(f"<|{message.get('role')}|>")
        words.extend(_content_text(message.get("content")).split())
    return words


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and "text" in p)
    return ""


def _fake_embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [round(b / 127.5 - 1.0, 6) for b in digest[:_EMBEDDING_SIZE]]


def _fake_score(query: str, document: str) -> float:
    """Word overlap plus a small deterministic tie-breaker, in [0, 1]."""
    query_words = set(query.lower().split())
    overlap = len(query_words & set(document.lower().split())) / max(1, len(query_words))
    digest = hashlib.sha256(f"{query}\0{document}".encode()).digest()
    return round(0.9 * overlap + 0.1 * digest[0] / 255, 6)


# -- command line --------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    # No short options and no abbreviations: real llama-server flags such as
    # ``-hf`` or ``--model-draft`` must be ignored, not mistaken for ours.
    parser = argparse.ArgumentParser(
        prog="python -m llamaswap.testing.fake_server",
        description="Fake llama-server for tests; unknown llama-server flags are ignored.",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="fake", help="served model name")
    parser.add_argument("--load-time", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--token-delay", type=float, default=0.01, metavar="SECONDS")
    parser.add_argument("--tokens", type=int, default=8, metavar="N")
    parser.add_argument(
        "--prompt-time", type=float, default=0.0, metavar="SECONDS", help="before each answer"
    )
    parser.add_argument("--hang-health", action="store_true", help="never finish loading")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--fail-start", type=int, metavar="CODE", help="exit with CODE at once")
    parser.add_argument(
        "--crash-after", type=float, metavar="SECONDS", help="os._exit(3) this long after ready"
    )
    parser.add_argument("--log-spam", type=int, default=0, metavar="N")
    parser.add_argument(
        "--say-first",
        action="append",
        default=[],
        metavar="LINE",
        help="a router's child: write LINE on stdout before its own state lines (a hostile "
        "or broken child's protocol lines)",
    )
    parser.add_argument("--embedding", "--embeddings", action="store_true", help="no effect")
    parser.add_argument("--reranking", "--rerank", action="store_true", help="no effect")
    parser.add_argument("--slot-save-path", metavar="DIR", help="save/restore slots here")
    parser.add_argument(
        "--abort-on-damaged-slot",
        action="store_true",
        help="abort (SIGABRT) restoring a slot file that cannot be read, as llama-server 0.3.36",
    )
    parser.add_argument("--api-prefix", default="", metavar="PREFIX", help="serve under it")
    parser.add_argument("--parallel", "-np", type=int, default=1, metavar="N", help="slots")
    parser.add_argument(
        "--queue-slots", action="store_true", help="more than --parallel answers wait for a slot"
    )
    parser.add_argument(
        "--metrics", action="store_true", help="serve GET /metrics (else 501), as llama-server"
    )
    parser.add_argument(
        "--blocking-writes",
        action="store_true",
        help="a stream waits for its client to read, and no exit (the command, SIGTERM) "
        "ends the process while one waits, as llama-server's HTTP threads",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LLAMA_API_KEY", ""),
        metavar="KEY[,KEY...]",
        help="keys clients must send (default: $LLAMA_API_KEY), as llama-server",
    )
    return parser


def _stderr(line: str) -> None:
    """Write one log line to stderr at once, as llama.cpp does."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _abort_restoring() -> None:
    _stderr("/fake/llama-context.cpp:1: GGML_ASSERT(slot file is damaged) failed")
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left behind
    os.abort()


def _hard_exit(code: int, why: str) -> None:
    _stderr(why)
    os._exit(code)


ROUTER_PORT_ENV: Final = "LLAMA_SERVER_ROUTER_PORT"
STATE_PREFIX: Final = b"cmd_child_to_router:state:"
EXIT_COMMAND: Final = b"cmd_router_to_child:exit"


class _RouterLink(LineOnlyReceiver):
    """A router's child's stdin and stdout, as in llama-server's ``server_child``."""

    delimiter = b"\n"

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop
        self._exiting = False

    def notify(self, state: str, payload: JSONDict) -> None:
        """One state line; the newline first ends whatever stdout left open."""
        document = json.dumps({"payload": payload, "state": state}).encode("utf-8")
        assert self.transport is not None
        self.transport.write(b"\n" + STATE_PREFIX + document + b"\n")

    def say(self, line: bytes) -> None:
        """Any line on stdout (``--say-first``)."""
        assert self.transport is not None
        self.transport.write(line + b"\n")

    def lineReceived(self, line: bytes) -> None:
        if EXIT_COMMAND in line and not self._exiting:
            self._exiting = True
            _stderr("srv  operator(): exit command received, exiting...")
            self._stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._exiting:  # the router is gone
            _hard_exit(1, "srv  operator(): EOF on stdin detected, forcing shutdown...")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake server on the global reactor until SIGTERM/SIGINT."""
    args, ignored = _build_parser().parse_known_args(argv)

    from twisted.internet import reactor
    from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorThreads
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    # Only surface Twisted warnings/errors (e.g. tracebacks), never chatter.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)]
            )
        ],
        redirectStandardIO=False,
    )

    core = IReactorCore(reactor)
    tcp = IReactorTCP(reactor)
    clock = IReactorTime(reactor)

    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # Twisted installs its own SIGTERM handler once running; undo that.
        core.callWhenRunning(signal.signal, signal.SIGTERM, signal.SIG_IGN)

    _stderr(f"build: 0 ({_FINGERPRINT}) with fake compiler for fake target")
    _stderr(f"system info: n_threads = 1, pid = {os.getpid()} | FAKE = 1 |")
    if ignored:
        _stderr(f"fake: ignoring unsupported arguments: {' '.join(ignored)}")
    for i in range(args.log_spam):
        _stderr(f"llama_model_loader: - kv {i:3d}: fake.spam.{i} str = {'x' * 32}")

    if args.slot_save_path is not None and not os.path.isdir(args.slot_save_path):
        _stderr(
            'error while handling argument "--slot-save-path": '
            f"not a directory: {args.slot_save_path}"
        )
        return 1
    if args.fail_start is not None:
        _stderr("main: loading model")
        _stderr(
            f"llama_model_load: error loading model: fake failure (--fail-start {args.fail_start})"
        )
        _stderr("llama_model_load_from_file_impl: failed to load model")
        _stderr("main: exiting due to model loading error")
        return int(args.fail_start)

    def on_crash() -> None:
        _stderr("/fake/ggml.c:1: GGML_ASSERT(fake crash_after_tokens) failed")
        # Give already-written tokens a moment to leave the socket buffer.
        clock.callLater(0.05, _hard_exit, 7, "fake: exiting with code 7")

    stopping: list[bool] = []

    def stop_once() -> None:
        if not stopping:
            stopping.append(True)
            core.stop()

    link = None
    if os.environ.get(ROUTER_PORT_ENV) is not None:
        link = _RouterLink(stop_once)
        StandardIO(link, reactor=reactor)
        for line in args.say_first:
            link.say(line.encode("utf-8", errors="surrogateescape"))

    server = FakeLlamaServer(
        clock,
        args.model,
        load_time=args.load_time,
        token_delay=args.token_delay,
        prompt_time=args.prompt_time,
        queue_slots=args.queue_slots,
        tokens=args.tokens,
        hang_health=args.hang_health,
        log=_stderr,
        on_crash=on_crash,
        api_keys=[key for key in args.api_key.split(",") if key],
        slot_save_path=args.slot_save_path,
        parallel=args.parallel,
        on_state=link.notify if link is not None else None,
        metrics=args.metrics,
        api_prefix=args.api_prefix,
        blocking_writes=args.blocking_writes,
        on_damaged_slot=_abort_restoring if args.abort_on_damaged_slot else None,
    )
    site = Site(server.resource())
    site.noisy = False
    try:
        port = tcp.listenTCP(args.port, site, interface=args.host)  # type: ignore[arg-type]
    except Exception as e:
        _stderr(f"main: couldn't bind HTTP server socket, hostname: {args.host}, port: {args.port}")
        _stderr(f"fake: {e}")
        return 1
    address = port.getHost()
    actual_port = address.port if isinstance(address, IPv4Address | IPv6Address) else args.port
    _stderr(
        f"main: HTTP server is listening, hostname: {args.host}, port: {actual_port},"
        " http threads: 1"
    )

    def on_ready() -> None:
        _stderr(
            f"main: server is listening on http://{args.host}:{actual_port}"
            " - starting the main loop"
        )
        _stderr("srv  update_slots: all slots are idle")
        if args.crash_after is not None:
            clock.callLater(
                args.crash_after, _hard_exit, 3, "fake: crashing as requested (--crash-after)"
            )

    def on_shutdown() -> Deferred[None] | None:
        _stderr("srv    operator(): operator(): cleaning up before exit...")
        server.stop()
        if not args.blocking_writes:
            return None
        # llama-server joins its HTTP threads: one blocked in a write holds the exit
        return server.writes_unblocked()

    if args.blocking_writes:
        # a second stop (SIGTERM after the exit command) changes nothing, as there
        core.callWhenRunning(
            signal.signal,
            signal.SIGTERM,
            lambda *_: IReactorThreads(reactor).callFromThread(stop_once),
        )
    core.addSystemEventTrigger("before", "shutdown", on_shutdown)
    core.callWhenRunning(server.start, on_ready)
    core.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
