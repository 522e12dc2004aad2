"""API keys, credential hygiene, request-size limits and the exposure warning."""

from __future__ import annotations

import base64
import json

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config
from llamaswap.tap import _loopback_only, build

from .integration import FAKE, LiveTestCase

KEYED = f"""
apiKeys: [sk-first, sk-second]
models:
  alpha:
    cmd: {FAKE}
  trusting:
    cmd: {FAKE}
    forwardAuthorization: true
"""


class ApiKeyTests(LiveTestCase):
    async def test_every_endpoint_but_health_and_ui_assets_needs_a_key(self) -> None:
        await self.serve(KEYED)
        for path in ("/v1/models", "/running", "/metrics", "/logs", "/api/activity"):
            reply = await self.request("GET", path)
            self.assertEqual(reply.code, 401, path)
            self.assertEqual(reply.header("www-authenticate"), 'Bearer realm="llamaswap"')
            self.assertEqual(reply.json()["error"]["code"], "invalid_api_key")
        refused = await self.chat("alpha")
        self.assertEqual(refused.code, 401)
        self.assertEqual(await self.running_with("sk-first"), {})  # nothing was started
        self.assertEqual((await self.request("GET", "/health")).code, 200)
        self.assertEqual((await self.request("GET", "/ui/")).code, 200)

    async def running_with(self, key: str) -> dict[str, object]:
        reply = await self.request("GET", "/running", headers={"authorization": f"Bearer {key}"})
        return {r["model"]: r for r in reply.json()["running"]}

    async def test_bearer_basic_and_x_api_key_are_accepted(self) -> None:
        await self.serve(KEYED)
        basic = base64.b64encode(b"anyone:sk-second").decode()
        for headers in (
            {"authorization": "Bearer sk-first"},
            {"authorization": f"Basic {basic}"},
            {"x-api-key": "sk-second"},
        ):
            reply = await self.request("GET", "/v1/models", headers=headers)
            self.assertEqual(reply.code, 200, headers)
        for headers in (
            {"authorization": "Bearer sk-firs"},
            {"authorization": "Bearer sk-first-and-more"},
            {"authorization": "Basic !!!"},
            {"x-api-key": ""},
        ):
            reply = await self.request("GET", "/v1/models", headers=headers)
            self.assertEqual(reply.code, 401, headers)

    async def test_client_keys_reach_a_model_only_when_configured_and_never_the_logs(
        self,
    ) -> None:
        await self.serve(KEYED)
        auth = {"authorization": "Bearer sk-first", "content-type": "application/json"}
        body = json.dumps({"model": "alpha", "input": "x"}).encode()
        echo = (await self.request("POST", "/v1/responses", body, auth)).json()
        self.assertNotIn("authorization", echo["headers"])
        body = json.dumps({"model": "trusting", "input": "x"}).encode()
        echo = (await self.request("POST", "/v1/responses", body, auth)).json()
        self.assertEqual(echo["headers"]["authorization"], "Bearer sk-first")
        logs = (await self.request("GET", "/logs", headers=auth)).body.decode()
        self.assertNotIn("sk-first", logs)


class LimitTests(LiveTestCase):
    async def test_an_oversized_body_is_413_and_nothing_starts(self) -> None:
        await self.serve(f"maxRequestBytes: 1000\nmodels:\n  alpha:\n    cmd: {FAKE}\n")
        big = json.dumps({"model": "alpha", "prompt": "x" * 5000}).encode()
        reply = await self.request(
            "POST", "/v1/completions", big, {"content-type": "application/json"}
        )
        self.assertEqual(reply.code, 413)
        self.assertEqual(reply.json()["error"]["code"], "request_too_large")
        self.assertEqual(await self.running(), {})
        small = await self.post("/v1/completions", {"model": "alpha", "prompt": "x"})
        self.assertEqual(small.code, 200)

    async def test_bad_bodies_are_400_and_leave_no_lease(self) -> None:
        await self.serve(f"models:\n  alpha:\n    cmd: {FAKE}\n")
        json_type = {"content-type": "application/json"}
        for body in (b"\xff\xfe{", b'{"model": "alpha"', b"null", b'"alpha"', b'{"model": ["a"]}'):
            reply = await self.request("POST", "/v1/chat/completions", body, json_type)
            self.assertEqual(reply.code, 400, body)
            self.assertEqual(set(reply.json()["error"]), {"message", "type", "code"})
        reply = await self.request(
            "POST", "/v1/chat/completions", b"<model>alpha</model>", {"content-type": "text/xml"}
        )
        self.assertEqual(reply.code, 415)
        self.assertEqual(self.api.scheduler.in_flight("alpha"), 0)
        self.assertEqual(self.api.scheduler.queued(), 0)


class ConfigAndExposureTests(SynchronousTestCase):
    def test_keys_must_be_usable_and_are_never_echoed(self) -> None:
        error = self.assertRaises(
            ConfigError,
            parse_config,
            "apiKeys: ['has space']\nmodels:\n  m:\n    cmd: s --port ${PORT}\n",
        )
        self.assertIn("apiKeys[0]", str(error))
        self.assertNotIn("has space", str(error))
        config = parse_config(
            "apiKeys: ['${env.KEY}']\nmodels:\n  m:\n    cmd: s --port ${PORT}\n",
            environ={"KEY": "from-env"},
        )
        self.assertEqual(config.api_keys, ("from-env",))

    def test_loopback_detection(self) -> None:
        self.assertTrue(_loopback_only("tcp:8080:interface=127.0.0.1"))
        self.assertTrue(_loopback_only("tcp6:8080:interface=\\:\\:1"))
        self.assertTrue(_loopback_only("unix:/run/llamaswap.sock"))
        self.assertFalse(_loopback_only("tcp:8080"))
        self.assertFalse(_loopback_only("tcp:8080:interface=0.0.0.0"))
        self.assertFalse(_loopback_only("tcp:8080:interface=192.168.1.5"))

    def test_a_lan_address_without_keys_gets_a_loud_warning(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        config = parse_config(
            "store: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"
        )
        with capturedLogs() as events:
            build(config, MemoryReactorClock(), ["tcp:8080:interface=0.0.0.0"])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertIn("without apiKeys", warnings[0]["log_format"])
        keyed = parse_config(
            "apiKeys: [k]\nstore: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"
        )
        with capturedLogs() as events:
            build(keyed, MemoryReactorClock(), ["tcp:8080:interface=0.0.0.0"])
        self.assertEqual([e for e in events if e["log_level"] == LogLevel.warn], [])
