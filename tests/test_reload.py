"""Reloading the configuration without cutting anything that did not change."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap.relay import BytesProducer
from llamaswap.reload import ConfigReloader

from .integration import FAKE, LiveTestCase, StreamReader

BEFORE = f"""
store: {{path: ':memory:'}}
models:
  keep:
    cmd: {FAKE}
  change:
    cmd: {FAKE} --tokens 3
  drop:
    cmd: {FAKE}
groups:
  all:
    members: [keep, change, drop]
    swap: false
"""
AFTER = f"""
store: {{path: ':memory:'}}
models:
  keep:
    cmd: {FAKE}
  change:
    cmd: {FAKE} --tokens 5
  fresh:
    cmd: {FAKE}
groups:
  all:
    members: [keep, change, fresh]
    swap: false
"""


class ReloadTests(LiveTestCase):
    async def start_with(self, text: str) -> ConfigReloader:
        self.path = Path(self.mktemp())
        self.path.write_text(text)
        await self.serve(text)
        apply: Any = getattr(self.service, "apply")  # noqa: B009
        return ConfigReloader(str(self.path), apply, reactor, on_signal=False)

    async def hold_stream(self, model: str) -> StreamReader:
        response: IResponse = await self.agent.request(
            b"POST",
            (self.base + "/v1/chat/completions").encode(),
            Headers({"content-type": ["application/json"]}),
            BytesProducer(
                json.dumps({"model": model, "stream": True, "fake": {"hold": True}}).encode()
            ),
        )
        reader = StreamReader()
        response.deliverBody(reader)
        await reader.until(b"t0")
        return reader

    async def test_unchanged_models_keep_running_and_serving_through_a_reload(self) -> None:
        reloader = await self.start_with(BEFORE)
        for model in ("keep", "change", "drop"):
            await self.chat(model)
        before = await self.running()
        keep_stream = await self.hold_stream("keep")
        drop_stream = await self.hold_stream("drop")

        self.path.write_text(AFTER)
        self.assertTrue(await reloader.reload())

        after = await self.running()
        self.assertEqual(after["keep"]["pid"], before["keep"]["pid"])  # untouched
        # changed and idle: its old process goes; a new one starts on next use
        self.assertTrue(after.get("change", {"retiring": True})["retiring"])
        # removed but still answering: drained first
        self.assertEqual(after["drop"]["state"], "ready")
        self.assertTrue(after["drop"]["retiring"])
        listing = {m["id"] for m in (await self.request("GET", "/v1/models")).json()["data"]}
        self.assertEqual(listing, {"keep", "change", "fresh"})  # the new list, at once
        self.assertEqual((await self.chat("drop")).code, 404)

        # the streams opened before the reload still flow
        keep_stream.hang_up()
        drop_stream.hang_up()
        await keep_stream.done
        await drop_stream.done

        async def drop_gone() -> bool:
            return "drop" not in await self.running()

        await self.eventually(drop_gone, "the removed model stops once drained")
        reply = await self.chat("change")
        self.assertIn("t4", reply.json()["choices"][0]["message"]["content"])  # new settings
        self.assertNotEqual((await self.running())["change"]["pid"], before["change"]["pid"])
        self.assertEqual((await self.chat("fresh")).code, 200)

    async def test_an_invalid_file_is_refused_and_the_old_config_keeps_serving(self) -> None:
        reloader = await self.start_with(BEFORE)
        await self.chat("keep")
        pid = (await self.running())["keep"]["pid"]
        self.path.write_text(BEFORE.replace("cmd:", "cmnd:", 1))
        self.assertFalse(await reloader.reload())
        logs = (await self.request("GET", "/logs")).body.decode()
        self.assertIn("reload refused", logs)
        self.assertIn("did you mean 'cmd'", logs)
        self.assertEqual((await self.running())["keep"]["pid"], pid)
        self.assertEqual((await self.chat("drop")).code, 200)

    async def test_file_changes_are_noticed_when_watching(self) -> None:
        self.path = Path(self.mktemp())
        self.path.write_text(BEFORE)
        await self.serve(BEFORE)
        reloader = ConfigReloader(
            str(self.path),
            getattr(self.service, "apply"),  # noqa: B009
            reactor,
            watch=True,
            watch_interval=0.05,
            on_signal=False,
        )
        reloader.startService()
        self.addCleanup(reloader.stopService)
        self.path.write_text(AFTER + "\n# a change of size\n")

        async def fresh_listed() -> bool:
            data = (await self.request("GET", "/v1/models")).json()["data"]
            return "fresh" in {m["id"] for m in data}

        await self.eventually(fresh_listed, "the watcher reloads")


class SighupTests(LiveTestCase):
    async def test_sighup_reloads_a_running_twistd(self) -> None:
        path = Path(self.mktemp())
        path.write_text(BEFORE)
        twistd, _port = await self.daemon(path)
        path.write_text(AFTER)
        twistd.send_signal(signal.SIGHUP)

        async def fresh_listed() -> bool:
            data: list[dict[str, Any]] = (await self.request("GET", "/v1/models")).json()["data"]
            return "fresh" in {m["id"] for m in data}

        await self.eventually(fresh_listed, "SIGHUP reloads")


del Deferred
