"""Browsers can't be used against llamaswap: Host allow-list, cross-site refusal, CORS."""

from __future__ import annotations

import json
import socket

import attrs
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llamaswap.config import ConfigError, CorsConfig, parse_config
from llamaswap.guard import is_open_page
from llamaswap.origin import (
    BrowserPolicy,
    HostCheck,
    machine_names,
    normal_origin,
    over_upstream,
    split_host,
)
from llamaswap.tap import build

from .integration import FAKE, LiveTestCase

FOREIGN = "http://evil.example"
APP = "http://app.example:3000"


@attrs.define
class Head:
    """A request as far as the checks can see it: method, path, headers."""

    method: bytes
    path: bytes
    requestHeaders: Headers


def head(method: str, path: str, **headers: str) -> Head:
    raw = {name.replace("_", "-").encode(): [value.encode()] for name, value in headers.items()}
    return Head(method.encode(), path.encode(), Headers(raw))


def policy(
    allowed_hosts: tuple[str, ...] = (), origins: tuple[str, ...] = (), names: tuple[str, ...] = ()
) -> BrowserPolicy:
    return BrowserPolicy.build(
        allowed_hosts, CorsConfig(allow_origins=origins), names, is_open_page
    )


class HostCheckTests(SynchronousTestCase):
    def verdict(self, host: str, check: HostCheck | None = None) -> int | None:
        check = check or policy(names=("box", "box.local")).host
        error = check(head("GET", "/v1/models", host=host))
        return error.status if error is not None else None

    def test_loopback_names_machine_names_and_addresses_pass(self) -> None:
        for host in (
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "app.localhost:1",
            "box",
            "box.local:8080",
            "127.0.0.1:8080",
            "192.168.1.20",
            "[::1]:8080",
            "[fe80::1]",
        ):
            self.assertIsNone(self.verdict(host), host)

    def test_rebinding_names_are_refused_with_what_to_configure(self) -> None:
        for host in ("evil.example", "evil.example:8080", "box.evil.example", "localhost.evil"):
            self.assertEqual(self.verdict(host), 421, host)
        error = policy().host(head("GET", "/", host="evil.example:8080"))
        assert error is not None
        self.assertIn("allowedHosts", error.message)
        self.assertIn("'evil.example'", error.message)
        self.assertEqual(error.code, "host_not_allowed")

    def test_unspecified_and_malformed_hosts_are_refused(self) -> None:
        self.assertEqual(self.verdict("0.0.0.0:8080"), 421)
        self.assertEqual(self.verdict("[::]:8080"), 421)
        for host in ("user@localhost", "localhost:99999", "local host", "[nonsense]", "a/b", ""):
            self.assertEqual(self.verdict(host), 400, host)
        twice = Head(b"GET", b"/", Headers({b"host": [b"localhost", b"evil.example"]}))
        error = policy().host(twice)
        self.assertEqual(error.status if error else None, 400)

    def test_no_host_header_is_not_a_browser(self) -> None:
        self.assertIsNone(policy().host(head("GET", "/unload")))

    def test_configured_names_wildcards_and_star(self) -> None:
        check = policy(allowed_hosts=("llm.example.com", "*.lan")).host
        self.assertIsNone(self.verdict("llm.example.com", check))
        self.assertIsNone(self.verdict("gpu.lan:8080", check))
        self.assertEqual(self.verdict("lan", check), 421)
        self.assertEqual(self.verdict("evil.example", check), 421)
        self.assertIsNone(self.verdict("evil.example", policy(allowed_hosts=("*",)).host))

    def test_machine_names_are_this_machine_s(self) -> None:
        names = machine_names()
        self.assertIn(socket.gethostname().lower(), names)


class CrossSiteTests(SynchronousTestCase):
    def verdict(self, request: Head, origins: tuple[str, ...] = ()) -> int | None:
        error = policy(origins=origins).cross_site(request)
        return error.status if error is not None else None

    def test_clients_that_are_not_browsers_pass(self) -> None:
        for method, path in (("GET", "/unload"), ("POST", "/v1/chat/completions"), ("GET", "/")):
            self.assertIsNone(self.verdict(head(method, path, host="box:8080")))

    def test_a_foreign_origin_is_refused_everywhere_a_model_runs_or_state_changes(self) -> None:
        for method, path in (
            ("GET", "/unload"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/api/models/load/a"),
            ("GET", "/props"),
            ("GET", "/upstream/a/slots"),
            ("OPTIONS", "/v1/chat/completions"),
        ):
            request = head(method, path, host="127.0.0.1:8080", origin=FOREIGN)
            self.assertEqual(self.verdict(request), 403, path)
        error = policy().cross_site(head("POST", "/v1/completions", origin=FOREIGN))
        assert error is not None
        self.assertEqual(error.code, "cross_site_request")
        self.assertIn(FOREIGN, error.message)
        self.assertIn("cors.allowOrigins", error.message)

    def test_null_and_other_ports_are_foreign_the_same_origin_is_not(self) -> None:
        host = "127.0.0.1:8080"
        self.assertEqual(self.verdict(head("POST", "/unload", host=host, origin="null")), 403)
        other_port = head("POST", "/unload", host=host, origin="http://127.0.0.1:9000")
        self.assertEqual(self.verdict(other_port), 403)
        same = head("POST", "/api/models/unload", host=host, origin="http://127.0.0.1:8080")
        self.assertIsNone(self.verdict(same))
        default_port = head("POST", "/api/models/unload", host="box", origin="https://box")
        self.assertIsNone(self.verdict(default_port))

    def test_sec_fetch_site_is_the_browser_s_verdict(self) -> None:
        for site, expected in (
            ("cross-site", 403),
            ("same-site", 403),  # another port of this host is another origin
            ("same-origin", None),
            ("none", None),  # typed into the address bar
        ):
            request = head("GET", "/unload", host="box:8080", sec_fetch_site=site)
            self.assertEqual(self.verdict(request), expected, site)
        # trusted even behind a proxy that rewrites Host (Origin would not match)
        proxied = head(
            "POST", "/v1/chat/completions", host="127.0.0.1:8080", origin="https://llm.example"
        )
        proxied.requestHeaders.setRawHeaders(b"sec-fetch-site", [b"same-origin"])
        self.assertIsNone(self.verdict(proxied))

    def test_pages_may_be_opened_from_another_site_but_not_framed_or_fetched(self) -> None:
        def cross(method: str, path: str, mode: str, dest: str) -> Head:
            return head(
                method,
                path,
                sec_fetch_site="cross-site",
                sec_fetch_mode=mode,
                sec_fetch_dest=dest,
            )

        for path in ("/", "/ui", "/ui/", "/ui/app.js", "/swagger/", "/health"):
            self.assertIsNone(self.verdict(cross("GET", path, "navigate", "document")), path)
            self.assertEqual(self.verdict(cross("GET", path, "navigate", "iframe")), 403, path)
            self.assertEqual(self.verdict(cross("GET", path, "no-cors", "image")), 403, path)
        self.assertEqual(self.verdict(cross("GET", "/unload", "navigate", "document")), 403)
        self.assertEqual(self.verdict(cross("POST", "/ui/", "navigate", "document")), 403)
        self.assertEqual(self.verdict(cross("GET", "/running", "navigate", "document")), 403)

    def test_without_fetch_metadata_a_foreign_referer_gives_a_get_away(self) -> None:
        # plain-http LAN addresses get no Sec-Fetch-*; an <img> GET has no Origin either
        host = "192.168.1.20:8080"
        image = head("GET", "/unload", host=host, referer="http://evil.example/page.html")
        self.assertEqual(self.verdict(image), 403)
        own = head("GET", "/unload", host=host, referer="http://192.168.1.20:8080/ui/")
        self.assertIsNone(self.verdict(own))
        linked = head("GET", "/ui/", host=host, referer="http://dashboard.lan/")
        self.assertIsNone(self.verdict(linked))
        # a POST carries Origin from every browser; a Referer alone is some other program
        tool = head("POST", "/v1/chat/completions", host=host, referer="https://tool.example/")
        self.assertIsNone(self.verdict(tool))

    def test_allowed_origins_are_exempt(self) -> None:
        request = head(
            "POST", "/v1/chat/completions", origin=APP, sec_fetch_site="cross-site", host="box"
        )
        self.assertIsNone(self.verdict(request, origins=(APP,)))
        self.assertEqual(self.verdict(request, origins=("http://app.example",)), 403)
        self.assertIsNone(self.verdict(request, origins=("*",)))


class CorsTests(SynchronousTestCase):
    def test_normal_origins(self) -> None:
        self.assertEqual(normal_origin("HTTP://App.Example:80"), "http://app.example")
        self.assertEqual(normal_origin("https://a.b:8443"), "https://a.b:8443")
        self.assertEqual(normal_origin("http://[::1]:3000"), "http://[::1]:3000")
        for bad in ("app.example", "http://a/b", "ftp://a", "http://a:x", "null", "http://"):
            self.assertIsNone(normal_origin(bad), bad)
        self.assertEqual(split_host("Box.Lan.:8080"), ("box.lan", 8080))

    def test_the_settings_are_validated_with_their_key_path(self) -> None:
        base = f"models:\n  a:\n    cmd: {FAKE}\n"
        for text, path in (
            ("allowedHosts: [box:8080]\n", "allowedHosts[0]"),
            ("allowedHosts: ['a*.lan']\n", "allowedHosts[0]"),
            ("allowedHosts: box\n", "allowedHosts"),
            ("cors: {allowOrigins: ['http://a/']}\n", "cors.allowOrigins[0]"),
            ("cors: {allowOrigins: [app.example]}\n", "cors.allowOrigins[0]"),
            ("cors: {allowMethods: ['GET POST']}\n", "cors.allowMethods[0]"),
            ("cors: {allowHeaders: ['a:b']}\n", "cors.allowHeaders[0]"),
            ("cors: {maxAge: -1}\n", "cors.maxAge"),
            ("cors: {origins: []}\n", "cors.origins"),
        ):
            with self.assertRaises(ConfigError) as caught:
                parse_config(base + text)
            self.assertEqual(caught.exception.path, path, text)
        config = parse_config(
            base + "allowedHosts: [LLM.example.com., '*.lan']\n"
            "cors: {allowOrigins: ['HTTP://App.example:3000'], allowMethods: [get, post]}\n"
        )
        self.assertEqual(config.allowed_hosts, ("llm.example.com", "*.lan"))
        self.assertEqual(config.cors.allow_origins, (APP,))
        self.assertEqual(config.cors.allow_methods, ("GET", "POST"))
        self.assertEqual(parse_config(base).cors, CorsConfig())

    def test_a_star_logs_a_security_warning(self) -> None:
        text = BASE + "cors: {allowOrigins: ['*']}\nstore: {path: ':memory:'}\n"
        with capturedLogs() as events:
            build(parse_config(text), MemoryReactorClock())
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertTrue(any("cors.allowOrigins" in str(e.get("setting")) for e in warnings))


BASE = f"""
models:
  alpha:
    cmd: {FAKE}
  beta:
    cmd: {FAKE}
"""


class LiveBrowserRequestTests(LiveTestCase):
    """Over real sockets: what a browser on another site sends, and what happens."""

    def host(self) -> str:
        return self.base.removeprefix("http://")

    async def test_unload_from_a_foreign_origin_is_refused_and_unloads_nothing(self) -> None:
        await self.serve(BASE)
        self.assertEqual((await self.request("POST", "/api/models/load/alpha")).code, 200)
        for headers in (
            {"origin": FOREIGN},
            {"sec-fetch-site": "cross-site", "sec-fetch-dest": "image"},
            {"referer": f"{FOREIGN}/cats.html"},
        ):
            reply = await self.request("GET", "/unload", headers=headers)
            self.assertEqual(reply.code, 403, headers)
            self.assertEqual(reply.json()["error"]["code"], "cross_site_request")
            self.assertEqual((await self.running())["alpha"]["state"], "ready")
        # the UI's own request (same origin) and curl's (no such headers) still work
        same = {"origin": self.base, "sec-fetch-site": "same-origin"}
        self.assertEqual((await self.request("GET", "/unload", headers=same)).code, 200)
        self.assertEqual(await self.running(), {})

    async def test_a_cross_site_post_runs_nothing(self) -> None:
        await self.serve(BASE)
        body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x"}]})
        for headers in (
            {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"},
            {"origin": FOREIGN},
            {"origin": "null"},
            {"origin": self.base.replace("127.0.0.1", "localhost")},
        ):
            reply = await self.request(
                "POST",
                "/v1/chat/completions",
                body.encode(),
                {"content-type": "text/plain", **headers},
            )
            self.assertEqual(reply.code, 403, headers)
        self.assertEqual(await self.running(), {})
        self.assertEqual((await self.chat("alpha")).code, 200)  # a plain client: unchanged

    async def test_a_rebinding_host_is_refused_before_anything_runs(self) -> None:
        await self.serve(BASE)
        port = self.host().rpartition(":")[2]
        reply = await self.request(
            "POST", "/api/models/load/alpha", headers={"host": "evil.example"}
        )
        self.assertEqual(reply.code, 421)
        self.assertIn("allowedHosts", reply.json()["error"]["message"])
        reply = await self.request("GET", "/running", headers={"host": f"rebind.evil:{port}"})
        self.assertEqual(reply.code, 421)
        self.assertEqual(await self.running(), {})
        for name in ("localhost", "127.0.0.1", "app.localhost"):
            reply = await self.request("GET", "/running", headers={"host": f"{name}:{port}"})
            self.assertEqual(reply.code, 200, name)

    async def test_redirects_are_relative_never_built_from_the_host_header(self) -> None:
        await self.serve(BASE + "allowedHosts: ['*']\n")
        for path, location in (
            ("/ui//app.js", "/ui/app.js"),
            ("/ui//x?a=1", "/ui/x?a=1"),
            ("/swagger/static", "/swagger/static/"),
            ("/ui", "/ui/"),
            ("/", "/ui/"),
        ):
            reply = await self.request("GET", path, headers={"host": "evil.example:1234"})
            self.assertIn(reply.code, (301, 302, 307, 308), path)
            self.assertEqual(reply.header("location"), location, path)

    async def test_cors_for_an_allowed_origin(self) -> None:
        await self.serve(BASE + f"apiKeys: [sk-1]\ncors: {{allowOrigins: ['{APP}']}}\n")
        preflight = await self.request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={
                "origin": APP,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
                "sec-fetch-site": "cross-site",
            },
        )
        self.assertEqual(preflight.code, 204)  # no key needed: preflights never carry one
        self.assertEqual(preflight.header("access-control-allow-origin"), APP)
        self.assertEqual(preflight.header("access-control-allow-methods"), "GET, HEAD, POST")
        self.assertEqual(
            preflight.header("access-control-allow-headers"), "authorization, content-type"
        )
        self.assertEqual(preflight.header("access-control-max-age"), "600")
        self.assertIn("Origin", preflight.header("vary") or "")
        self.assertEqual(await self.running_with_key(), {})  # the preflight ran nothing
        body = json.dumps({"model": "alpha", "messages": []}).encode()
        headers = {
            "origin": APP,
            "sec-fetch-site": "cross-site",
            "content-type": "application/json",
        }
        refused = await self.request("POST", "/v1/chat/completions", body, headers)
        self.assertEqual(refused.code, 401)  # readable by the app: it can ask for a key
        self.assertEqual(refused.header("access-control-allow-origin"), APP)
        headers["authorization"] = "Bearer sk-1"
        served = await self.request("POST", "/v1/chat/completions", body, headers)
        self.assertEqual(served.code, 200)
        self.assertEqual(served.header("access-control-allow-origin"), APP)
        self.assertIn("Origin", served.headers.getRawHeaders(b"vary")[0].decode())
        # another origin's preflight is refused, and gets no CORS headers
        other = await self.request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={"origin": FOREIGN, "access-control-request-method": "POST"},
        )
        self.assertEqual(other.code, 403)
        self.assertIsNone(other.header("access-control-allow-origin"))

    async def running_with_key(self) -> dict[str, object]:
        reply = await self.request("GET", "/running", headers={"authorization": "Bearer sk-1"})
        return {r["model"]: r for r in reply.json()["running"]}

    async def test_reload_applies_new_origins_and_hosts(self) -> None:
        await self.serve(BASE)
        port = self.host().rpartition(":")[2]
        headers = {"host": f"llm.example:{port}"}
        self.assertEqual((await self.request("GET", "/running", headers=headers)).code, 421)
        self.service.apply(parse_config(BASE + "allowedHosts: [llm.example]\n"))
        self.assertEqual((await self.request("GET", "/running", headers=headers)).code, 200)
        self.service.apply(parse_config(BASE))
        self.assertEqual((await self.request("GET", "/running", headers=headers)).code, 421)

    async def test_pages_refuse_to_be_framed_by_other_sites(self) -> None:
        await self.serve(BASE)
        reply = await self.request("GET", "/ui/")
        self.assertEqual(reply.code, 200)
        self.assertEqual(reply.header("x-frame-options"), "SAMEORIGIN")
        self.assertEqual(reply.header("content-security-policy"), "frame-ancestors 'self'")


class _HostilePage(Resource):
    """A model server that answers every path with a page that would act as the
    user (as a page ``/cors-proxy`` fetched would), and asks to be sniffed."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html")
        request.setHeader(b"content-security-policy", b"default-src *")  # its own: no help
        return b"<script>fetch('/api/models/unload', {method: 'POST'})</script>"


class _OriginSetter(Resource):
    """A model server that tries to change what the browser keeps for llamaswap's
    origin: its session cookie, its stored data, origin-wide policies."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        for name, value in ORIGIN_SETTERS:
            request.responseHeaders.addRawHeader(name, value)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-model-header", b"kept")
        return b"{}"


#: what :class:`_OriginSetter` sends: one of each kind, the session cookie first
ORIGIN_SETTERS = (
    (b"Set-Cookie", b"llamaswap_session=chosen-by-the-model; Path=/; HttpOnly"),
    (b"Set-Cookie", b"other=1; Path=/"),
    (b"Set-Cookie2", b"old=1"),
    (b"Clear-Site-Data", b'"cookies", "storage"'),
    (b"Strict-Transport-Security", b"max-age=31536000; includeSubDomains"),
    (b"Alt-Svc", b'h2="evil.example:443"'),
    (b"NEL", b'{"report_to": "x", "max_age": 31536000}'),
    (b"Report-To", b'{"group": "x", "endpoints": [{"url": "http://evil.example/"}]}'),
    (b"Accept-CH", b"Sec-CH-UA-Model"),
    (b"Critical-CH", b"Sec-CH-UA-Model"),
    (b"Origin-Agent-Cluster", b"?0"),
    (b"Service-Worker-Allowed", b"/"),
)


class _Redirector(Resource):
    """A model server that sends whoever asks to one of llamaswap's admin routes: a
    307 keeps the method and body, so a browser following it posts there with the
    page's session cookie."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(307)
        request.setHeader(b"location", b"/api/models/unload")
        request.setHeader(b"refresh", b"0; url=/unload")
        return b""


class ModelPagesTests(LiveTestCase):
    async def test_a_model_server_s_redirect_goes_nowhere(self) -> None:
        """A model server's ``Location`` and ``Refresh`` never reach the browser: the
        web UI's chat request (a fetch, which follows redirects with the session
        cookie) was sent on to ``/api/models/unload`` by a model server's 307, and
        stopped every model as the signed-in admin.  The 3xx itself still arrives."""
        for trusted in ("", "    trustedPages: true\n"):
            await self.serve_in_front_of(Site(_Redirector()), trusted)
            body = json.dumps({"model": "m", "messages": []}).encode()
            for method, path, sent in (
                ("POST", "/v1/chat/completions", body),
                ("GET", "/upstream/m/", None),
            ):
                reply = await self.request(method, path, sent)
                self.assertEqual(reply.code, 307, (trusted, path))
                self.assertIsNone(reply.header("location"), (trusted, path))
                self.assertIsNone(reply.header("refresh"), (trusted, path))

    async def test_a_model_server_sets_nothing_of_llamaswap_s_origin(self) -> None:
        """A model server's cookies, ``Clear-Site-Data`` and origin-wide policies never
        reach the browser (they would act on llamaswap's origin: a server's
        ``llamaswap_session`` replaced the UI's session), trusted pages or not; the
        server's other headers still do."""
        for trusted in ("", "    trustedPages: true\n"):
            await self.serve_in_front_of(Site(_OriginSetter()), trusted)
            for path in ("/upstream/m/props", "/props?model=m"):
                reply = await self.request("GET", path)
                self.assertEqual(reply.code, 200, path)
                self.assertEqual(reply.header("x-model-header"), "kept", path)
                for name, _ in ORIGIN_SETTERS:
                    self.assertIsNone(reply.headers.getRawHeaders(name), (trusted, path, name))

    async def test_a_model_server_s_page_is_sandboxed_never_one_of_llamaswap_s(self) -> None:
        await self.serve_in_front_of(Site(_HostilePage()))
        for path in ("/upstream/m/", "/cors-proxy?model=m&url=http://example.invalid/"):
            reply = await self.request("GET", path)
            self.assertEqual(reply.code, 200, path)
            self.assertIn(b"<script>", reply.body)
            policies = reply.headers.getRawHeaders("content-security-policy")
            # every policy a browser is given holds: the sandbox makes the page's
            # origin opaque, so its script has neither the cookie nor llamaswap's origin
            self.assertIn("sandbox", policies, path)
            self.assertEqual(reply.header("x-content-type-options"), "nosniff")
        # llamaswap's own pages are not sandboxed
        ui = await self.request("GET", "/ui/")
        self.assertEqual(ui.header("content-security-policy"), "frame-ancestors 'self'")

    async def test_trusted_pages_of_a_model_s_server_run_but_what_it_fetched_does_not(
        self,
    ) -> None:
        """``trustedPages`` (llama-server's web UI through ``/upstream/<id>/``): the
        server's own pages are shown as they are; what ``/cors-proxy`` fetched, in
        any spelling the server reads as that route, stays sandboxed."""
        await self.serve_in_front_of(Site(_HostilePage()), "    trustedPages: true\n")
        page = await self.request("GET", "/upstream/m/")
        self.assertEqual(page.code, 200)
        self.assertNotIn("sandbox", page.headers.getRawHeaders("content-security-policy"))
        self.assertEqual(page.header("x-content-type-options"), "nosniff")
        for path in (
            "/cors-proxy?model=m&url=http://example.invalid/",
            "/upstream/m/cors-proxy?url=http://example.invalid/",
            "/upstream/m/%63ors-proxy?url=http://example.invalid/",
            "/upstream/m/%u0063ors-proxy?url=http://example.invalid/",  # cpp-httplib's
            "/upstream/m/cors%uDFFF-proxy?url=http://example.invalid/",
            "/upstream/m//x/../cors-proxy?url=http://example.invalid/",
            "/upstream/m/api/cors-proxy?url=http://example.invalid/",  # an --api-prefix
        ):
            fetched = await self.request("GET", path)
            self.assertEqual(fetched.code, 200, path)
            self.assertIn("sandbox", fetched.headers.getRawHeaders("content-security-policy"), path)

    async def test_a_model_s_answer_after_its_loading_progress_is_sandboxed_too(self) -> None:
        """With ``sendLoadingState`` the answer's headers are llamaswap's (sent while
        the model loads) and its body the server's: the same policy holds."""
        await self.serve(
            f"sendLoadingState: true\nmodels:\n  m:\n    cmd: {FAKE} --load-time 0.2\n"
        )
        messages = [{"role": "user", "content": "hi"}]
        reply = await self.post(
            "/v1/chat/completions", {"model": "m", "messages": messages, "stream": True}
        )
        self.assertEqual(reply.code, 200)
        self.assertIn(b"is not loaded yet", reply.body)  # the progress came first
        self.assertEqual(reply.header("content-type"), "text/event-stream")
        self.assertIn("sandbox", reply.headers.getRawHeaders("content-security-policy") or [])
        self.assertEqual(reply.header("x-content-type-options"), "nosniff")


class UpstreamHeadersTests(SynchronousTestCase):
    def test_the_model_server_s_cors_headers_give_way_to_ours(self) -> None:
        upstream = Headers(
            {
                b"Access-Control-Allow-Origin": [FOREIGN.encode()],
                b"Access-Control-Allow-Credentials": [b"true"],
                b"Vary": [b"Accept-Encoding"],
                b"Content-Type": [b"application/json"],
            }
        )
        ours = Headers(
            {
                b"access-control-allow-origin": [APP.encode()],
                b"vary": [b"Origin"],
                b"x-frame-options": [b"SAMEORIGIN"],
                b"content-security-policy": [b"frame-ancestors 'self'"],
            }
        )
        merged = over_upstream(upstream, ours)
        self.assertEqual(merged.getRawHeaders(b"access-control-allow-origin"), [APP.encode()])
        self.assertIsNone(merged.getRawHeaders(b"access-control-allow-credentials"))
        self.assertEqual(merged.getRawHeaders(b"vary"), [b"Accept-Encoding", b"Origin"])
        self.assertEqual(merged.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(merged.getRawHeaders(b"x-frame-options"), [b"SAMEORIGIN"])
        # without an allowed origin, nothing the server says makes it readable elsewhere
        self.assertFalse(
            over_upstream(upstream, Headers()).hasHeader(b"access-control-allow-origin")
        )
