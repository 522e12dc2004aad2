"""Every HTTP route llamaswap serves, in two tables.

``MODEL_ROUTES``: the routes relayed to a model, every llama-server route at its own
path, so a client written for one ``llama-server`` keeps working when llamaswap
stands where the server stood.  ``API_ROUTES``: the routes llamaswap answers itself
(management, observability, logs, documentation, the UI).

These tables are the one place that lists the routes, their methods, parameters and
answers, and which are open without a key: ``api.py`` registers a Klein route for
each entry, ``openapi.py`` builds the OpenAPI document from them, ``guard.py`` takes
its open pages from them, the docs list them.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from enum import Enum
from typing import Any
from urllib.parse import unquote

import attrs


class Body(Enum):
    """How a route's request body names its model."""

    #: a JSON object (or a multipart form) whose ``model`` picks the model; the
    #: model's filters and ``useModelName`` apply to it
    JSON = "json"
    #: the child's business (a JSON list, an empty body, any bytes): relayed as it
    #: came; ``model`` is read from it only if it is a JSON object
    OPAQUE = "opaque"


@attrs.frozen
class ModelRoute:
    """One path llamaswap relays to the model a request names."""

    path: str  # OpenAPI style: ``/slots/{id_slot}``
    methods: tuple[str, ...]
    summary: str
    tag: str = "llama-server"
    body: Body = Body.JSON
    #: streamed requests for a model that is still loading may get its progress
    loading: bool = False
    #: also served by servers other than llama-server (not in its route list)
    llama_server: bool = True
    #: methods only an ``admin`` key may use: they change the server for everyone who
    #: uses the model (settings, adapters, slots), run tools on the box or fetch URLs
    #: from it (``/cors-proxy``: a request forger inside the LAN)
    admin_methods: tuple[str, ...] = ()
    #: answers with what it fetched from other sites: sandboxed even for a model
    #: whose own pages are trusted (``trustedPages``)
    foreign_pages: bool = False
    #: what a model must be for (its ``capabilities``) to take this route's requests
    #: that name no model, loaded or started for them: the embeddings model beside
    #: the chat model is not the one a llama-server chat client meant
    capability: str = "chat"

    @property
    def inference_methods(self) -> frozenset[str]:
        """The methods an ``inference`` key may use (HEAD wherever GET is)."""
        free = {m for m in self.methods if m not in self.admin_methods}
        return frozenset(free | ({"HEAD"} if "GET" in free else set()))

    @property
    def rule(self) -> str:
        """The path as a werkzeug rule (``/slots/<id_slot>``)."""
        return _rule(self.path)

    @property
    def path_parameters(self) -> list[str]:
        """The names of the path's ``{parameters}``."""
        return re.findall(r"\{(\w+)\}", self.path)

    @property
    def allow(self) -> bytes:
        """The ``Allow`` header value: the methods, and OPTIONS."""
        return ", ".join((*self.methods, "OPTIONS")).encode("ascii")


_OPENAI = "OpenAI-compatible"
_ANTHROPIC = "Anthropic-compatible"
_POST = ("POST",)
_GET = ("GET",)

MODEL_ROUTES: tuple[ModelRoute, ...] = (
    # OpenAI-compatible, with and without /v1 (llama-server serves both)
    ModelRoute("/v1/chat/completions", _POST, "Chat completions", _OPENAI, loading=True),
    ModelRoute("/chat/completions", _POST, "Chat completions", _OPENAI, loading=True),
    ModelRoute("/v1/completions", _POST, "Text completions", _OPENAI),
    ModelRoute("/completions", _POST, "Text completions", _OPENAI),
    ModelRoute("/v1/responses", _POST, "Responses API", _OPENAI),
    ModelRoute("/responses", _POST, "Responses API", _OPENAI),
    ModelRoute("/v1/embeddings", _POST, "Embeddings", _OPENAI, capability="embeddings"),
    ModelRoute("/embeddings", _POST, "Embeddings (llama.cpp's own shape)", capability="embeddings"),
    ModelRoute("/embedding", _POST, "Embeddings (legacy path)", capability="embeddings"),
    ModelRoute("/v1/audio/transcriptions", _POST, "Speech to text (multipart form)", _OPENAI),
    ModelRoute("/audio/transcriptions", _POST, "Speech to text (multipart form)", _OPENAI),
    ModelRoute("/v1/chat/completions/input_tokens", _POST, "Count a chat request's prompt tokens"),
    ModelRoute("/chat/completions/input_tokens", _POST, "Count a chat request's prompt tokens"),
    ModelRoute("/v1/responses/input_tokens", _POST, "Count a Responses request's input tokens"),
    ModelRoute("/responses/input_tokens", _POST, "Count a Responses request's input tokens"),
    ModelRoute("/v1/chat/completions/control", _POST, "Control a running generation"),
    # reranking
    ModelRoute("/v1/rerank", _POST, "Reranking", capability="rerank"),
    ModelRoute("/v1/reranking", _POST, "Reranking", capability="rerank"),
    ModelRoute("/rerank", _POST, "Reranking", capability="rerank"),
    ModelRoute("/reranking", _POST, "Reranking", capability="rerank"),
    # Anthropic-compatible
    ModelRoute("/v1/messages", _POST, "Messages", _ANTHROPIC),
    ModelRoute("/v1/messages/count_tokens", _POST, "Token counting", _ANTHROPIC),
    # llama.cpp's own
    ModelRoute("/completion", _POST, "Native completion"),
    ModelRoute("/infill", _POST, "Code infill"),
    ModelRoute("/tokenize", _POST, "Text to tokens"),
    ModelRoute("/detokenize", _POST, "Tokens to text"),
    ModelRoute("/apply-template", _POST, "Render a chat as the model's prompt"),
    ModelRoute(
        "/props",
        ("GET", "POST"),
        "The server's properties (POST changes them)",
        admin_methods=_POST,
    ),
    ModelRoute("/slots", _GET, "The server's slots"),
    ModelRoute(
        "/slots/{id_slot}",
        _POST,
        "Save, restore or erase a slot (`?action=`)",
        body=Body.OPAQUE,
        admin_methods=_POST,
    ),
    ModelRoute(
        "/lora-adapters",
        ("GET", "POST"),
        "List or set LoRA adapters",
        body=Body.OPAQUE,
        admin_methods=_POST,
    ),
    ModelRoute("/tools", ("GET", "POST"), "Server-side tools", admin_methods=_POST),
    ModelRoute(
        "/cors-proxy",
        ("GET", "POST"),
        "The web UI's MCP proxy (fetches any URL)",
        body=Body.OPAQUE,
        admin_methods=("GET", "POST"),
        foreign_pages=True,
    ),
    ModelRoute("/v1/stream", ("GET", "DELETE"), "Resume or drop a resumable stream (`?id=`)"),
    ModelRoute("/v1/streams/lookup", _POST, "Find resumable streams"),
    # other servers' media routes
    ModelRoute("/v1/audio/speech", _POST, "Text to speech", _OPENAI, llama_server=False),
    ModelRoute("/v1/images/generations", _POST, "Image generation", _OPENAI, llama_server=False),
    ModelRoute(
        "/v1/images/edits", _POST, "Image edits (multipart form)", _OPENAI, llama_server=False
    ),
)


# a percent escape as llama-server's HTTP library (cpp-httplib) reads a path: ``%XX``
# a byte, ``%uXXXX`` the UTF-8 of that code point, and nothing for a surrogate
_ESCAPE = re.compile(rb"%u([0-9A-Fa-f]{4})|%([0-9A-Fa-f]{2})")


def _unescape(escape: re.Match[bytes]) -> bytes:
    wide, byte = escape.groups()
    if byte is not None:
        return bytes((int(byte, 16),))
    code = int(wide, 16)
    return b"" if 0xD800 <= code < 0xE000 else chr(code).encode("utf-8")


def server_unquote(path: bytes) -> bytes:
    """``path`` with its escapes decoded as llama-server decodes them before it
    matches a route: ``/%u0070rops`` and ``/pr%uD800ops`` are ``/props`` to it."""
    return _ESCAPE.sub(_unescape, path)


def served_path(target: bytes) -> str:
    """The path a model's server reads in ``target`` (a path, maybe with a query).

    llama-server decodes percent escapes before it matches a route (``/%73lots/0``
    is ``/slots/0``, :func:`server_unquote`); ``//`` and dot segments are folded too
    (another server, or a proxy on the way, may).  What a check must recognise
    whatever the client's spelling.
    """
    text = server_unquote(target.partition(b"?")[0]).decode("utf-8", errors="replace")
    return "/" + posixpath.normpath("/" + text.replace("\\", "/")).lstrip("/")


def capability_of(path: bytes) -> str | None:
    """What a model must be for to take a request to ``path`` that names none
    (None: not a model route at a fixed path)."""
    route = _BY_PATH.get(path.decode("latin-1"))
    return route.capability if route is not None else None


def routed_path(path: bytes) -> str:
    """The path llamaswap's own router matches in ``path`` (no query): percent escapes
    decoded and runs of ``/`` merged (it serves or redirects those as one), but a dot
    segment is a segment: ``/api/models/unload/../../../v1/models`` is the unload route."""
    text = unquote(path.decode("latin-1"), errors="replace")
    return re.sub("/{2,}", "/", text)


def path_pattern(path: str) -> str:
    """A route's OpenAPI path as a regular expression (``{name}``: one segment)."""
    return re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path))


def served_pattern(path: str) -> re.Pattern[str]:
    """What matches a :func:`served_path` that is the route ``path``, under any leading
    segments too (a server started with an ``--api-prefix`` serves its routes there)."""
    return re.compile("(?:/.*)?" + path_pattern(path))


def shows_foreign_pages(target: bytes) -> bool:
    """Whether a model's server answers ``target`` with pages fetched from elsewhere."""
    served = served_path(target)
    return any(pattern.fullmatch(served) is not None for pattern in _FOREIGN)


_BY_PATH = {route.path: route for route in MODEL_ROUTES}
_FOREIGN = tuple(served_pattern(route.path) for route in MODEL_ROUTES if route.foreign_pages)


def _rule(path: str) -> str:
    """An OpenAPI path as a werkzeug rule: ``{name}`` becomes ``<name>``."""
    return re.sub(r"\{(\w+)\}", r"<\1>", path)


class Media(Enum):
    """What an answer's body is, for the OpenAPI document."""

    JSON = "application/json"
    TEXT = "text/plain"
    HTML = "text/html"
    EVENTS = "text/event-stream"
    #: an OpenAI-shaped error object (``errors.ApiError``)
    ERROR = "error"
    #: whatever the model's server answers
    ANY = "any"
    #: no body (a redirect, a 204)
    NONE = "none"


@attrs.frozen
class Answer:
    """One status a route may answer with."""

    status: int
    description: str
    media: Media = Media.JSON
    #: the JSON schema of the body, when it says more than "an object"
    schema: Mapping[str, Any] | None = None


@attrs.frozen
class Param:
    """A path or query parameter of a route."""

    name: str
    where: str = "query"  # or "path"
    schema: Mapping[str, Any] = {"type": "string"}
    #: ``?name`` counts without a value
    flag: bool = False

    @property
    def required(self) -> bool:
        return self.where == "path"


@attrs.frozen
class ApiRoute:
    """One route llamaswap answers itself: its path, methods, the ``Api`` method that
    answers it, and what the OpenAPI document says about it."""

    path: str  # OpenAPI style: ``/api/models/load/{model}``
    methods: tuple[str, ...]
    handler: str  # the name of the ``Api`` method
    summary: str
    tag: str
    answers: tuple[Answer, ...] = ()
    parameters: tuple[Param, ...] = ()
    #: anyone may GET (or HEAD) it, keys or not: liveness, and what a browser needs
    #: to ask for a key
    open: bool = False
    #: it also serves every path below it (static files)
    branch: bool = False
    #: in the OpenAPI document (redirects and static assets are not)
    documented: bool = True
    #: a llama-server route llamaswap answers itself, for the whole set of models
    llama_server: bool = False
    #: how a browser gets (and drops) a session: reachable without a key, any key
    #: may use it, never cached
    session: bool = False
    #: more than the summary says, for the OpenAPI document
    description: str = ""
    #: the werkzeug rule, when it is not the path's (handler arguments named apart
    #: from the documented parameters, or one argument for several segments)
    werkzeug_rule: str | None = None

    @property
    def rule(self) -> str:
        return self.werkzeug_rule or _rule(self.path)


MODEL_ERRORS: tuple[Answer, ...] = (
    Answer(
        400,
        "Malformed body, or no model named while no `defaultModel` is set and no one "
        "model fits (loaded, or configured for the route); the message lists the valid ids",
        Media.ERROR,
    ),
    Answer(
        404,
        "Unknown model, or one the key may not use; the message lists the key's ids",
        Media.ERROR,
    ),
    Answer(429, "The model has `concurrencyLimit` requests already (see Retry-After)", Media.ERROR),
    Answer(502, "The model's server (or peer) could not be reached", Media.ERROR),
    Answer(503, "The model failed to start, timed out, or the queue is full", Media.ERROR),
)

_MANAGEMENT = "Management"
_OBSERVABILITY = "Observability"
_DOCUMENTATION = "Documentation"
_SESSION = "Session"
_OK = Answer(200, "Done", schema={"type": "object", "properties": {"msg": {"type": "string"}}})
_UNKNOWN_MODEL = Answer(404, "Unknown model", Media.ERROR)
_STORE_DOWN = Answer(503, "The activity log cannot be written now", Media.ERROR)
_MODEL = Param("model", "path")
_NO_HISTORY = Param("no-history", flag=True)
_LOG_LINES = Answer(200, "History (unless `?no-history`), then live lines", Media.TEXT)
_REDIRECT = (Answer(302, "Redirect", Media.NONE),)
_NUMBER = {"type": "number"}

API_ROUTES: tuple[ApiRoute, ...] = (
    # management
    ApiRoute(
        "/health",
        ("GET", "HEAD"),
        "health",
        "llamaswap is up",
        _MANAGEMENT,
        (Answer(200, "OK", Media.TEXT),),
        open=True,
        llama_server=True,
    ),
    ApiRoute(
        "/v1/health",
        ("GET", "HEAD"),
        "health_v1",
        "llamaswap is up, in llama-server's shape; asks no model",
        _MANAGEMENT,
        (Answer(200, '`{"status": "ok"}`'),),
        open=True,
        llama_server=True,
    ),
    ApiRoute(
        "/v1/models",
        ("GET",),
        "models",
        "Models (OpenAI list)",
        _MANAGEMENT,
        (Answer(200, "Model list"),),
        llama_server=True,
    ),
    ApiRoute(
        "/models",
        ("GET",),
        "models",
        "Models (same as /v1/models)",
        _MANAGEMENT,
        (Answer(200, "Model list"),),
        llama_server=True,
    ),
    ApiRoute(
        "/v1/models/{model}",
        ("GET",),
        "model_one",
        "One model's entry of /v1/models (by id, alias or variant)",
        _MANAGEMENT,
        (Answer(200, "Model"), _UNKNOWN_MODEL),
        (_MODEL,),
        werkzeug_rule="/v1/models/<path:name>",
    ),
    ApiRoute(
        "/models/{model}",
        ("GET",),
        "model_one",
        "One model's entry (same as /v1/models/{model})",
        _MANAGEMENT,
        (Answer(200, "Model"), _UNKNOWN_MODEL),
        (_MODEL,),
        werkzeug_rule="/models/<path:name>",
    ),
    ApiRoute(
        "/running",
        ("GET",),
        "running",
        "Running models and their details",
        _MANAGEMENT,
        (Answer(200, "Running models"),),
    ),
    ApiRoute(
        "/api/models/load/{model}",
        ("POST",),
        "load_one",
        "Start a model; answers when it is ready",
        _MANAGEMENT,
        (_OK, _UNKNOWN_MODEL, Answer(503, "The model failed to start", Media.ERROR)),
        (_MODEL,),
        werkzeug_rule="/api/models/load/<path:name>",
    ),
    ApiRoute(
        "/unload",
        ("GET",),
        "unload_all_get",
        "Stop every model",
        _MANAGEMENT,
        (Answer(200, "OK", Media.TEXT),),
    ),
    ApiRoute(
        "/api/models/unload", ("POST",), "unload_all", "Stop every model", _MANAGEMENT, (_OK,)
    ),
    ApiRoute(
        "/api/models/unload/{model}",
        ("POST",),
        "unload_one",
        "Stop one model",
        _MANAGEMENT,
        (_OK, _UNKNOWN_MODEL),
        (_MODEL,),
        werkzeug_rule="/api/models/unload/<path:name>",
    ),
    ApiRoute(
        "/upstream/{model}/{path}",
        ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"),
        "upstream",
        "Raw pass-through to a model's server (starts it if needed)",
        _MANAGEMENT,
        (Answer(200, "The server's own response", Media.ANY), *MODEL_ERRORS),
        (_MODEL, Param("path", "path")),
        # the model's name may itself hold slashes: the handler splits the rest
        werkzeug_rule="/upstream/<path:rest>",
    ),
    ApiRoute(
        "/api/version", ("GET",), "version", "Version", _MANAGEMENT, (Answer(200, "Version"),)
    ),
    # logs
    ApiRoute(
        "/logs",
        ("GET",),
        "logs_text",
        "Recent log history",
        _MANAGEMENT,
        (Answer(200, "Log lines", Media.TEXT), Answer(302, "Browsers go to /ui/#logs", Media.NONE)),
    ),
    ApiRoute(
        "/logs/stream",
        ("GET",),
        "stream_all",
        "Live log stream (all sources)",
        _MANAGEMENT,
        (_LOG_LINES,),
        (_NO_HISTORY,),
    ),
    ApiRoute(
        "/logs/stream/{source}",
        ("GET",),
        "stream_one",
        "Live log stream of `proxy`, `upstream` or one model",
        _MANAGEMENT,
        (_LOG_LINES, _UNKNOWN_MODEL),
        (Param("source", "path"), _NO_HISTORY),
        werkzeug_rule="/logs/stream/<path:source>",
    ),
    # observability
    ApiRoute(
        "/metrics",
        ("GET",),
        "prometheus",
        "Prometheus metrics",
        _OBSERVABILITY,
        (Answer(200, "Prometheus text format", Media.TEXT),),
        llama_server=True,
        description="llamaswap's own, then each running model's own metrics "
        "(llama-server with --metrics), every sample labelled with its model.",
    ),
    ApiRoute(
        "/api/activity",
        ("GET",),
        "activity",
        "One row per proxied request, newest first",
        _OBSERVABILITY,
        (Answer(200, "Rows and total"), Answer(400, "Bad parameter", Media.ERROR), _STORE_DOWN),
        (
            Param("model"),
            Param("since", schema=_NUMBER),
            Param("until", schema=_NUMBER),
            Param("limit", schema={"type": "integer", "minimum": 1, "maximum": 1000}),
            Param("offset", schema={"type": "integer", "minimum": 0}),
        ),
    ),
    ApiRoute(
        "/api/activity/stats",
        ("GET",),
        "activity_stats",
        "Per model: totals and p50/p95/p99 of latency and speeds",
        _OBSERVABILITY,
        (Answer(200, "Statistics and the store's health"), _STORE_DOWN),
        (Param("since", schema=_NUMBER), Param("until", schema=_NUMBER)),
    ),
    ApiRoute(
        "/api/events",
        ("GET",),
        "live_events",
        "Live events: model, log, activity, queue, swap",
        _OBSERVABILITY,
        (Answer(200, "Server-sent events", Media.EVENTS),),
    ),
    # UI sessions (a cookie for a key, so the UI's pages need no header)
    ApiRoute(
        "/api/login",
        ("POST",),
        "login",
        'Open a UI session: `{"key": "<API key>"}` in, a session cookie out',
        _SESSION,
        (
            Answer(200, "The key's name, role and models (never the key)"),
            Answer(400, 'Not `{"key": "..."}`', Media.ERROR),
            Answer(401, "Not a valid key, or no keys configured", Media.ERROR),
            Answer(403, "Sent from another site's page", Media.ERROR),
        ),
        session=True,
    ),
    ApiRoute(
        "/api/logout",
        ("POST",),
        "logout",
        "End the UI session and clear its cookie",
        _SESSION,
        (_OK,),
        session=True,
    ),
    ApiRoute(
        "/api/session",
        ("GET",),
        "session",
        "Who the UI talks as (`keys: false` when no keys are configured)",
        _SESSION,
        (Answer(200, "Name, role and models"), Answer(401, "Not logged in", Media.ERROR)),
        session=True,
    ),
    # documentation and the web UI
    ApiRoute(
        "/openapi.json",
        ("GET",),
        "openapi",
        "This document",
        _DOCUMENTATION,
        (Answer(200, "OpenAPI 3 document"),),
    ),
    ApiRoute(
        "/swagger",
        ("GET",),
        "swagger_redirect",
        "To /swagger/",
        _DOCUMENTATION,
        _REDIRECT,
        open=True,
        documented=False,
    ),
    ApiRoute(
        "/swagger/",
        ("GET",),
        "swagger_page",
        "Interactive API documentation",
        _DOCUMENTATION,
        (Answer(200, "HTML", Media.HTML),),
        open=True,
    ),
    ApiRoute(
        "/swagger/static/",
        ("GET",),
        "swagger_assets",
        "Swagger UI's own files",
        _DOCUMENTATION,
        open=True,
        branch=True,
        documented=False,
    ),
    ApiRoute(
        "/", ("GET",), "root", "To /ui/", _DOCUMENTATION, _REDIRECT, open=True, documented=False
    ),
    ApiRoute(
        "/ui",
        ("GET",),
        "ui_redirect",
        "To /ui/",
        _DOCUMENTATION,
        _REDIRECT,
        open=True,
        documented=False,
    ),
    ApiRoute(
        "/ui/",
        ("GET",),
        "ui",
        "Web UI",
        _DOCUMENTATION,
        (Answer(200, "HTML", Media.HTML),),
        open=True,
        branch=True,
    ),
)

#: the session routes' paths: the door lets them by without a key
SESSION_PATHS: frozenset[bytes] = frozenset(r.path.encode() for r in API_ROUTES if r.session)

#: llama-server routes llamaswap answers itself (for the whole set of models)
OWN_ROUTES: dict[str, str] = {r.path: r.summary for r in API_ROUTES if r.llama_server}
