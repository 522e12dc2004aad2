"""The door: whether a request may go on is decided once its headers are in.

``ApiSite`` serves HTTP through ``DoorChannel``.  When a request's headers are
complete, before a byte of its body is read, the door refuses it if its URI is too
long or holds a raw ``#`` (what relays it cuts a fragment off, the checks would
not), if its method is not in capitals (the router would read ``post`` as ``POST``,
the checks would not), if its ``Transfer-Encoding`` is anything but one ``chunked``
(Twisted and a proxy in front could find the body's end apart), if one of the
site's ``checks`` (``HeaderCheck`` callables run in order: the
API-key check of ``Guard``, and any other header check plugged in before or after
it) returns an ``ApiError``, or if it declares a body larger than
``maxRequestBytes``.  A refused request gets its OpenAI-shaped error at once and the
connection is closed: its body is never read, stored or parsed, so a stranger's
upload costs nothing but the headers.

A body that grows past the limit while it arrives (chunked) stops being stored and
gets 413.  Twisted's own form parsing is off (``parsePOSTFormSubmission=False``);
the one field llamaswap needs from a multipart form is found by ``forms``, after
the door.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from http import HTTPStatus
from io import BytesIO
from typing import TYPE_CHECKING, Any

from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from .errors import ApiError, closing_response
from .routes import API_ROUTES

if TYPE_CHECKING:
    from .access import Access
    from .config import Config


class Answered:
    """What a header check returns when it has answered the request itself (status and
    headers set, no body), e.g. a CORS preflight."""


ANSWERED = Answered()

HeaderCheck = Callable[[Request], ApiError | Answered | None]
"""A check the door runs on a request's line and headers (``method``, ``uri``,
``path`` and the request headers are set; the body is not there yet); it refuses
the request by returning an error, or answers it itself (``ANSWERED``).  A check
may also set answer headers that every response to the request should carry."""

# Paths anyone may GET: the routes the table marks open (liveness, and what a browser
# needs to ask for a key); an open branch (static files) opens what is below it.
OPEN_PATHS = frozenset(
    [r.path.encode() for r in API_ROUTES if r.open]
    + [r.path.rstrip("/").encode() for r in API_ROUTES if r.open and r.branch]
    + [b"/favicon.ico"]  # no route: browsers ask for it anyway; a 404 and no key prompt
)
OPEN_PREFIXES = tuple(r.path.encode() for r in API_ROUTES if r.open and r.branch)
OPEN_METHODS = (b"GET", b"HEAD")

MAX_URI_BYTES = 8192
"""Longest request target: far above any route's need, far below the log ring."""

LOGGED_URI_CHARS = 200
"""How much of a URI a log line may show."""


class _Sink:
    """Where a body goes once it has passed the limit: nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


def short_uri(uri: bytes) -> str:
    """A URI cut to ``LOGGED_URI_CHARS`` for log lines, saying how long it was."""
    text = uri.decode("ascii", errors="backslashreplace")
    if len(text) <= LOGGED_URI_CHARS:
        return text
    return f"{text[:LOGGED_URI_CHARS]}...({len(uri)} bytes)"


def answer_with_error(request: Request, error: ApiError, *, close: bool = True) -> None:
    """Answer ``request`` with ``error`` now; with ``close``, end the connection after
    (the body may not have been read, so nothing after it can be trusted)."""
    for name, value in error.headers.items():
        request.setHeader(name, value)
    body = error.body()
    request.setResponseCode(error.status, _phrase(error.status))
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    if close:
        request.setHeader(b"connection", b"close")
        if request.channel is not None:
            request.channel.persistent = False
    request.write(body)  # Twisted sends no body for HEAD
    request.finish()


def _phrase(status: int) -> bytes | None:
    """The reason phrase, also for codes Twisted has no name for (421, 508)."""
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return None


def answer_now(request: Request, outcome: ApiError | Answered) -> None:
    """Answer a request the door stopped; its body was never read, so the connection
    ends after the answer."""
    if isinstance(outcome, ApiError):
        answer_with_error(request, outcome)
        return
    if not request.responseHeaders.hasHeader(b"content-length"):
        request.setHeader(b"content-length", b"0")
    request.setHeader(b"connection", b"close")
    if request.channel is not None:
        request.channel.persistent = False
    request.finish()


class LimitedRequest(Request):
    """A request the door may refuse before its body, and whose stored body is at most
    ``site.max_request_bytes`` long."""

    refusal: ApiError | Answered | None = None
    too_large = False
    received = 0  # body bytes handed to us (stored or not)

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_request_bytes", 0)) or 2**62

    def line_received(self, method: bytes, uri: bytes, version: bytes) -> None:
        """The request line, known before the headers (Twisted sets these again later)."""
        self.method, self.uri, self.clientproto = method, uri, version
        self.path = uri.split(b"?", 1)[0]

    def refuse(self, outcome: ApiError | Answered) -> None:
        """Called by the door before ``gotLength``: answer ``outcome``, read no body."""
        self.refusal = outcome
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" for a refusal

    def gotLength(self, length: int | None) -> None:
        if self.refusal is not None:
            self.content = BytesIO()  # stays empty: the body is never read
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self.received += len(data)
        if not self.too_large and self.received > self._limit():
            self.too_large = True
            if self.content is not None:
                self.content.close()
            self.content = _Sink()
        if not self.too_large:
            super().handleContentChunk(data)

    def process(self) -> None:
        if self.refusal is not None:
            answer_now(self, self.refusal)
        elif self.too_large:
            answer_with_error(self, too_large(self._limit()))
        else:
            super().process()

    def __repr__(self) -> str:
        # Twisted's log lines show requests by repr: never a whole 8 kB URI
        method = self.method.decode("ascii", errors="backslashreplace")
        return f"<{type(self).__name__} {method} {short_uri(self.uri)}>"


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"the request body is larger than {limit} bytes (maxRequestBytes)",
        "request_too_large",
    )


class DoorChannel(HTTPChannel):
    """An HTTP channel that asks its site's door about each request as soon as the
    request's headers are complete, and reads no body of a refused one.

    A head past Twisted's bounds (a line over ``MAX_LENGTH``, more than
    ``totalHeadersSize`` bytes or ``maxHeaders`` header lines) gets an OpenAI-shaped
    414 or 431 and the connection closed: Twisted itself hung up on a long line
    without a word, and answered the others with a bare 400."""

    site: ApiSite
    #: bytes and header lines of the request head being read (lines are read only
    #: between requests: while one is handled, what follows waits in a buffer)
    head_bytes = 0
    head_lines = 0

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.requests:  # the request line is in: a header line is too long
            message = f"a request header line is longer than {self.MAX_LENGTH} bytes"
            self._refuse_head(ApiError(431, message))
        else:
            message = f"the request line is longer than {self.MAX_LENGTH} bytes"
            self._refuse_head(ApiError(414, f"{message} (a URI may have {MAX_URI_BYTES})"))

    def _refuse_head(self, error: ApiError) -> None:
        assert self.transport is not None
        self.transport.write(closing_response(error))
        self.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if not self.requests:  # a request line: a new head begins
            self.head_bytes = self.head_lines = 0
        elif line:
            self.head_lines += 1
        self.head_bytes += len(line)
        if self.head_bytes > self.totalHeadersSize:
            limit = self.totalHeadersSize
            self._refuse_head(ApiError(431, f"the request head is longer than {limit} bytes"))
            return
        if self.head_lines > self.maxHeaders:
            self._refuse_head(ApiError(431, f"the request has more than {self.maxHeaders} headers"))
            return
        pending = len(self.requests)
        super().lineReceived(line)
        if len(self.requests) > pending:  # that line started a request
            request = self.requests[-1]
            parts = line.split(b" ")
            if len(parts) == 3 and isinstance(request, LimitedRequest):
                request.line_received(*parts)

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        refusal = None
        if isinstance(request, LimitedRequest):
            refusal = self.site.door(request, self.length)
            if refusal is not None:
                request.refuse(refusal)
                # the request is complete without its body: answered now, then closed
                self.length = 0
        super().allHeadersReceived()
        if refusal is not None:
            self.persistent = False


class ApiSite(Site):
    """The HTTP site: the door (``checks`` plus the size limits) in front of
    ``resource``."""

    requestFactory = LimitedRequest
    # HTTP/1.1 only: Twisted's default wraps the channel to switch to HTTP/2 after a
    # TLS ALPN agreement, which needs the optional h2 package llamaswap never had
    protocol = DoorChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        max_request_bytes: int,
        checks: Sequence[HeaderCheck] = (),
        access_log: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, **kwargs)
        self.max_request_bytes = max_request_bytes
        self.checks = list(checks)
        self.access_log = access_log

    def follow(self, config: Config) -> None:
        """A reload: the body limit for requests from now on (``maxRequestBytes``)."""
        self.max_request_bytes = config.max_request_bytes

    def door(self, request: Request, length: int | None) -> ApiError | Answered | None:
        """Why ``request`` may not go on, judged from its line and headers alone
        (``length``: the declared body length, None when chunked)."""
        if len(request.uri) > MAX_URI_BYTES:
            return ApiError(414, f"the request URI is longer than {MAX_URI_BYTES} bytes")
        if request.method != request.method.upper():
            # llamaswap's router (werkzeug) reads "post" as POST, its checks and the
            # model's server do not: one reading for all, or none
            return ApiError(400, "HTTP methods are case-sensitive: send them in capitals")
        if b"#" in request.uri:
            # a fragment is no part of a request target (clients never send one), yet
            # what relays it (llamaswap's clients, llama-server) cuts it off: the checks
            # would judge "/props#x" while "/props" runs
            return ApiError(400, "the request URI has a '#': send its fragment escaped (%23)")
        codings = request.requestHeaders.getRawHeaders(b"transfer-encoding")
        if codings is not None and [c.strip().lower() for c in codings] != [b"chunked"]:
            # Twisted reads "chunked" then "identity" as chunked and ignores "identity"
            # (reading no body without a Content-Length), where a proxy in front may
            # read either the other way: the body boundary is one reading, or none
            return ApiError(400, "the request's Transfer-Encoding may only be one 'chunked'")
        for check in self.checks:
            outcome = check(request)
            if outcome is not None:
                return outcome
        limit = self.max_request_bytes
        if limit and length is not None and length > limit:
            return too_large(limit)
        return None

    def log(self, request: Any) -> None:
        # one line per request costs real CPU at high rates: only with logRequests
        if self.access_log:
            super().log(request)


class Checked(Resource):
    """``inner`` behind header ``checks``, for a resource served without the door
    (an in-memory test world): the same checks, run when the request is rendered."""

    isLeaf = True

    def __init__(self, inner: IResource, checks: Sequence[HeaderCheck]) -> None:
        super().__init__()
        self.inner = inner
        self.checks = list(checks)

    def render(self, request: Request) -> Any:
        for check in self.checks:
            outcome = check(request)
            if isinstance(outcome, ApiError):
                answer_with_error(request, outcome, close=False)
                return NOT_DONE_YET
            if outcome is not None:
                request.finish()
                return NOT_DONE_YET
        return self.inner.render(request)


def presented_key(request: Request) -> str | None:
    """The key a client sent: Basic password, else Bearer token, else x-api-key."""
    authorization = request.getHeader(b"authorization") or b""
    scheme, _, credentials = authorization.partition(b" ")
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2].decode("utf-8", errors="replace")
    if scheme.lower() == b"bearer" and credentials.strip():
        return credentials.strip().decode("utf-8", errors="replace")
    api_key = request.getHeader(b"x-api-key")
    return api_key.decode("utf-8", errors="replace") if api_key else None


class Guard(Resource):
    """The API keys (see ``access``): ``check`` is the door's key check (who calls,
    may that key reach this path, is it within its limits; the caller is attached to
    the request), and as the resource in front of ``inner`` the Guard asks again, for
    whatever reaches it without the door."""

    isLeaf = True

    def __init__(self, inner: IResource, access: Access) -> None:
        super().__init__()
        self.inner = inner
        self.access = access

    def check(self, request: Request) -> ApiError | None:
        """None when ``request`` may go on: keys are off, it is an open page, or its
        key (or UI session) reaches this path within its limits."""
        return self.access.check(request)

    def render(self, request: Request) -> Any:
        from .access import caller_of  # access builds on this module

        if caller_of(request) is None:  # not checked at the door
            refusal = self.check(request)
            if refusal is not None:
                answer_with_error(request, refusal, close=False)
                return NOT_DONE_YET
        return self.inner.render(request)


def is_open_page(path: bytes) -> bool:
    """A page anyone may read: liveness, the UI, Swagger."""
    return path in OPEN_PATHS or any(path.startswith(prefix) for prefix in OPEN_PREFIXES)
