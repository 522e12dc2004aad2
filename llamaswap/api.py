"""HTTP routes: the OpenAI-compatible pass-through and the management API.

Each proxied request body is read and parsed once, to find ``model``; the same
bytes (or, with ``useModelName``, the rewritten document) go upstream.  Every error
llamaswap produces itself is an OpenAI-shaped JSON object with the right status.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import attrs
from klein import Klein
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect
from zope.interface import implementer

from . import __version__
from .access import Access, admin_route, caller_name, may_use, require_route
from .activity import ActivityStore, StoreUnavailable
from .config import Config, ModelConfig, PeerConfig, PoolConfig
from .connections import connection_of
from .errors import ApiError, ModelStopped, StartFailed
from .events import EventBus, ModelChanged, wire
from .eventstream import begin_event_stream, named_event, unbuffered
from .forms import FormError, form_field
from .guard import short_uri
from .kvcache import Conversation, KvStore
from .lifecycle import ModelState
from .loading import LoadingStream
from .logs import PROXY, UPSTREAM, LogHub, logger
from .metrics import Metrics
from .openapi import openapi_document
from .origin import READ_METHODS, ui_page
from .recorder import Recorder, RequestRecord
from .relay import Relay
from .routes import (
    API_ROUTES,
    MODEL_ROUTES,
    Body,
    ModelRoute,
    capability_of,
    shows_foreign_pages,
)
from .scheduler import Lease, Scheduler

UI_DIR = Path(__file__).parent / "ui"
# the route whose save and restore actions the KV store keeps to itself
SLOT = "/slots/{id_slot}"
# the page's one inline script, allowed by its hash (origin.ui_page)
SWAGGER_INIT = b'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});'
SWAGGER_PAGE = (
    b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llamaswap API</title>
<link rel="stylesheet" href="/swagger/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/swagger/static/swagger-ui-bundle.js"></script>
<script>%s</script>
</body></html>
"""
    % SWAGGER_INIT
)

# what a JSON body may be labelled as (curl -d sends form-urlencoded by default)
ACCEPTED_BODY_TYPES = (b"application/json", b"application/x-www-form-urlencoded", b"text/plain")


def _json(request: Request, document: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document).encode("utf-8")


@attrs.frozen
class ParsedBody:
    """What one read of a request body told us."""

    model: ModelConfig
    profile: str | None
    requested: str
    body: bytes
    streaming: bool
    conversation: Conversation | None = None  # for the KV store: which chat this continues


@attrs.frozen
class PeerBody:
    """A request for a model that a peer serves, its body already rewritten."""

    peer: PeerConfig
    remote: str
    body: bytes
    requested: str  # the name the request gave (``peer/id``, or an id one peer offers)


ErrorAnswer = Callable[["Api", IRequest, Failure], bytes]


def _answers(
    router: Klein, table: list[tuple[type[Exception], ErrorAnswer]], kind: type[Exception]
) -> Callable[[ErrorAnswer], ErrorAnswer]:
    """Register an error answer with Klein, and in ``table`` for the routes served
    without Klein (:class:`ModelRoutes`): one list, read in the same order."""

    def register(answer: ErrorAnswer) -> ErrorAnswer:
        table.append((kind, answer))
        router.handle_errors(kind)(cast(Any, answer))  # Klein types it by its own protocol
        return answer

    return register


#: the model routes a POST reaches by its exact path (no parameters, no escapes)
EXACT_POST_ROUTES = {
    route.path.encode("ascii"): route
    for route in MODEL_ROUTES
    if "POST" in route.methods and not route.path_parameters
}


class ModelRoutes(Resource):
    """Klein's resource, with a POST to a model route's exact path handed to the
    route's handler directly.

    Such a path is the rule itself, so the router could only pick that route;
    skipping it (werkzeug's URL binding and matching, Klein's per-request set-up)
    is a sixth of what llamaswap spends on a small chat request.  Everything else,
    and any other spelling of these paths (escapes, slashes), goes through Klein."""

    isLeaf = True

    def __init__(self, api: Api, routed: IResource) -> None:
        super().__init__()
        self.api = api
        self.routed = routed

    def render(self, request: Request) -> Any:
        route = EXACT_POST_ROUTES.get(request.path) if request.method == b"POST" else None
        if route is None:
            return self.routed.render(request)
        return self.api.serve_model_route(request, route)


def _model_handler(route: ModelRoute) -> Callable[..., Any]:
    """A Klein handler for one route of the table (path arguments are not needed)."""

    async def handle(api: Api, request: Request, **path_arguments: str) -> None:
        await api.model_route(request, route)

    return handle


class Api:
    """The Klein application; holds its collaborators, not global state."""

    router = Klein()
    #: the failures the handlers answer, in order (Klein has the same list)
    error_answers: list[tuple[type[Exception], ErrorAnswer]] = []
    log = logger()

    def __init__(
        self,
        config: Config,
        scheduler: Scheduler,
        relay: Relay,
        logs: LogHub,
        clock: IReactorTime,
        events: EventBus,
        recorder: Recorder,
        metrics: Metrics | None = None,
        store: ActivityStore | None = None,
        kvcache: KvStore | None = None,
        *,
        access: Access,
    ) -> None:
        self.config = config
        #: keys and UI sessions: the same object the door checks keys with, so a
        #: session opened here is the one the door accepts
        self.access = access
        self.kvcache = kvcache
        self.scheduler = scheduler
        self.relay = relay
        self.logs = logs
        self.clock = clock
        self.recorder = recorder
        self.metrics = metrics
        self.events = events
        self.store = store
        self.created = int(clock.seconds())
        #: the lease each request being answered holds (a model of this machine's)
        self._leases: dict[object, Lease] = {}

    def follow(self, config: Config) -> None:
        """A reload: requests from now on read ``config``."""
        self.config = config

    def resource(self) -> Any:
        return ModelRoutes(self, self.router.resource())

    def serve_model_route(self, request: Request, route: ModelRoute) -> Any:
        """``route``'s handler without Klein's routing, as Klein would run it: the
        handler cancelled when the client leaves, a failure answered by the first of
        ``error_answers`` that takes it (else a 500), the request finished after."""
        finished = False

        def ended(_: object) -> None:
            nonlocal finished
            finished = True

        request.notifyFinish().addBoth(ended)
        handled = Deferred.fromCoroutine(self.model_route(request, route))
        request.notifyFinish().addErrback(lambda _: handled.cancel())

        def failed(failure: Failure) -> bytes | None:
            if finished:  # nowhere to answer: the client left, or the answer is out
                if not failure.check(CancelledError):
                    self.log.failure("{path} failed after its answer", failure, path=route.path)
                return None
            for kind, answer in self.error_answers:
                if failure.check(kind):
                    return answer(self, request, failure)
            request.processingFailed(failure)
            return None

        def respond(body: bytes | None) -> None:
            if body:
                request.write(body)
            if not finished:
                request.finish()

        handled.addCallbacks(lambda _: None, failed).addCallback(respond).addErrback(
            lambda f: self.log.failure("answering {path} failed", f, path=route.path)
        )
        return NOT_DONE_YET

    # --- errors ------------------------------------------------------------------

    @_answers(router, error_answers, ApiError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        return self.error_response(request, error)

    def error_response(self, request: IRequest, error: ApiError) -> bytes:
        for name, value in error.headers.items():
            request.setHeader(name, value)
        if error.status >= 500:
            self.log.warn(
                "{method} {path}: {status} {message}",
                method=request.method.decode(errors="replace"),
                path=short_uri(request.path),
                status=error.status,
                message=error.message,
            )
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"application/json")
        return error.body()

    @_answers(router, error_answers, StartFailed)
    def start_failed(self, request: IRequest, failure: Failure) -> bytes:
        return self.error_response(request, ApiError(503, str(failure.value), "model_start_failed"))

    @_answers(router, error_answers, ModelStopped)
    def model_stopped(self, request: IRequest, failure: Failure) -> bytes:
        message = f"{failure.value}; it was unloaded before it became ready, try again"
        return self.error_response(request, ApiError(503, message, "model_unloaded"))

    @_answers(router, error_answers, StoreUnavailable)
    def store_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        error = ApiError(503, str(failure.value), "activity_log_unavailable")
        return self.error_response(request, error)

    @_answers(router, error_answers, NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode(errors="replace")
        message = f"no route for {path}"
        if path.startswith("/v1/v1/"):
            message += (
                "; the client adds /v1 to a base URL that ends in /v1 already: "
                "give it http://<host>:<port>/v1 once"
            )
        return self.error_response(request, ApiError(404, message, "not_found"))

    @_answers(router, error_answers, RequestRedirect)
    def relative_redirect(self, request: IRequest, failure: Failure) -> bytes:
        """Werkzeug's slash fixes (``/ui//x`` → ``/ui/x``) as a path on this server: its
        own absolute URL would be built from the Host header, which the client chose."""
        redirect = failure.value
        assert isinstance(redirect, RequestRedirect)
        path = urlsplit(redirect.new_url).path
        query = request.uri.partition(b"?")[2]  # werkzeug is not given the query
        # one leading "/": "//name" or "/\\name" would be another host to a browser
        location = b"/" + path.lstrip("/\\").encode("ascii", errors="replace")
        location += b"?" + query if query else b""
        request.setResponseCode(redirect.code)
        request.setHeader(b"location", location)
        return b""

    @_answers(router, error_answers, MethodNotAllowed)
    def bad_method(self, request: IRequest, failure: Failure) -> bytes:
        method = request.method.decode(errors="replace")
        path = request.path.decode(errors="replace")
        message = f"{method} is not allowed on {path}"
        allowed = getattr(failure.value, "valid_methods", None)
        if allowed:
            message += f" (allowed: {', '.join(sorted(allowed))})"
        if path in ("/models/load", "/models/unload"):  # llama-server's router mode
            message += f"; llamaswap's own is POST /api{path}/<model id>"
        return self.error_response(request, ApiError(405, message))

    # --- the OpenAI-compatible pass-through ------------------------------------------

    async def model_route(self, request: Request, route: ModelRoute) -> None:
        """Any route of :data:`MODEL_ROUTES`: find the model, relay the request as it came."""
        if request.method == b"OPTIONS":
            # without CORS a preflight gets no Access-Control-* headers, but no 405
            request.setResponseCode(204)
            request.setHeader(b"allow", route.allow)
            return
        body = request.content.read() if request.content is not None else b""
        if request.method != b"POST":  # GET, HEAD, DELETE: the model is in the query
            model, profile, requested = self.choose(request, None)
            await self.proxy(
                request,
                model,
                request.method,
                request.uri,
                body or None,
                profile,
                route=route.path,
                requested=requested,
            )
            return
        parsed = self.model_from_body(request, body, route.body)
        if isinstance(parsed, PeerBody):
            await self.to_peer(request, parsed, request.uri)
            return
        if self.kvcache is not None:
            if route.path == SLOT:
                self.kvcache.check_client_slot_action(parsed.model, _args(request, b"action"))
            self.kvcache.note(parsed.model.id, parsed.conversation)
        loading = parsed.streaming and parsed.model.send_loading_state and route.loading
        await self.proxy(
            request,
            parsed.model,
            b"POST",
            request.uri,
            parsed.body,
            parsed.profile,
            loading_for=parsed.requested if loading else None,
            route=route.path,
            requested=parsed.requested,
        )

    for _route in MODEL_ROUTES:
        router.route(_route.rule, methods=[*_route.methods, "OPTIONS"], endpoint=_route.path)(
            _model_handler(_route)
        )
    del _route

    async def upstream(self, request: Request, rest: str) -> None:
        raw = request.uri.split(b"?", 1)
        query = b"?" + raw[1] if len(raw) == 2 else b""
        # the raw segments after the router's "upstream", however it was spelt
        # (/%75pstream/: a fixed-length cut relayed to another model)
        first, *segments = raw[0][1:].split(b"/")
        if unquote_to_bytes(first) != b"upstream" or not segments:
            raise NotFound()  # /upstream%2F<id>/: one segment here, two to the router
        for count in range(len(segments), 0, -1):
            name = unquote(b"/".join(segments[:count]).decode("utf-8", errors="replace"))
            found = self.find(name, request)
            if found is not None and self.may_start(request, *found):
                model, profile = found
                path = b"/" + b"/".join(segments[count:]) + query
                # the route the server reads, under any --api-prefix too
                served = admin_route(path)
                if self.kvcache is not None and served is not None and served.path == SLOT:
                    self.kvcache.check_client_slot_action(model, _args(request, b"action"))
                body = request.content.read() if request.content is not None else b""
                await self.proxy(
                    request,
                    model,
                    request.method,
                    path,
                    body or None,
                    profile,
                    route="/upstream",
                    requested=name,
                )
                return
        raise self.unknown_model(unquote(segments[0].decode("utf-8", errors="replace")), request)

    def model_from_body(
        self, request: Request, body: bytes, kind: Body = Body.JSON
    ) -> ParsedBody | PeerBody:
        """Find ``model`` in a JSON or multipart body (parsed once) and apply filters."""
        content_type = request.getHeader(b"content-type") or b""
        if content_type.lower().startswith(b"multipart/form-data"):
            model, profile, requested = self.choose(request, _form_model(content_type, body))
            return ParsedBody(model, profile, requested, body, streaming=False)
        if kind is Body.OPAQUE:
            # the child's business; only a JSON object may name the model
            model, profile, requested = self.choose(request, _model_field(body))
            return ParsedBody(model, profile, requested, body, streaming=False)
        try:
            return self.model_from_json(request, content_type.lower(), body)
        except RecursionError as e:
            # json, and comparing or re-encoding the document, recurse per level
            raise ApiError(400, "the request body is nested too deeply") from e

    def model_from_json(
        self, request: Request, content_type: bytes, body: bytes
    ) -> ParsedBody | PeerBody:
        """The JSON half of ``model_from_body`` (``content_type`` lower-cased)."""
        media = content_type.partition(b";")[0].strip()
        if media and media not in ACCEPTED_BODY_TYPES and not media.endswith(b"+json"):
            raise ApiError(
                415,
                f"unsupported content type {media.decode(errors='replace')!r}: "
                "send the request as application/json",
                "unsupported_media_type",
            )
        if not body.strip():
            raise ApiError(400, 'the request body is empty: send a JSON object ({"model": ...})')
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(document, dict):
            raise ApiError(400, "the request body must be a JSON object")
        name = document.get("model")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "'model' must be a string naming the model to use")
        if name and self.find(name, request) is None:
            routed = self.config.peer_route(name)
            if routed is not None:
                # a remote model: its own id upstream, the peer's filters
                peer, remote_id = routed
                peer.filters.apply(document, requested=name)
                document["model"] = remote_id
                return PeerBody(peer, remote_id, json.dumps(document).encode("utf-8"), name)
        model, profile, requested = self.choose(request, name)
        changed = model.filters.apply(
            document, requested=requested.partition(":")[2] if profile else requested
        )
        if model.use_model_name is not None:
            document["model"] = model.use_model_name
            changed = True
        if changed:
            body = json.dumps(document).encode("utf-8")
        return ParsedBody(
            model,
            profile,
            requested,
            body,
            streaming=document.get("stream") is True,
            conversation=Conversation.of(document) if model.slot_save_path else None,
        )

    def choose(self, request: Request, named: str | None) -> tuple[ModelConfig, str | None, str]:
        """The model a request is for → (model, profile, the name it went by).

        The name the request gives (body or form), else ``?model=``, else
        ``defaultModel`` (if the key may use it), else the one loaded model that is
        for what the route does (chat, embeddings, rerank), else for a read (GET) the
        one model that is loaded (a look at a server is no reason to swap), else the
        one configured model that is for the route, else (none is) the one model that
        is loaded; else a 400.
        """
        name = named or _arg(request, b"model")
        default = self.config.default_model
        if not name and default is not None:
            found = self.find(default, request)
            if found is None:
                name = default  # the 404 of a name that is not configured
            elif self.may_start(request, *found):
                return found[0], found[1], default
            # else: a key scoped to other models passes it over (and never learns it)
        if name:
            model, profile = self.target(name, request)
            return model, profile, name
        # of the models the caller's key may use: the others are not its business
        loaded = [
            model_id
            for model_id, process in sorted(self.scheduler.processes.items())
            if process.state in (ModelState.STARTING, ModelState.READY)
            and may_use(request, model_id)
        ]
        wanted = capability_of(request.path)
        fitting = [m for m in loaded if wanted in self.config.models[m].capabilities]
        candidates: list[str] = []
        # a read goes to the one that runs: a dashboard polling /props swaps nothing
        if not fitting and not (len(loaded) == 1 and request.method in READ_METHODS):
            # as llama-server with its one model: a config of one just works
            fitting = candidates = [
                m
                for m in self.config.listed_ids()
                if may_use(request, m) and wanted in self.config.models[m].capabilities
            ]
        if not fitting and len(loaded) == 1:
            fitting = loaded  # a read, or none is known to be for the route
        if len(fitting) == 1:
            return self.config.models[fitting[0]], None, fitting[0]
        which = (
            f"{len(loaded)} model{'s are' if len(loaded) > 1 else ' is'} loaded "
            f"({', '.join(loaded)})"
            if loaded
            else "no model is loaded"
        )
        if len(candidates) > 1:
            which += f"; {len(candidates)} could take it ({', '.join(candidates)})"
        raise ApiError(
            400,
            f"the request names no model and {which}: send 'model' in the JSON body, the "
            f"'model' field of a form, or ?model= in the query; available models: "
            f"{self.known_ids(request)}",
            "model_not_specified",
        )

    def target(self, name: str, request: Request) -> tuple[ModelConfig, str | None]:
        """A model id, alias, variant, pool or ``<profile>:<model>`` → (model, profile)."""
        found = self.find(name, request)
        if found is None or not self.may_start(request, *found):
            raise self.unknown_model(name, request)
        return found

    def may_start(self, request: Request, model: ModelConfig, profile: str | None) -> bool:
        """Whether the key may use ``model`` and, for a profile, every model it starts."""
        starts = self.config.profiles[profile] if profile is not None else (model.id,)
        return all(may_use(request, m) for m in starts)

    def find(self, name: str, request: Request) -> tuple[ModelConfig, str | None] | None:
        """Like ``Config.lookup``; a pool goes to whichever of its models is loaded
        (of those the caller's key may use: the per-key 404 still follows)."""
        pool = self.config.pools.get(name)
        if pool is not None:
            allowed = [m for m in pool.models if may_use(request, m)] or list(pool.models)
            return self.config.models[self.scheduler.pick(allowed)], None
        return self.config.lookup(name)

    def priority(self, request: Request, model: ModelConfig, requested: str | None) -> int:
        """The request's priority: its pool's or model's, lowered by ``X-Priority``."""
        pool = self.config.pools.get(requested or "")
        base = pool.priority if pool is not None and pool.priority is not None else model.priority
        header = request.getHeader(b"x-priority")
        if header is None:
            return base
        value = header.decode("latin-1").strip().lower()
        if value == "low":
            return base - 1
        if value == "normal":
            return base
        try:
            asked = int(value)
        except ValueError as e:
            raise ApiError(
                400, "X-Priority must be 'low', 'normal' or an integer", "invalid_priority"
            ) from e
        return min(base, asked)  # a client may lower its priority, never raise it

    def resolve(self, name: str, request: Request) -> ModelConfig:
        """A model id or alias, else the 404 of an unknown model."""
        model = self.config.resolve(name)
        if model is None:
            raise self.unknown_model(name, request)
        return model

    def require_model(self, request: Request, model_id: str, name: str) -> None:
        """A model the key may not use gets the 404 of one that is not configured:
        the same answer either way, so a scoped key cannot tell which ids exist."""
        if not may_use(request, model_id):
            raise self.unknown_model(name, request)

    def unknown_model(self, name: str, request: Request) -> ApiError:
        known = self.known_ids(request)
        what = "is not configured" if caller_name(request) is None else "is not available"
        return ApiError(404, f"model {_shown(name)} {what}; available models: {known}")

    def known_ids(self, request: Request) -> str:
        """The model ids an error may list: those ``request``'s key may use."""
        ids = [m for m in self.config.listed_ids() if may_use(request, m)]
        return ", ".join(ids) or "(none)"

    async def proxy(
        self,
        request: Request,
        model: ModelConfig,
        method: bytes,
        path: bytes,
        body: bytes | None,
        profile: str | None = None,
        loading_for: str | None = None,
        route: str | None = None,
        requested: str | None = None,
    ) -> None:
        """Lease the model, relay the request; with ``loading_for``, report progress."""
        self.require_model(request, model.id, requested or model.id)
        require_route(request, method, path)
        record = self.recorder.begin(
            model.id,
            route or request.path.decode("ascii", errors="replace"),
            path.decode("ascii", errors="replace"),
            self.scheduler.view(model.id),
            key=caller_name(request),
        )
        try:
            priority = self.priority(request, model, requested)
            await self._proxy(
                request, model, method, path, body, profile, loading_for, record, priority
            )
        except CancelledError:
            record.fail(499, "the client disconnected")
            raise
        except ApiError as e:
            record.fail(e.status, e.message)
            raise
        except Exception as e:
            record.fail(503, str(e))
            raise
        finally:
            record.finish()

    async def _proxy(
        self,
        request: Request,
        model: ModelConfig,
        method: bytes,
        path: bytes,
        body: bytes | None,
        profile: str | None,
        loading_for: str | None,
        record: RequestRecord,
        priority: int,
    ) -> None:
        deadline = self.deadline(request, model)  # may refuse the request: before queueing
        waiting = self.scheduler.acquire(model.id, profile, priority, client=connection_of(request))
        if deadline is not None and not waiting.called:
            waiting.addTimeout(deadline, self.clock, onTimeoutCancel=_missed(model.id, deadline))
        progress = None
        if loading_for is not None and not waiting.called:
            progress = LoadingStream(
                request,
                model_id=model.id,
                requested=loading_for,
                scheduler=self.scheduler,
                events=self.events,
                clock=self.clock,
            )
            progress.begin(waiting)
        try:
            lease = await waiting
        except CancelledError:
            raise
        except Exception as e:
            if progress is None:
                raise
            record.fail(503, str(e))
            progress.fail(e)
            return
        finally:
            if progress is not None:
                progress.stop()
        record.leased()
        self._leases[request] = lease
        try:
            if progress is not None:
                progress.end()
            url = lease.base_url + path.decode("ascii")
            await self.relay.forward(
                request,
                method,
                url,
                body,
                stream_started=progress is not None,
                meter=record.meter,
                forward_credentials=model.forward_authorization,
                replace_headers=_credentials(model.upstream_api_key),
                sandbox=not model.trusted_pages or shows_foreign_pages(path),
            )
        finally:
            del self._leases[request]
            lease.release()

    def awaited(self, request: object) -> str | None:
        """What waits for the model ``request`` holds to finish its requests, in
        words ("a swap to b waits for model a"); None when nothing does, or when the
        request holds no model (a page, a peer's model, still queued).  The
        connection gate asks this of a client that reads its answer slowly."""
        lease = self._leases.get(request)
        return self.scheduler.awaited(lease) if lease is not None else None

    def deadline(self, request: Request, model: ModelConfig) -> float | None:
        """Seconds this request may wait for its model: the header, capped by the config."""
        header = request.getHeader(b"x-request-deadline")
        asked = None
        if header is not None:
            try:
                asked = float(header)
            except ValueError as e:
                raise ApiError(400, "X-Request-Deadline must be a number of seconds") from e
            if not (asked > 0 and math.isfinite(asked)):
                raise ApiError(400, "X-Request-Deadline must be a finite number of seconds above 0")
        limits = [d for d in (asked, model.deadline) if d is not None]
        return min(limits) if limits else None

    async def to_peer(self, request: Request, parsed: PeerBody, path: bytes) -> None:
        """Relay straight to a peer: no local process, no queue."""
        peer, remote, body = parsed.peer, parsed.remote, parsed.body
        # the 404 names what the request named: a bare id must not reveal its peer
        self.require_model(request, f"{peer.id}/{remote}", parsed.requested)
        require_route(request, b"POST", path)
        record = self.recorder.begin(
            f"{peer.id}/{remote}",
            request.path.decode("ascii", errors="replace"),
            path.decode(),
            key=caller_name(request),
        )
        record.leased()
        try:
            await self.relay.forward(
                request,
                b"POST",
                peer.proxy + path.decode("ascii"),
                body,
                replace_headers=_credentials(peer.api_key),
                meter=record.meter,
            )
        except CancelledError:
            record.fail(499, "the client disconnected")
            raise
        except ApiError as e:
            error = ApiError(502, f"peer {peer.id!r}: {e.message}")
            record.fail(error.status, error.message)
            raise error from e
        finally:
            record.finish()

    # --- management ---------------------------------------------------------------

    def health(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    def health_v1(self, request: Request) -> bytes:
        """llama-server's health route, in its shape: no model is asked (or started)."""
        return _json(request, {"status": "ok"})

    def models(self, request: Request) -> bytes:
        return _json(request, {"object": "list", "data": self.model_list(request)})

    def model_one(self, request: Request, name: str) -> bytes:
        """One entry of the list (OpenAI's "retrieve model", the SDK's
        ``models.retrieve``); an alias or variant gets its model's entry."""
        for record in self.model_list(request):
            if record["id"] == name:
                return _json(request, record)
        model = self.resolve(name, request)
        self.require_model(request, model.id, name)
        record = self.model_record(model.id)
        if model.id != name:
            record.update(id=name, alias_of=model.id)
        return _json(request, record)

    def model_list(self, request: Request) -> list[dict[str, Any]]:
        """The entries of ``/v1/models`` the key may see."""
        data = []
        for model_id in filter(lambda m: may_use(request, m), self.config.listed_ids()):
            record = self.model_record(model_id)
            data.append(record)
            if self.config.include_aliases_in_list:
                for alias in self.config.models[model_id].names:
                    data.append(
                        {**record, "id": alias, "alias_of": model_id, "name": record["name"]}
                    )
        for profile, members in sorted(self.config.profiles.items()):
            # a profile starts all its members: listed only for a key that may use them all
            for member in members if all(may_use(request, m) for m in members) else ():
                record = self.model_record(member)
                record.update(id=f"{profile}:{member}", name=f"{record['name']} ({profile})")
                data.append(record)
        for pool in sorted(self.config.pools.values(), key=lambda p: p.id):
            usable = [m for m in pool.models if may_use(request, m)]
            if usable:
                data.append(self.pool_record(pool, usable))
        for peer in self.config.peers.values():
            for remote in peer.models:
                if not may_use(request, f"{peer.id}/{remote}"):
                    continue
                data.append(
                    {
                        "id": f"{peer.id}/{remote}",
                        "name": f"{remote} ({peer.id})",
                        "object": "model",
                        "created": self.created,
                        "owned_by": peer.id,
                        "meta": {"llamaswap": {"peer": peer.id}},
                    }
                )
        _distinct_names(data)
        return data

    def pool_record(self, pool: PoolConfig, members: list[str]) -> dict[str, Any]:
        """A pool as a model: the record of the model it would use now, renamed; of
        ``members``, those a key may use (the others are not its business)."""
        chosen = self.scheduler.pick(members)
        record = {**self.model_record(chosen), "id": pool.id, "name": pool.name or pool.id}
        record.pop("aliases", None)
        record["description"] = pool.description or (
            f"whichever of {', '.join(members)} is loaded (now {chosen})"
        )
        meta = dict(record.get("meta", {}).get("llamaswap", {}))
        record["meta"] = {"llamaswap": {**meta, "pool": members, "serves": chosen}}
        return record

    def model_record(self, model_id: str) -> dict[str, Any]:
        model = self.config.models[model_id]
        process = self.scheduler.view(model_id)
        record: dict[str, Any] = {
            "id": model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "llamaswap",
            "status": {"value": process.state.value},
        }
        record["name"] = model.name or model_id
        if model.description:
            record["description"] = model.description
        if model.names:
            record["aliases"] = list(model.names)
        record["capabilities"] = list(model.capabilities)
        if model.metadata:
            record["meta"] = {"llamaswap": dict(model.metadata)}
        if model.gguf:  # what its GGUF file says; see llamaswap/modelsdir.py
            record.setdefault("meta", {})["gguf"] = dict(model.gguf)
        if process.last_error:
            record["status"]["error"] = process.last_error
        return record

    def running(self, request: Request) -> bytes:
        now = self.clock.seconds()
        running = []
        for model_id, process in sorted(self.scheduler.processes.items()):
            if process.state in (ModelState.STOPPED, ModelState.FAILED):
                continue
            last_used = self.scheduler.last_used(model_id)
            idle_deadline = self.scheduler.idle_deadline(model_id)
            running.append(
                {
                    "model": model_id,
                    "state": process.state.value,
                    "pid": process.pid,
                    "port": process.port,
                    "proxy": process.base_url,
                    "uptime": round(now - process.started_at, 3) if process.started_at else None,
                    "in_flight": self.scheduler.in_flight(model_id),
                    "queued": self.scheduler.queued(model_id),
                    "last_used": last_used,
                    "ttl": process.config.ttl,
                    "ttl_left": round(idle_deadline - now, 3) if idle_deadline else None,
                    "load_seconds": _round(process.load_seconds),
                    "stop_seconds": _round(process.stop_seconds),
                    "progress": _round(process.progress),
                    "memory": self.memory_record(model_id),
                    "name": process.config.name,
                    "description": process.config.description,
                }
            )
        for process in self.scheduler.retiring():
            if process.state in (ModelState.STOPPED, ModelState.FAILED):
                continue  # stopped, kept for a stuck child: that is shown below
            running.append(
                {
                    "model": process.id,
                    "state": process.state.value,
                    "pid": process.pid,
                    "port": process.port,
                    "proxy": process.base_url,
                    "retiring": True,
                }
            )
        for process in [*self.scheduler.processes.values(), *self.scheduler.retiring()]:
            for child in process.stuck:
                running.append(
                    {
                        "model": process.id,
                        "state": "stuck",
                        "pid": child.live_pid,
                        "group": child.group,
                        "port": child.port,
                        "since": child.stuck_since,
                        "why": child.why,
                    }
                )
        saved = self.kvcache.describe() if self.kvcache is not None else []
        return _json(request, {"running": running, "saved_states": saved})

    def memory_record(self, model_id: str) -> dict[str, Any] | None:
        footprint = self.scheduler.footprint(model_id)
        if footprint is None:
            return None
        return {
            "declared": footprint.declared,
            "measured": footprint.measured,
            "peak": footprint.peak,
        }

    async def load_one(self, request: Request, name: str) -> bytes:
        """Start a model and answer once it is ready (or with why it could not start)."""
        model = self.resolve(name, request)
        self.require_model(request, model.id, name)
        started = self.clock.seconds()
        await self.scheduler.load(model.id)
        return _json(
            request,
            {
                "msg": "ok",
                "model": model.id,
                "state": self.scheduler.view(model.id).state.value,
                "seconds": round(self.clock.seconds() - started, 3),
            },
        )

    async def unload_all_get(self, request: Request) -> bytes:
        await self.scheduler.unload()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK"

    async def unload_all(self, request: Request) -> bytes:
        await self.scheduler.unload()
        return _json(request, {"msg": "ok"})

    async def unload_one(self, request: Request, name: str) -> bytes:
        model = self.resolve(name, request)
        self.require_model(request, model.id, name)
        await self.scheduler.unload([model.id])
        return _json(request, {"msg": "ok"})

    def version(self, request: Request) -> bytes:
        return _json(request, {"version": __version__})

    # --- logs ---------------------------------------------------------------------------

    # --- observability ---------------------------------------------------------------

    async def prometheus(self, request: Request) -> bytes:
        """llamaswap's metrics, then each ready child's own, labelled by ``model``."""
        if self.metrics is None:
            raise ApiError(404, "metrics are not enabled", "not_found")
        text = await self.metrics.exposition()
        request.setHeader(b"content-type", CONTENT_TYPE_PLAIN_0_0_4.encode("ascii"))
        return text

    async def activity(self, request: Request) -> bytes:
        store = self.need_store()
        model = _arg(request, b"model")
        result = await store.query(
            model=self.resolve(model, request).id if model else None,
            since=_number_arg(request, b"since"),
            until=_number_arg(request, b"until"),
            limit=int(_number_arg(request, b"limit", 1, 1000, whole=True) or 50),
            offset=int(_number_arg(request, b"offset", whole=True) or 0),
            key=_arg(request, b"key"),
        )
        return _json(request, result)

    async def activity_stats(self, request: Request) -> bytes:
        store = self.need_store()
        result = await store.stats(
            since=_number_arg(request, b"since"), until=_number_arg(request, b"until")
        )
        return _json(request, result)

    def need_store(self) -> ActivityStore:
        if self.store is None:
            raise ApiError(404, "the activity log is not enabled", "not_found")
        return self.store

    def live_events(self, request: Request) -> Deferred[None]:
        """Server-sent events: model states, log lines, activity rows, queue changes."""
        begin_event_stream(request)
        reader = _EventReader(request)
        request.registerProducer(reader, True)
        for model_id, process in sorted(self.scheduler.processes.items()):
            now = ModelChanged(model_id, process.state, process.pid, process.last_error)
            reader.send(*wire(now))
        unsubscribe_events = self.events.subscribe(lambda e: reader.send(*wire(e)))
        unsubscribe_logs = self.logs.subscribe(
            [PROXY, UPSTREAM],
            lambda source, line: reader.send("log", {"source": source, "line": line}),
        )

        done = _until_gone(unsubscribe_events, unsubscribe_logs)

        def drop() -> None:
            # unregistered first: cancelled, ``done`` has Klein finish the request
            request.unregisterProducer()
            done.cancel()

        reader.on_drop = drop
        return done

    def openapi(self, request: Request) -> bytes:
        return _json(request, openapi_document())

    # --- UI sessions (the door lets these by without a key) ------------------------

    def login(self, request: Request) -> bytes:
        return self._session_route(request, self.access.login)

    def logout(self, request: Request) -> bytes:
        return self._session_route(request, self.access.logout)

    def session(self, request: Request) -> bytes:
        return self._session_route(request, self.access.whoami)

    def _session_route(
        self, request: Request, answer: Callable[[Request], dict[str, Any]]
    ) -> bytes:
        request.setHeader(b"cache-control", b"no-store")  # errors too: they are raised
        document = answer(request)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document).encode()

    def swagger_redirect(self, request: Request) -> None:
        request.redirect(b"/swagger/")

    def swagger_page(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        ui_page(request.responseHeaders, inline_script=SWAGGER_INIT)
        return SWAGGER_PAGE

    def swagger_assets(self, request: Request) -> Any:
        from swagger_ui_bundle import swagger_ui_path  # only when the docs are asked for

        return static_folder(swagger_ui_path)

    def root(self, request: Request) -> None:
        request.redirect(b"/ui/")

    def ui_redirect(self, request: Request) -> None:
        request.redirect(b"/ui/")

    def ui(self, request: Request) -> Any:
        ui_page(request.responseHeaders)
        return static_folder(str(UI_DIR))

    def logs_text(self, request: Request) -> bytes | None:
        accept = request.getHeader(b"accept") or b""
        if b"text/html" in accept:
            request.redirect(b"/ui/#logs")
            return None
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return "".join(line + "\n" for line in self.logs.combined_history()).encode("utf-8")

    def stream_all(self, request: Request) -> Deferred[None]:
        return self.stream(request, [PROXY, UPSTREAM])

    def stream_one(self, request: Request, source: str) -> Deferred[None]:
        if source not in (PROXY, UPSTREAM):
            source = self.resolve(source, request).id
        return self.stream(request, [source])

    def stream(self, request: Request, sources: list[str]) -> Deferred[None]:
        """History (unless ``?no-history``), then live lines until the client leaves."""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        unbuffered(request.responseHeaders)
        request.write(b"")  # send the headers now: a quiet log may say nothing for long
        if not _has_flag(request, b"no-history"):
            for source in sources:
                for line in self.logs.history(source):
                    request.write(line.encode("utf-8") + b"\n")
        reader = _LogReader(request)
        request.registerProducer(reader, True)
        return _until_gone(self.logs.subscribe(sources, reader.line))


def _distinct_names(records: list[dict[str, Any]]) -> None:
    """No two entries of a model list with the same display name (front ends show
    only the name): a name used more than once gets the entry's id after it."""
    seen: dict[str, int] = {}
    for record in records:
        seen[record["name"]] = seen.get(record["name"], 0) + 1
    for record in records:
        if seen[record["name"]] > 1 and record["name"] != record["id"]:
            record["name"] = f"{record['name']} [{record['id']}]"


def static_folder(path: str) -> IResource:
    """The files under ``path``, as they are.  Twisted's ``static`` is imported at the
    first page asked for, not at startup: loading it reads the system's MIME types
    (~0.4 MiB of an idle daemon's memory, for pages many installs never open)."""
    from twisted.web.static import File

    return File(path)


def _serve_api_routes(api: type[Api]) -> None:
    """A Klein route for each entry of :data:`API_ROUTES`, answered by the ``Api``
    method the entry names (the model routes are registered in the class)."""
    for route in API_ROUTES:
        handler = getattr(api, route.handler)
        serve = api.router.route(
            route.rule, methods=list(route.methods), branch=route.branch, endpoint=route.path
        )
        serve(handler)


_serve_api_routes(Api)


def _credentials(key: str | None) -> dict[bytes, bytes]:
    """The headers that carry llamaswap's own key for a child or a peer."""
    if key is None:
        return {}
    return {b"authorization": b"Bearer " + key.encode(), b"x-api-key": key.encode()}


def _model_field(body: bytes) -> str | None:
    """``model`` of a body that may or may not be a JSON object."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    name = document.get("model") if isinstance(document, dict) else None
    return name if isinstance(name, str) else None


def _has_flag(request: Request, name: bytes) -> bool:
    """``?name`` with or without a value (``request.args`` drops bare names)."""
    query = request.uri.partition(b"?")[2]
    return any(part.partition(b"=")[0] == name for part in query.split(b"&"))


def _until_gone(*cleanups: Callable[[], None]) -> Deferred[None]:
    """A Deferred for Klein that fires only when the client leaves (it is cancelled);
    then ``cleanups`` run."""

    def end(_: object) -> None:
        for cleanup in cleanups:
            cleanup()

    done: Deferred[None] = Deferred(lambda d: None)
    done.addErrback(_ignore_cancel)
    done.addBoth(end)
    return done


def _ignore_cancel(failure: Failure) -> None:
    failure.trap(CancelledError)


def _missed(model_id: str, deadline: float) -> Any:
    def timed_out(result: object, timeout: float) -> object:
        raise ApiError(
            504,
            f"model {model_id!r} was not ready within the {deadline:g}s deadline; "
            "the request was not started",
            "deadline_exceeded",
        )

    return timed_out


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _arg(request: Request, name: bytes) -> str | None:
    values = _args(request, name)
    return values[0] if values else None


def _args(request: Request, name: bytes) -> list[str]:
    """Every value of ``?name=`` (a server may read another one than the first)."""
    return [v.decode("utf-8", errors="replace") for v in request.args.get(name, [])]


MAX_WHOLE_ARG = 2**53
"""Largest whole-number query value: exact as a float, and fits an SQLite integer."""


def _number_arg(
    request: Request, name: bytes, low: float = 0, high: float = math.inf, whole: bool = False
) -> float | None:
    """``?name=``: absent, or a finite number from ``low`` (never below 0) to ``high``,
    a whole one with ``whole``; anything else is a 400 naming the parameter."""
    raw = _arg(request, name)
    if raw is None or raw == "":
        return None
    shown = short_uri(raw.encode("utf-8", errors="replace"))
    kind = "whole number" if whole else "number"
    try:
        value = float(raw)
    except ValueError as e:
        raise ApiError(400, f"?{name.decode()}= must be a {kind}, got {shown!r}") from e
    top = min(high, MAX_WHOLE_ARG) if whole else high
    if not (math.isfinite(value) and low <= value <= top):
        bounds = f"from {low:g} to {top:g}" if math.isfinite(top) else f"of at least {low:g}"
        message = f"?{name.decode()}= must be a finite {kind} {bounds}, got {shown!r}"
        raise ApiError(400, message)
    if whole and not value.is_integer():
        raise ApiError(400, f"?{name.decode()}= must be a {kind}, got {shown!r}")
    return value


def _form_model(content_type: bytes, body: bytes) -> str:
    """The ``model`` field of a multipart form ("" without one), by a bounded scan
    (see ``forms``)."""
    try:
        field = form_field(content_type, body, b"model")
    except FormError as e:
        raise ApiError(400, f"the multipart form cannot be read: {e}") from e
    return field.decode("utf-8", errors="replace").strip() if field is not None else ""


@implementer(IPushProducer)
class _LiveReader:
    """A live-stream client: while its connection is full, new items are dropped,
    not buffered, so one slow reader costs nobody anything."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.paused = False
        self.dropped = 0

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.paused = True


class _EventReader(_LiveReader):
    """An event-stream client; one that stops reading for too long is dropped."""

    MAX_DROPPED = 1000
    on_drop: Any = None

    def send(self, kind: str, data: dict[str, Any]) -> None:
        if self.paused:
            self.dropped += 1
            if self.dropped > self.MAX_DROPPED and self.on_drop is not None:
                transport = self.request.channel.transport if self.request.channel else None
                if transport is not None:
                    transport.loseConnection()
                self.on_drop()
                self.on_drop = None
            return
        payload = json.dumps(data, default=str)
        self.request.write(named_event(kind, payload))


class _LogReader(_LiveReader):
    """A live log reader; it says how many lines it had to drop."""

    def line(self, source: str, line: str) -> None:
        if self.paused:
            self.dropped += 1
            return
        if self.dropped:
            self.request.write(f"[... {self.dropped} lines dropped]\n".encode())
            self.dropped = 0
        self.request.write(line.encode("utf-8") + b"\n")


#: how much of a name a client sent an error repeats (it may be up to ``maxRequestBytes``)
SHOWN_NAME_CHARS = 100


def _shown(name: str) -> str:
    """``name`` quoted for an error message, cut to :data:`SHOWN_NAME_CHARS`."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name)} characters)"
