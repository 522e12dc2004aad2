"""Who may do what: API keys with roles and model scopes, UI sessions, per-key limits.

Each ``apiKeys`` entry becomes an :class:`ApiKey`.  A plain key is an ``admin``
for every model (as before roles existed); an object entry names its key, its
``role`` and the ``models`` it may use.

- ``inference`` keys reach the routes that use a model (``MODEL_ROUTES``,
  ``/upstream/``), the model list (filtered) and the version; ``admin`` keys reach
  everything else too (load/unload, logs, events, activity, metrics, ``/running``).
  Every route not listed as an inference route is an admin route, so a route added
  later is closed to inference keys until someone opens it.
- The door (:meth:`Access.check`, run as soon as the headers are in) finds the
  caller (a key in a header, else a UI session cookie), refuses a role that does not
  reach the path (403) and a key over its limits (429), and attaches the caller to
  the request (:func:`caller_of`).  Which model a request uses is known only once
  its body is parsed: ``api.py`` asks :func:`may_use` then.
- A UI session is opened by ``POST /api/login`` with a key; its cookie is accepted
  only from this server's own pages (same-origin ``Sec-Fetch-Site`` or ``Origin``;
  a plain read of the UI's own API when a browser sends neither), so another page,
  even on a sibling port, cannot spend it.  A session lives while its key does.
- Wrong keys are counted per client address (:class:`Guesses`): past
  :data:`GUESSES_PER_MINUTE`, that address is refused whatever key it shows, for as
  long as it keeps guessing, so keys cannot be tried at wire speed from the LAN.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request
from zope.interface import Interface, implementer

from .addresses import client_key, host_of
from .errors import ApiError
from .guard import OPEN_METHODS, is_open_page, presented_key
from .logs import logger
from .origin import READ_METHODS, same_origin
from .routes import (
    API_ROUTES,
    MODEL_ROUTES,
    SESSION_PATHS,
    ModelRoute,
    path_pattern,
    routed_path,
    served_path,
    served_pattern,
)

if TYPE_CHECKING:
    from .config import Config

ROLES = ("inference", "admin")
#: wrong keys (a header, or a login) one client address may present in a minute
GUESSES_PER_MINUTE = 10
#: client addresses whose wrong keys are remembered at once (the oldest go first)
GUESSERS = 4096
INFERENCE, ADMIN = ROLES
SESSION_COOKIE = b"llamaswap_session"


def default_session_ttl() -> float:
    """``sessionTtl``'s declared default (imported here: the config package imports
    this module for ``ApiKey``)."""
    from .config.settings import Top, default

    return float(default(Top, "session_ttl"))


MAX_SESSIONS = 1000
"""Most open UI sessions; the oldest goes first (a login flood costs bounded memory)."""

# the routes an inference key reaches besides the model routes (API_ROUTES' paths)
INFERENCE_ROUTES = frozenset(
    {
        "/v1/models",
        "/models",
        "/v1/models/{model}",
        "/models/{model}",
        "/api/version",
        "/openapi.json",
    }
)
INFERENCE_PATHS = frozenset(r.encode() for r in INFERENCE_ROUTES if "{" not in r)
# a route with a parameter: every path below its fixed part (the router does not
# fold dot segments: /v1/models/../running asks for the model "../running")
INFERENCE_PREFIXES = tuple(r.partition("{")[0].encode() for r in INFERENCE_ROUTES if "{" in r)

_MODEL_PATH = re.compile("|".join(path_pattern(r.path) for r in MODEL_ROUTES))
# the model routes with methods for admins only, as a served path matches them
_ADMIN_ROUTES = tuple((served_pattern(r.path), r) for r in MODEL_ROUTES if r.admin_methods)
# llama-server's own copies of routes llamaswap keeps from inference keys (its
# ``/metrics``): reached through ``/upstream/<id>/``, they are for admins too
_ADMIN_OWN = tuple(
    (served_pattern(r.path), r.path)
    for r in API_ROUTES
    if r.llama_server and not r.open and r.path not in INFERENCE_ROUTES
)
# the UI's own reads: the cookie may come without Origin or Sec-Fetch-Site on these
UI_READS = frozenset(
    {b"/v1/models", b"/models", b"/running", b"/api/version", b"/api/events", b"/logs"}
)
UI_READ_PREFIXES = (b"/api/activity", b"/logs/stream")


class ICaller(Interface):
    """The key a request was made with, attached to the request by the door."""


@implementer(ICaller)
@attrs.frozen
class ApiKey:
    """One ``apiKeys`` entry.  Its ``name`` is what logs, activity and metrics show;
    the key itself never leaves this object (not even in its repr)."""

    name: str
    key: str = attrs.field(repr=False)
    role: str = ADMIN
    models: tuple[str, ...] = ("*",)
    max_concurrent: int | None = None
    requests_per_minute: int | None = None

    @property
    def digest(self) -> bytes:
        """What a session remembers of its key."""
        return hashlib.sha256(self.key.encode()).digest()

    def may_use(self, model: str) -> bool:
        return any(fnmatchcase(model, pattern) for pattern in self.models)

    def may_reach(self, path: bytes) -> bool:
        return self.role == ADMIN or reaches_as_inference(path)

    def describe(self) -> str:
        """What this key may do, for the 403 it gets."""
        if self.role == ADMIN:
            what = "every route (role admin)"
        else:
            what = (
                "the OpenAI and llama-server routes and /v1/models, but none that "
                "changes a server's settings, runs its tools or fetches URLs (role inference)"
            )
        models = "every model" if self.models == ("*",) else "models " + ", ".join(self.models)
        return f"key {self.name!r} may use {what}, for {models}"

    def public(self) -> dict[str, Any]:
        """The key's description as ``/api/session`` shows it (no secret)."""
        return {"name": self.name, "role": self.role, "models": list(self.models)}


def caller_of(request: Any) -> ApiKey | None:
    """The key ``request`` was made with; None when keys are off (anything goes)."""
    getter = getattr(request, "getComponent", None)
    return getter(ICaller) if getter is not None else None


def caller_name(request: Any) -> str | None:
    caller = caller_of(request)
    return caller.name if caller is not None else None


def require_route(request: Any, method: bytes, path: bytes) -> None:
    """Raise the 403 for an ``inference`` key using an admin method of a model route.

    ``path`` is what the model's server is sent (a model route's, or the rest of an
    ``/upstream/<id>/`` path), read the way the server reads it (``served_path``), so
    no spelling slips by.
    """
    caller = caller_of(request)
    if caller is None or caller.role == ADMIN:
        return
    served = served_path(path)
    for pattern, own in _ADMIN_OWN:
        if pattern.fullmatch(served) is not None:
            raise ApiError(
                403,
                f"this key may not use a model server's {own} (as llamaswap's own {own}: "
                f"admin keys only): {caller.describe()}",
                "route_not_allowed",
            )
    route = _admin_route(served)
    if route is not None and method.decode("latin-1").upper() not in route.inference_methods:
        shown = f"{method.decode('latin-1')} {route.path}"
        raise ApiError(
            403,
            f"this key may not use {shown} (it changes the server for everyone, runs "
            f"tools or fetches URLs: admin keys only): {caller.describe()}",
            "route_not_allowed",
        )


def admin_route(path: bytes) -> ModelRoute | None:
    """The model route with admin-only methods that ``path`` (maybe with a query) is."""
    return _admin_route(served_path(path))


def _admin_route(served: str) -> ModelRoute | None:
    for pattern, route in _ADMIN_ROUTES:
        if pattern.fullmatch(served) is not None:
            return route
    return None


def may_use(request: Any, model: str) -> bool:
    """Whether ``request``'s key may use ``model`` (an id or ``peer/id``).  Any other
    model is, to that key, as if it did not exist: ``/v1/models`` leaves it out, and
    naming it gets the 404 of an unknown model (a 403 would confirm that it exists)."""
    caller = caller_of(request)
    return caller is None or caller.may_use(model)


def uses_model(path: bytes) -> bool:
    """A route that relays to a model (the per-key limits count these)."""
    if path.startswith(b"/upstream/"):
        return True
    return _MODEL_PATH.fullmatch(path.decode("latin-1")) is not None


def reaches_as_inference(path: bytes) -> bool:
    return path in INFERENCE_PATHS or path.startswith(INFERENCE_PREFIXES) or uses_model(path)


class Keyring:
    """The keys in force; replaced as a whole on reload."""

    def __init__(self, keys: Iterable[ApiKey] = ()) -> None:
        self.keys = tuple(keys)
        self._by_digest = {key.digest: key for key in self.keys}

    def __bool__(self) -> bool:
        return bool(self.keys)

    def find(self, presented: str | None) -> ApiKey | None:
        if presented is None:
            return None
        given = presented.encode()
        found = None
        # compare with every key, always, so the time taken says nothing about which
        for key in self.keys:
            if hmac.compare_digest(given, key.key.encode()):
                found = key
        return found

    def by_digest(self, digest: bytes) -> ApiKey | None:
        return self._by_digest.get(digest)


@attrs.define
class Session:
    digest: bytes  # of the key it was opened with
    expires: float


class Sessions:
    """The open UI sessions, by the SHA-256 of their token (a lookup by the token
    itself would time how much of a guess was right)."""

    def __init__(self, clock: IReactorTime, ttl: float | None = None) -> None:
        self.clock = clock
        self.ttl = ttl if ttl is not None else default_session_ttl()
        self._open: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, key: ApiKey) -> str:
        token = secrets.token_urlsafe(32)
        self._open[_token_digest(token)] = Session(key.digest, self.clock.seconds() + self.ttl)
        while len(self._open) > MAX_SESSIONS:
            self._open.popitem(last=False)
        return token

    def find(self, token: bytes) -> Session | None:
        digest = _token_digest(token.decode("latin-1"))
        session = self._open.get(digest)
        if session is not None and session.expires <= self.clock.seconds():
            del self._open[digest]
            return None
        return session

    def close(self, token: bytes) -> None:
        self._open.pop(_token_digest(token.decode("latin-1")), None)

    def keep_only(self, keyring: Keyring) -> int:
        """End the sessions whose key is gone; how many ended."""
        gone = [t for t, s in self._open.items() if keyring.by_digest(s.digest) is None]
        for token in gone:
            del self._open[token]
        return len(gone)


def _token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("latin-1", errors="replace")).digest()


class Guesses:
    """Wrong keys presented, per client address (its IP; an IPv6 client: its /64).

    A leaky bucket: each new wrong key adds one, and the bucket drains at
    :data:`GUESSES_PER_MINUTE` a minute.  While it is full, every key that address
    presents is refused with 429, the right one too (else its answer would still tell
    a guess that hit), so a guesser gets ten tries a minute however fast it sends.
    A wrong key the address presented lately is no new guess (it learns nothing from
    its 401 again): a client retrying a stale key in a loop does not lock out the
    other clients of its address.  Other addresses are unaffected; requests without
    a key are not guesses.

    An IPv6 /64 is a whole LAN (every host of it picks its own addresses), so one
    guesser would lock out all its neighbours: a host that got in with a key, and
    has presented no wrong key since, keeps that key while its /64 is refused
    (:meth:`excused`).  A guessing host never is: behind one address (IPv4, a
    reverse proxy) this changes nothing.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        # address -> (wrong keys still in the bucket, when that was counted, the
        # digests of its last wrong keys)
        self._buckets: OrderedDict[str, tuple[float, float, tuple[bytes, ...]]] = OrderedDict()
        # host (a whole IP) -> the names of the keys it got in with since its last
        # wrong key
        self._known: OrderedDict[str, frozenset[str]] = OrderedDict()

    def __len__(self) -> int:
        """Addresses remembered (none: a request need not be asked for its address)."""
        return len(self._buckets)

    def _level(self, address: str) -> float:
        level, counted, _ = self._buckets.get(address, (0.0, 0.0, ()))
        drained = (self.clock.seconds() - counted) * GUESSES_PER_MINUTE / 60
        return max(0.0, level - drained)

    def wait(self, address: str | None) -> int | None:
        """Seconds until ``address`` may present a key again; None if it may now."""
        if address is None or address not in self._buckets:
            return None
        over = self._level(address) - (GUESSES_PER_MINUTE - 1)
        return math.ceil(over * 60 / GUESSES_PER_MINUTE) if over > 0 else None

    def got_in(self, host: str | None, key: ApiKey) -> None:
        """``host`` presented ``key``, and it was let in."""
        if host is None:
            return
        names = self._known.get(host, frozenset())
        if key.name not in names:
            self._known[host] = names | {key.name}
            while len(self._known) > GUESSERS:
                self._known.popitem(last=False)

    def excused(self, host: str | None, key: ApiKey | None) -> bool:
        """Whether ``host`` may use ``key`` while its address is refused."""
        return host is not None and key is not None and key.name in self._known.get(host, ())

    def wrong(self, address: str | None, host: str | None, presented: str) -> None:
        """``host`` (of ``address``) presented ``presented``, a key that is not one."""
        if host is not None:
            self._known.pop(host, None)
        if address is None:
            return
        digest = _token_digest(presented)
        _, _, recent = self._buckets.get(address, (0.0, 0.0, ()))
        if digest in recent:
            return  # the same wrong key again: no new guess
        level = self._level(address) + 1
        self._buckets.pop(address, None)
        recent = (*recent, digest)[-GUESSES_PER_MINUTE:]
        self._buckets[address] = (level, self.clock.seconds(), recent)
        while len(self._buckets) > GUESSERS:
            self._buckets.popitem(last=False)


def _too_many_guesses(wait: int) -> ApiError:
    return ApiError(
        429,
        f"too many wrong API keys from this address (more than {GUESSES_PER_MINUTE} a "
        f"minute): try again in {wait} s",
        "too_many_wrong_keys",
        headers={"retry-after": str(wait)},
    )


@attrs.define
class Usage:
    """One key's requests in flight and its rate bucket (kept across reloads by name)."""

    in_flight: int = 0
    tokens: float = math.inf
    updated: float = 0.0


def _header(request: Request, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def session_token(request: Request) -> bytes | None:
    """The session cookie's value, read from the headers (the door runs before Twisted
    parses cookies, which it does once the body is in)."""
    for header in request.requestHeaders.getRawHeaders(b"cookie") or []:
        for pair in header.split(b";"):
            name, sep, value = pair.strip().partition(b"=")
            if sep and name == SESSION_COOKIE and value:
                return value
    return None


def from_own_page(request: Request) -> bool:
    """Whether a browser sent ``request`` for one of this server's own pages (so a
    session cookie on it is the user's doing, not another page's)."""
    reading = request.method in READ_METHODS
    site = _header(request, b"sec-fetch-site")
    if site is not None:  # the browser's verdict; pages cannot forge it
        return site.lower() == b"same-origin" or (reading and site.lower() == b"none")
    origin = _header(request, b"origin")
    if origin is not None:
        return same_origin(origin, _header(request, b"host"))
    # neither (plain http to a LAN address): only the UI's own reads, which another
    # page could make its visitor's browser send but never read
    path = request.path
    return reading and (path in UI_READS or path.startswith(UI_READ_PREFIXES))


def not_a_browser_elsewhere(request: Request) -> bool:
    """Login: from our own page, or from a program that is no browser at all."""
    browser = any(_header(request, h) for h in (b"sec-fetch-site", b"origin"))
    return not browser or from_own_page(request)


class Access:
    """Owner of the keys in force, the UI sessions and each key's usage counters."""

    log = logger()

    def __init__(
        self, keys: Sequence[ApiKey], clock: IReactorTime, session_ttl: float | None = None
    ) -> None:
        self.clock = clock
        self.keyring = Keyring(keys)
        self.sessions = Sessions(clock, session_ttl)
        self.usage: dict[str, Usage] = {}
        self.guesses = Guesses(clock)

    def follow(self, config: Config) -> None:
        """A reload: ``apiKeys`` and ``sessionTtl``."""
        ended = self.reconfigure(config.api_keys, config.session_ttl)
        if ended:
            self.log.warn("ended {count} UI session(s) whose key was removed", count=ended)

    def reconfigure(self, keys: Sequence[ApiKey], session_ttl: float) -> int:
        """New keys for new requests (those in flight keep theirs); the sessions of keys
        that are gone end.  Returns how many sessions ended."""
        self.keyring = Keyring(keys)
        self.sessions.ttl = session_ttl
        names = {key.name for key in keys}
        for name in [n for n, u in self.usage.items() if n not in names and not u.in_flight]:
            del self.usage[name]
        return self.sessions.keep_only(self.keyring)

    # --- the door -------------------------------------------------------------------

    def check(self, request: Request) -> ApiError | None:
        """The door's key check: who is calling, may that key reach this path, is it
        within its limits.  None lets the request on (its caller attached)."""
        if not self.keyring:
            # no caller, said at once: asking the request for a component it lacks
            # walks zope's adapter registry, and a request asks several times
            request.setComponent(ICaller, None)
            return None
        path = request.path
        presented = presented_key(request)
        if presented is None:
            caller = self.session_key(request)
        else:
            refused, caller = self.guessed(request, presented)
            if refused is not None:
                return refused
        if caller is None:
            if path in SESSION_PATHS or _is_open(request):
                return None
            return ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>' "
                "(or the key as x-api-key, or as the Basic auth password), or log in "
                "at /ui/login.html",
                "invalid_api_key",
                headers={"www-authenticate": 'Bearer realm="llamaswap"'},
            )
        request.setComponent(ICaller, caller)
        if _is_open(request) or path in SESSION_PATHS:
            return None
        # as the router reads it (the route that answers): /v1/%63hat/completions is
        # a chat, and counts against the key's limits like one; dot segments are not
        # folded, the router does not fold them (the model's server's reading of an
        # /upstream/ path is checked once the model is known: require_route)
        routed = routed_path(path).encode("utf-8")
        if not caller.may_reach(routed):
            message = f"this key may not use {_shown(path)}: {caller.describe()}"
            return ApiError(403, message, "route_not_allowed")
        return self.admit(request, caller) if uses_model(routed) else None

    def guessed(self, request: Request, presented: str) -> tuple[ApiError | None, ApiKey | None]:
        """The key ``presented`` is, counted as a guess when it is none; or the 429 of
        an address that guessed too much."""
        address = request.getClientAddress()
        host = host_of(address)  # the whole IP
        key = self.keyring.find(presented)
        # whom it counts against; not worked out for a good key while nobody guessed
        counted = client_key(address) if key is None or self.guesses else None
        wait = self.guesses.wait(counted)
        if wait is not None and not self.guesses.excused(host, key):
            if key is None:
                self.guesses.wrong(None, host, presented)  # a guessing host is never excused
            return _too_many_guesses(wait), None
        if key is None:
            self.guesses.wrong(counted, host, presented)
        else:
            self.guesses.got_in(host, key)
        return None, key

    def authenticate(self, request: Request) -> ApiKey | None:
        """The key in a header, else the session cookie (from our own pages only)."""
        presented = presented_key(request)
        if presented is not None:
            return self.keyring.find(presented)
        return self.session_key(request)

    def session_key(self, request: Request) -> ApiKey | None:
        token = session_token(request)
        if not token or not from_own_page(request):
            return None
        session = self.sessions.find(token)
        return self.keyring.by_digest(session.digest) if session is not None else None

    def admit(self, request: Request, caller: ApiKey) -> ApiError | None:
        """Count a model request against its key's limits, or refuse it with 429."""
        if caller.max_concurrent is None and caller.requests_per_minute is None:
            return None
        usage = self.usage.setdefault(caller.name, Usage())
        if caller.max_concurrent is not None and usage.in_flight >= caller.max_concurrent:
            return _too_many(
                f"key {caller.name!r} already has {usage.in_flight} requests in flight "
                f"(maxConcurrent: {caller.max_concurrent})",
                1,
            )
        if caller.requests_per_minute is not None:
            now = self.clock.seconds()
            per_second = caller.requests_per_minute / 60
            capacity = float(caller.requests_per_minute)
            usage.tokens = min(capacity, usage.tokens + (now - usage.updated) * per_second)
            usage.updated = now
            if usage.tokens < 1:
                wait = math.ceil((1 - usage.tokens) / per_second)
                return _too_many(
                    f"key {caller.name!r} made more than {caller.requests_per_minute} "
                    "requests in a minute (requestsPerMinute)",
                    wait,
                )
            usage.tokens -= 1
        usage.in_flight += 1

        def release(_: object) -> None:
            usage.in_flight -= 1

        request.notifyFinish().addBoth(release)
        return None

    # --- the session routes ---------------------------------------------------------

    def login(self, request: Request) -> dict[str, Any]:
        """``POST /api/login`` with ``{"key": ...}``: a session cookie for that key."""
        if not not_a_browser_elsewhere(request):
            raise ApiError(403, "log in from this server's own login page", "cross_site_request")
        body = request.content.read() if request.content is not None else b""
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, 'send {"key": "<API key>"} as JSON') from e
        presented = document.get("key") if isinstance(document, dict) else None
        if not isinstance(presented, str):
            raise ApiError(400, 'send {"key": "<API key>"} as JSON')
        refused, key = self.guessed(request, presented) if self.keyring else (None, None)
        if refused is not None:
            raise refused
        if key is None:
            raise ApiError(
                401,
                "that is not a valid API key" if self.keyring else "this server has no keys",
                "invalid_api_key",
            )
        token = self.sessions.open(key)
        request.addCookie(
            SESSION_COOKIE,
            token.encode(),
            path=b"/",
            max_age=str(int(self.sessions.ttl)).encode(),
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
        )
        return key.public()

    def logout(self, request: Request) -> dict[str, Any]:
        token = session_token(request)
        if token and from_own_page(request):
            self.sessions.close(token)
        request.addCookie(
            SESSION_COOKIE,
            b"",
            path=b"/",
            max_age=b"0",
            httpOnly=True,
            secure=request.isSecure(),
            sameSite="strict",
        )
        return {"msg": "ok"}

    def whoami(self, request: Request) -> dict[str, Any]:
        """``GET /api/session``: who the UI is talking as (``keys: false`` when off)."""
        if not self.keyring:
            return {"keys": False, "name": None, "role": ADMIN, "models": ["*"]}
        caller = caller_of(request) or self.authenticate(request)
        if caller is None:
            raise ApiError(401, "not logged in", "invalid_api_key")
        return {"keys": True, **caller.public()}


def _is_open(request: Request) -> bool:
    return request.method in OPEN_METHODS and is_open_page(request.path)


def _shown(path: bytes) -> str:
    text = path.decode("latin-1")
    return text if len(text) <= 100 else text[:100] + "..."


def _too_many(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, "key_limit_reached", headers={"retry-after": str(retry_after)})
