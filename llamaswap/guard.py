"""The door: request-size limit and API keys, before any route runs.

``ApiSite`` makes requests that stop storing their body once it passes
``maxRequestBytes`` and answer 413 instead of dispatching.  ``Guard`` wraps the
application resource and asks for one of ``apiKeys`` (Bearer token, the password
of Basic auth, or ``x-api-key``), compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from .errors import ApiError
from .origin import BrowserPolicy

# Paths anyone may fetch: liveness, and what a browser needs to ask for a key.
OPEN_PATHS = (b"/health",)
OPEN_PREFIXES = (b"/ui/", b"/swagger/")
OPEN_EXACT = (b"/", b"/ui", b"/swagger", b"/favicon.ico")


class _Sink:
    """Where an oversized body goes: nowhere."""

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


class LimitedRequest(Request):
    """A request whose body may be at most ``site.max_request_bytes`` long."""

    too_large = False
    received = 0
    form: dict[bytes, list[bytes]] | None = None

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_request_bytes", 0)) or 2**62

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self.too_large = True
            self.content = _Sink()
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

    bad_form: str | None = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Only multipart forms need parsing (for their "model" field), and we do it
        # ourselves: Twisted's parser is costly on every JSON request, and answers a
        # broken form with a bare 400 instead of an OpenAI-shaped one.
        self._parsePOSTFormSubmission = False
        content_type = self.requestHeaders.getRawHeaders(b"content-type", [b""])[0]
        if (
            command == b"POST"
            and content_type.lower().startswith(b"multipart/form-data")
            and not self.too_large
            and self.content is not None
        ):
            self.content.seek(0)
            try:
                self.form = parse_form(content_type, self.content.read())
            except ValueError as e:
                self.bad_form = str(e)
            self.content.seek(0)
        super().requestReceived(command, path, version)

    def process(self) -> None:
        if self.bad_form is not None:
            self._refuse(ApiError(400, f"the multipart form cannot be read: {self.bad_form}"))
        elif self.too_large:
            self._refuse(
                ApiError(
                    413,
                    f"the request body is larger than {self._limit()} bytes (maxRequestBytes)",
                    "request_too_large",
                )
            )
        else:
            super().process()

    def _refuse(self, error: ApiError) -> None:
        self.setResponseCode(error.status)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"connection", b"close")
        self.write(error.body())
        self.finish()


def parse_form(content_type: bytes, body: bytes) -> dict[bytes, list[bytes]]:
    """The text fields of a multipart/form-data body (files are skipped)."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type + b"\r\n\r\n" + body
    )
    if not message.is_multipart() or message.defects:
        raise ValueError("not a well-formed multipart body")
    fields: dict[bytes, list[bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or part.get_filename() is not None:
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            fields.setdefault(name.encode(), []).append(payload)
    return fields


class ApiSite(Site):
    requestFactory = LimitedRequest

    def __init__(
        self,
        resource: IResource,
        max_request_bytes: int,
        access_log: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log

    def log(self, request: Any) -> None:
        # one line per request costs real CPU at high rates: only with logRequests
        if self.access_log:
            super().log(request)


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


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    if presented is None:
        return False
    given = presented.encode()
    # compare with every key, always, so the time taken says nothing about which
    results = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(results)


class Guard(Resource):
    """Lets a request through to ``inner`` only with a valid key (when keys are set)."""

    isLeaf = True

    def __init__(
        self, inner: IResource, keys: tuple[str, ...], browsers: BrowserPolicy | None = None
    ) -> None:
        super().__init__()
        self.inner = inner
        self.keys = keys
        self.browsers = browsers

    def render(self, request: Request) -> Any:
        if self.browsers is not None:
            refusal = self.browsers.refusal(request)
            if refusal is not None:
                request.setResponseCode(refusal.status)
                request.setHeader(b"content-type", b"application/json")
                return refusal.body()
            if self.browsers.cors.preflight(request):
                return b""
            self.browsers.cors.decorate(request)
        if (
            self.keys
            and not self.is_open(request.path)
            and not key_matches(presented_key(request), self.keys)
        ):
            error = ApiError(
                401,
                "a valid API key is required: send 'Authorization: Bearer <key>' "
                "(or the key as x-api-key, or as the Basic auth password)",
                "invalid_api_key",
            )
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="llamaswap"')
            request.setHeader(b"content-type", b"application/json")
            return error.body()
        return self.inner.render(request)

    @staticmethod
    def is_open(path: bytes) -> bool:
        return (
            path in OPEN_PATHS
            or path in OPEN_EXACT
            or any(path.startswith(prefix) for prefix in OPEN_PREFIXES)
        )
