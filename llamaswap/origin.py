"""Browsers can't be used against llamaswap: Host, cross-site and CORS checks.

A web page on any site can make its visitor's browser send requests to a LAN
address: ``<img src=http://box:8080/unload>``, a ``no-cors`` POST, an
auto-submitted form.  The browser cannot read the answers, but the request has
already run a model or changed state.  And through DNS rebinding, a page on a
name the attacker controls can even read them.  These checks stop both:

- ``HostCheck``: the ``Host`` header must name this server (loopback names, this
  machine's names, ``allowedHosts``, or an IP address: a rebinding page always uses
  a *name* it controls, and an address the client could connect to is ours).
- ``CrossSiteCheck``: a request a browser sent for another site's page is refused,
  recognised by ``Sec-Fetch-Site`` (when the browser sends it), else by ``Origin``,
  else (GET and HEAD only) by ``Referer``.  Only a top-level navigation to a
  read-only page (the UI, Swagger, ``/health``) may come from another site.
  Origins listed in ``cors.allowOrigins`` are exempt.
- ``Cors``: the opt-in CORS answers for those allowed origins.

Each check is a callable ``(request) -> ApiError | None`` that reads only the
method, the path and the headers, so it can run as soon as the headers are in.
Clients that are not browsers (curl, the SDKs) send none of these headers and are
not affected.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import attrs
from twisted.web.http_headers import Headers

from .errors import ApiError
from .guard import ANSWERED, Answered

if TYPE_CHECKING:
    from .config import CorsConfig


class RequestHead(Protocol):
    """What a check may look at: available once the headers have arrived."""

    method: bytes
    path: bytes
    requestHeaders: Headers


class Responding(RequestHead, Protocol):
    """A request the CORS headers can be written to."""

    responseHeaders: Headers

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...


Check = Callable[[RequestHead], ApiError | None]

# Sec-Fetch-Site values of requests this server's own pages (or the user) started
TRUSTED_FETCH_SITES = (b"same-origin", b"none")
READ_METHODS = (b"GET", b"HEAD")
LOOPBACK_NAMES = ("localhost",)


def _header(request: RequestHead, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name:port`` → (lower-case name without a final dot, port); None if malformed."""
    text = value.strip().lower()
    if not text or any(c in text for c in "@/\\?# \t") or any(ord(c) < 33 for c in text):
        return None
    try:
        parts = urlsplit("//" + text)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    if text.startswith("[") and not _is_ip(host):
        return None
    return host.removesuffix("."), port


def parse_origin(value: str) -> tuple[str, str, int | None] | None:
    """``scheme://host[:port]`` → (scheme, host, port without the scheme's default)."""
    scheme, sep, rest = value.strip().partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https") or any(c in rest for c in "/?#"):
        return None
    split = split_host(rest)
    if split is None:
        return None
    host, port = split
    if port == {"http": 80, "https": 443}[scheme]:
        port = None
    return scheme, host, port


def normal_origin(value: str) -> str | None:
    """An origin as browsers write it (lower case, no default port); None if it is not one."""
    parsed = parse_origin(value)
    if parsed is None:
        return None
    scheme, host, port = parsed
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" + (f":{port}" if port is not None else "")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def machine_names() -> frozenset[str]:
    """This machine's own names, once at startup (``gethostname`` asks no DNS server)."""
    name = socket.gethostname().lower().removesuffix(".")
    if not name:
        return frozenset()
    short = name.split(".")[0]
    return frozenset({name, short, f"{short}.local"})


class HostCheck:
    """Refuses a ``Host`` that is not one of this server's names (DNS rebinding)."""

    def __init__(self, names: Iterable[str], patterns: Iterable[str] = ()) -> None:
        self.names = frozenset(n.lower().removesuffix(".") for n in names) | set(LOOPBACK_NAMES)
        patterns = tuple(patterns)
        self.everything = "*" in patterns
        # "*.example.com" matches names ending ".example.com"; *.localhost is loopback
        self.suffixes = (*(p[1:].lower() for p in patterns if p.startswith("*.")), ".localhost")
        self._verdict = functools.lru_cache(maxsize=256)(self._judge)

    def __call__(self, request: RequestHead) -> ApiError | None:
        if self.everything:
            return None
        values = request.requestHeaders.getRawHeaders(b"host") or []
        if not values:
            return None  # HTTP/1.0 without Host: no browser sends that
        if len(values) > 1:
            return ApiError(400, "the request has more than one Host header", "bad_host")
        verdict = self._verdict(values[0])
        if verdict is None:
            return ApiError(400, "the Host header is not a valid host name", "bad_host")
        if verdict is True:
            return None
        shown = values[0].decode("latin-1")
        return ApiError(
            421,
            f"the Host header {shown!r} is not a name of this server, so the request was "
            "refused (a guard against DNS rebinding). If clients reach llamaswap under "
            f"this name, add {verdict!r} to allowedHosts in the configuration.",
            "host_not_allowed",
        )

    def _judge(self, value: bytes) -> bool | str | None:
        """True if allowed, the name if not, None if malformed (cached: clients repeat)."""
        split = split_host(value.decode("latin-1"))
        if split is None:
            return None
        return True if self.allows(split[0]) else split[0]

    def allows(self, host: str) -> bool:
        if host in self.names or host.endswith(self.suffixes):
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        # "0.0.0.0" reaches this machine from a browser on it but is no one's origin
        return not (address.is_unspecified or address.is_multicast)


class CrossSiteCheck:
    """Refuses requests a browser made for another site's page."""

    def __init__(self, allowed: Callable[[bytes], bool], is_page: Callable[[bytes], bool]) -> None:
        self.allowed = allowed
        self.is_page = is_page

    def __call__(self, request: RequestHead) -> ApiError | None:
        origin = _header(request, b"origin")
        if origin is not None and self.allowed(origin):
            return None
        reading = request.method in READ_METHODS
        page = reading and self.is_page(request.path)
        site = _header(request, b"sec-fetch-site")
        if site is not None:
            # the browser's own verdict, which a page cannot forge; "same-site" is
            # another port or a sibling name, not this server
            if site.lower() in TRUSTED_FETCH_SITES or (page and _navigation(request)):
                return None
            return self.refuse(origin)
        # No Sec-Fetch-* (older browsers, and every browser talking to a plain-http
        # address that is not loopback): Origin is sent with every POST and CORS request.
        host = _header(request, b"host")
        if origin is not None:
            return None if same_origin(origin, host) else self.refuse(origin)
        # A GET or HEAD with neither header may still be an <img> or a link; the
        # Referer says from where, unless the page suppressed it.  Pages may be linked.
        referer = _header(request, b"referer")
        if reading and not page and referer is not None and not same_origin(referer, host):
            return self.refuse(None)
        return None

    @staticmethod
    def refuse(origin: bytes | None) -> ApiError:
        where = f"a web page at {origin.decode('latin-1')}" if origin else "another site's page"
        return ApiError(
            403,
            f"cross-site request refused: {where} asked a browser to send it. Browser apps "
            "on other origins must be listed in cors.allowOrigins in the configuration; "
            "programs that are not browsers are not affected.",
            "cross_site_request",
        )


def _navigation(request: RequestHead) -> bool:
    """A top-level navigation (a link, a bookmark); not a frame, image or fetch."""
    return (
        _header(request, b"sec-fetch-mode") == b"navigate"
        and _header(request, b"sec-fetch-dest") == b"document"
    )


def same_origin(url: bytes, host: bytes | None) -> bool:
    """Whether ``url`` (an Origin or a Referer) names the server the ``Host`` header names.

    Scheme aside (behind a TLS proxy the server cannot know the client's): the host
    and the port must match, a missing port matching the scheme's default.
    """
    if host is None:
        return False
    text = url.decode("latin-1")
    scheme, sep, rest = text.partition("://")
    parsed = parse_origin(scheme + sep + rest.split("/", 1)[0].split("?", 1)[0]) if sep else None
    target = split_host(host.decode("latin-1"))
    if parsed is None or target is None:
        return False
    _, origin_host, origin_port = parsed
    host_name, host_port = target
    if host_port == {"http": 80, "https": 443}.get(parsed[0]):
        host_port = None
    return (origin_host, origin_port) == (host_name, host_port)


@attrs.frozen
class Cors:
    """The CORS answers for ``cors.allowOrigins``; nothing at all when it is empty."""

    origins: frozenset[str] = frozenset()
    methods: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    max_age: int = 600

    @classmethod
    def from_config(cls, config: CorsConfig) -> Cors:
        return cls(
            frozenset(config.allow_origins),
            config.allow_methods,
            config.allow_headers,
            config.max_age,
        )

    def allows(self, origin: bytes) -> bool:
        if not self.origins:
            return False
        if "*" in self.origins:
            return True
        return normal_origin(origin.decode("latin-1")) in self.origins

    def preflight(self, request: Responding) -> bool:
        """Answer an allowed origin's preflight (204 and the headers); False if not one."""
        origin = _header(request, b"origin")
        wanted = _header(request, b"access-control-request-method")
        if request.method != b"OPTIONS" or origin is None or wanted is None:
            return False
        if not self.allows(origin):
            return False
        out = request.responseHeaders
        out.setRawHeaders(b"access-control-allow-origin", [origin])
        out.setRawHeaders(b"access-control-allow-methods", [", ".join(self.methods).encode()])
        if "*" in self.headers:  # a literal "*" would not cover Authorization
            asked = _header(request, b"access-control-request-headers")
            allowed = [asked] if asked else []
        else:
            allowed = [", ".join(self.headers).encode()] if self.headers else []
        if allowed:
            out.setRawHeaders(b"access-control-allow-headers", allowed)
        out.setRawHeaders(b"access-control-max-age", [str(self.max_age).encode()])
        out.setRawHeaders(
            b"vary", [b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"]
        )
        out.setRawHeaders(b"content-length", [b"0"])
        request.setResponseCode(204)
        return True

    def decorate(self, request: Responding) -> None:
        """The headers every answer gets: CORS for allowed origins, and no framing by others."""
        out = request.responseHeaders
        # the UI has buttons: another site must not show it in a frame and steer clicks
        out.setRawHeaders(b"x-frame-options", [b"SAMEORIGIN"])
        out.setRawHeaders(b"content-security-policy", [b"frame-ancestors 'self'"])
        if not self.origins:
            return
        out.addRawHeader(b"vary", b"Origin")
        origin = _header(request, b"origin")
        if origin is not None and self.allows(origin):
            out.setRawHeaders(b"access-control-allow-origin", [origin])


#: The web UI's own pages: script, style and connections from llamaswap's origin
#: only, nothing inline (no ``<script>`` body, no ``on...=`` handler, no ``style=``), no
#: plugins, frames or ``<base>``.  The UI builds its DOM with ``textContent``; should a
#: hostile string (a model's name, a child's output) ever become markup there, it
#: still cannot run.  (``data:`` images: the page's empty favicon.)
UI_POLICY = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"object-src 'none'; frame-src 'none'; base-uri 'none'; form-action 'self'"
)


def ui_page(headers: Headers, inline_script: bytes | None = None) -> None:
    """Mark ``headers`` as those of one of llamaswap's own pages (:data:`UI_POLICY`),
    beside the framing policy every answer has; ``inline_script``: the one inline
    script such a page has, allowed by its hash and nothing else."""
    policy = UI_POLICY
    if inline_script is not None:
        digest = base64.b64encode(hashlib.sha256(inline_script).digest())
        policy = policy.replace(b"script-src 'self'", b"script-src 'self' 'sha256-" + digest + b"'")
    headers.addRawHeader(b"content-security-policy", policy)


def not_ours(headers: Headers, *, sandbox: bool = True) -> None:
    """Mark ``headers`` as those of a body llamaswap did not write: never sniffed as
    HTML, and (``sandbox``) never a document of llamaswap's origin."""
    if sandbox:
        headers.addRawHeader(b"content-security-policy", b"sandbox")
    headers.setRawHeaders(b"x-content-type-options", [b"nosniff"])


#: Answer headers that act on llamaswap's whole origin, beyond the one answer they
#: come with: its cookie jar (a server's ``llamaswap_session`` replaced the UI's
#: session), its stored data (``Clear-Site-Data`` signed every user out), and
#: origin-wide policies a browser keeps (transport security, alternative services,
#: error reporting to another site, client hints, agent clustering, a service
#: worker's scope).  No model server is llamaswap's origin, trusted pages or not.
ORIGIN_WIDE = frozenset(
    {
        b"set-cookie",
        b"set-cookie2",
        b"clear-site-data",
        b"strict-transport-security",
        b"alt-svc",
        b"nel",
        b"report-to",
        b"accept-ch",
        b"critical-ch",
        b"origin-agent-cluster",
        b"service-worker-allowed",
    }
)

#: Answer headers that send the browser to another address: a redirect's
#: ``Location`` (a fetch follows it with the page's cookie, and a 307 keeps the
#: method and body: a model server's 307 to ``/api/models/unload`` made the UI's own
#: chat request stop every model with the signed-in admin's session) and
#: ``Refresh``.  A server's redirect still arrives, as a 3xx that goes nowhere.
NAVIGATING = frozenset({b"location", b"refresh"})


def over_upstream(upstream: Headers, ours: Headers, *, sandbox: bool = True) -> Headers:
    """A model server's answer headers under llamaswap's browser policy (``upstream`` is
    changed and returned).

    llamaswap alone answers CORS: the server's own ``Access-Control-*`` headers go
    (llama-server allows every Origin), ours stay.  Our ``Vary`` and frame policy are
    added to the server's; its ``X-Frame-Options``, if any, is kept.

    A model server's answer is never a page of llamaswap's origin: a document it
    sends (its own web UI, a page ``/cors-proxy`` fetched, anything a hostile server
    writes) is sandboxed, so its scripts cannot run with the session cookie and the
    same-origin standing of llamaswap's own pages; and it is never sniffed as HTML.
    Without ``sandbox`` (a model whose pages the configuration trusts) its pages are
    shown as they are.  Either way it sets nothing of the origin's own
    (:data:`ORIGIN_WIDE`: cookies, site data, origin-wide policies) and sends the
    browser nowhere (:data:`NAVIGATING`: a redirect it follows as llamaswap's page).
    """
    for name, _ in list(upstream.getAllRawHeaders()):
        lower = name.lower()
        if lower.startswith(b"access-control-") or lower in ORIGIN_WIDE or lower in NAVIGATING:
            upstream.removeHeader(name)
    not_ours(upstream, sandbox=sandbox)
    for name, values in ours.getAllRawHeaders():
        lower = name.lower()
        if lower.startswith(b"access-control-") or lower in (b"vary", b"content-security-policy"):
            for value in values:
                upstream.addRawHeader(name, value)
        elif lower == b"x-frame-options" and not upstream.hasHeader(name):
            upstream.setRawHeaders(name, values)
    return upstream


@attrs.frozen
class BrowserPolicy:
    """Everything this module decides, built from the configuration (again on reload)."""

    host: HostCheck
    cross_site: CrossSiteCheck
    cors: Cors

    @classmethod
    def build(
        cls,
        allowed_hosts: Sequence[str],
        cors: CorsConfig,
        local_names: Iterable[str],
        is_page: Callable[[bytes], bool],
    ) -> BrowserPolicy:
        names = [h for h in allowed_hosts if not h.startswith("*")]
        patterns = [h for h in allowed_hosts if h.startswith("*")]
        answers = Cors.from_config(cors)
        return cls(
            HostCheck([*local_names, *names], patterns),
            CrossSiteCheck(answers.allows, is_page),
            answers,
        )

    @property
    def checks(self) -> tuple[Check, ...]:
        """In order: a request for a foreign Host is refused before anything else."""
        return (self.host, self.cross_site)

    def refusal(self, request: RequestHead) -> ApiError | None:
        for check in self.checks:
            error = check(request)
            if error is not None:
                return error
        return None


class BrowserDoor:
    """The door's browser check: the current :class:`BrowserPolicy` (replaced on
    reload) on one request's headers.

    Every answer gets the CORS and framing headers; a foreign Host or a cross-site
    request is refused; an allowed origin's preflight is answered here, before the
    key check (browsers send no key on a preflight).
    """

    def __init__(self, policy: BrowserPolicy) -> None:
        self.policy = policy

    def __call__(self, request: Responding) -> ApiError | Answered | None:
        policy = self.policy
        policy.cors.decorate(request)
        refusal = policy.refusal(request)
        if refusal is not None:
            return refusal
        return ANSWERED if policy.cors.preflight(request) else None
