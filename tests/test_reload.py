"""Reloading the configuration without cutting anything that did not change."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from llamaswap.activity import Retention
from llamaswap.config import Config, load_config, parse_config
from llamaswap.logs import level_filter, set_log_level
from llamaswap.origin import BrowserDoor
from llamaswap.relay import BytesProducer
from llamaswap.reload import ConfigReloader, dropped_silently
from llamaswap.tap import build

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


class ReloadCase(LiveTestCase):
    async def start_with(self, text: str) -> ConfigReloader:
        self.path = Path(self.mktemp())
        self.path.write_text(text)
        await self.serve(text)
        apply: Any = getattr(self.service, "apply")  # noqa: B009
        return ConfigReloader(
            str(self.path), apply, reactor, lambda: self.api.config, on_signal=False
        )

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


class ReloadTests(ReloadCase):
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

    async def test_a_refused_reload_logs_each_problem_on_a_line_of_its_own(self) -> None:
        reloader = await self.start_with(BEFORE)
        broken = BEFORE.replace(f"cmd: {FAKE} --tokens 3", "cmnd: x")
        self.path.write_text(broken.replace("swap: false", "swap: sometimes") + "logLevel: x\n")
        self.assertFalse(await reloader.reload())
        logs = (await self.request("GET", "/logs")).body.decode().splitlines()
        refused = [line.split("] ", 1)[1] for line in logs if "reload refused" in line]
        stays = "the running configuration stays"
        self.assertEqual(
            refused,
            [
                f"reload refused (problem 1 of 4), {stays}: {self.path}: models.change.cmnd: "
                "unknown key (did you mean 'cmd'?)",
                f"reload refused (problem 2 of 4), {stays}: {self.path}: models.change.cmd: "
                "required key is missing",
                f"reload refused (problem 3 of 4), {stays}: {self.path}: groups.all.swap: "
                "expected true or false, got str 'sometimes'",
                f"reload refused (problem 4 of 4), {stays}: {self.path}: logLevel: "
                "must be one of debug, info, warn, error, got 'x'",
            ],
        )
        self.assertEqual((await self.chat("change")).code, 200)  # still served as before

    async def test_file_changes_are_noticed_when_watching(self) -> None:
        self.path = Path(self.mktemp())
        self.path.write_text(BEFORE)
        await self.serve(BEFORE)
        reloader = ConfigReloader(
            str(self.path),
            getattr(self.service, "apply"),  # noqa: B009
            reactor,
            lambda: self.api.config,
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


FIRST_KEY, SECOND_KEY = "sk-first-5ecret", "sk-second-5ecret"
SECURED = BEFORE + f"apiKeys: [{FIRST_KEY}, {SECOND_KEY}]\n"


class SecurityReloadTests(ReloadCase):
    """A reload weakens authentication only when the file says so, and says so loudly."""

    def auth(self, key: str = FIRST_KEY) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    async def logs(self) -> str:
        text = (await self.request("GET", "/logs", headers=self.auth())).body.decode()
        for key in (FIRST_KEY, SECOND_KEY):
            self.assertNotIn(key, text)  # counted, never shown
        return text

    async def test_a_file_caught_before_its_apikeys_line_is_refused(self) -> None:
        reloader = await self.start_with(SECURED)
        self.path.write_text(SECURED.rsplit("apiKeys", 1)[0])  # all but the last line
        self.assertFalse(await reloader.reload())
        self.assertEqual((await self.request("GET", "/v1/models")).code, 401)
        self.assertEqual((await self.request("GET", "/v1/models", headers=self.auth())).code, 200)
        logs = await self.logs()
        self.assertIn("reload refused", logs)
        self.assertIn("no longer sets apiKeys", logs)
        # a null apiKeys (a list cut after its key) is not an explicit "off" either
        self.path.write_text(SECURED.rsplit("apiKeys", 1)[0] + "apiKeys:\n")
        self.assertFalse(await reloader.reload())
        self.assertEqual((await self.request("GET", "/v1/models")).code, 401)

    async def test_an_explicit_empty_list_turns_authentication_off_with_a_warning(self) -> None:
        reloader = await self.start_with(SECURED)
        self.path.write_text(SECURED.rsplit("apiKeys", 1)[0] + "apiKeys: []\n")
        logs_before = await self.logs()
        self.assertTrue(await reloader.reload())
        self.assertEqual((await self.request("GET", "/v1/models")).code, 200)
        logs = (await self.logs())[len(logs_before) :]
        self.assertIn("SECURITY: reload changed apiKeys: 0 added, 2 removed (2 -> 0)", logs)
        self.assertIn("authentication is now OFF", logs)

    async def test_a_model_s_pages_trusted_or_its_clients_keys_forwarded_are_logged(
        self,
    ) -> None:
        reloader = await self.start_with(SECURED)
        opened = SECURED.replace(
            f"cmd: {FAKE} --tokens 3\n",
            f"cmd: {FAKE} --tokens 3\n    trustedPages: true\n    forwardAuthorization: true\n",
        )
        self.path.write_text(opened)
        self.assertTrue(await reloader.reload())
        logs = await self.logs()
        self.assertIn("SECURITY: reload changed models.*.trustedPages: [] -> ['change']", logs)
        self.assertIn("models.*.forwardAuthorization: [] -> ['change']", logs)

    async def test_a_key_removed_from_a_written_list_is_applied_and_logged(self) -> None:
        reloader = await self.start_with(SECURED)
        self.path.write_text(SECURED.replace(f", {SECOND_KEY}", ", sk-third"))
        self.assertTrue(await reloader.reload())
        self.assertEqual(
            (await self.request("GET", "/v1/models", headers=self.auth(SECOND_KEY))).code, 401
        )
        self.assertEqual((await self.request("GET", "/v1/models", headers=self.auth())).code, 200)
        logs = await self.logs()
        self.assertIn("reload changed apiKeys: 1 added, 1 removed (2 -> 2)", logs)
        self.assertNotIn("sk-third", logs)

    async def test_a_file_cut_inside_a_scoped_key_keeps_its_limits(self) -> None:
        # the entry's last lines lost: left out, `models` would mean every model
        scoped = BEFORE + (
            f"apiKeys:\n  - {FIRST_KEY}\n  - name: alice\n    key: {SECOND_KEY}\n"
            "    models: [keep]\n    maxConcurrent: 1\n"
        )
        reloader = await self.start_with(scoped)
        alice = {**self.auth(SECOND_KEY), "content-type": "application/json"}
        chat = json.dumps({"model": "drop"}).encode()
        for cut in ("    maxConcurrent: 1\n", "    models: [keep]\n    maxConcurrent: 1\n"):
            self.path.write_text(scoped.removesuffix(cut))
            self.assertFalse(await reloader.reload())
        response = await self.request("POST", "/v1/chat/completions", chat, headers=alice)
        self.assertEqual(response.code, 404)  # still not alice's model
        logs = await self.logs()
        self.assertIn("no longer sets apiKeys[alice].maxConcurrent (caught mid-write?)", logs)
        self.assertIn("no longer sets apiKeys[alice].models, apiKeys[alice].maxConcurrent", logs)
        # written out, the wider scope is applied (and logged)
        self.path.write_text(
            scoped.replace("[keep]", "['*']").removesuffix("    maxConcurrent: 1\n")
            + "    maxConcurrent: null\n"
        )
        self.assertFalse(await reloader.reload())  # null is not written out either
        self.path.write_text(scoped.replace("[keep]", "['*']").replace(": 1\n", ": 5\n"))
        self.assertTrue(await reloader.reload())
        response = await self.request("POST", "/v1/chat/completions", chat, headers=alice)
        self.assertEqual(response.code, 200)

    async def test_a_file_cut_inside_a_key_is_refused(self) -> None:
        listed = BEFORE + f"apiKeys:\n  - {FIRST_KEY}\n  - {SECOND_KEY}\n"
        reloader = await self.start_with(listed)
        short = SECOND_KEY[:4]  # the file cut in the middle of the last line
        self.path.write_text(listed[: listed.index(SECOND_KEY) + len(short)])
        self.assertFalse(await reloader.reload())
        shortened = {"authorization": f"Bearer {short}"}
        self.assertEqual((await self.request("GET", "/v1/models", headers=shortened)).code, 401)
        self.assertIn("no longer sets the whole key of apiKeys[1]", await self.logs())

    async def test_browser_settings_dropped_by_a_cut_file_are_kept(self) -> None:
        allowing = SECURED.replace(
            "apiKeys:", "cors:\n  allowOrigins: [http://app.lan:3000]\napiKeys:"
        )
        reloader = await self.start_with(allowing)
        self.path.write_text(SECURED)  # the cors block left out, not written as empty
        self.assertFalse(await reloader.reload())
        self.assertIn("no longer sets cors", await self.logs())
        self.path.write_text(SECURED.replace("apiKeys:", "cors: {allowOrigins: []}\napiKeys:"))
        self.assertTrue(await reloader.reload())
        self.assertIn("SECURITY: reload changed cors", await self.logs())


class WatchTests(TestCase):
    """The watcher applies a file once it stopped changing, measured on the clock."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.write_text(BEFORE)
        self.clock = Clock()
        self.reads: list[str] = []
        self.applied: list[Config] = []
        self.first: Deferred[Config] = Deferred()

    def loader(self, path: str) -> Config:
        self.reads.append(Path(path).read_text())
        return load_config(path)

    def current(self) -> Config:
        return self.applied[-1] if self.applied else parse_config(BEFORE)

    def apply(self, config: Config) -> dict[str, list[str]]:
        self.applied.append(config)
        if not self.first.called:
            self.first.callback(config)
        return {}

    def reloader(self, watch: bool) -> ConfigReloader:
        reloader = ConfigReloader(
            str(self.path),
            self.apply,
            self.clock,
            self.current,
            watch=watch,
            watch_interval=1.0,
            on_signal=False,
            loader=self.loader,
        )
        reloader.startService()
        self.addCleanup(reloader.stopService)
        return reloader

    async def test_a_file_written_in_two_steps_is_applied_once_with_its_final_content(
        self,
    ) -> None:
        self.reloader(watch=True)
        models, groups = AFTER.split("groups:")
        self.path.write_text(models)  # valid on its own: the writer is not done yet
        self.clock.advance(1)
        await deferToThread(lambda: None)  # a read, had one started, would be done now
        with self.path.open("a") as rest:
            rest.write("groups:" + groups)
        self.clock.advance(1)  # changed again since the last poll: still settling
        self.clock.advance(1)  # the same as at the last poll: read it
        config = await self.first
        self.assertEqual(self.reads, [AFTER])
        self.assertIn("all", config.groups)
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual(len(self.applied), 1)

    async def test_a_file_that_changes_while_read_is_read_again(self) -> None:
        reloader = self.reloader(watch=False)

        def loader(path: str) -> Config:
            config = self.loader(path)
            if len(self.reads) == 1:
                self.path.write_text(AFTER)  # the writer was not done
            return config

        reloader.loader = loader
        self.path.write_text(AFTER.split("groups:")[0])
        self.assertFalse(await reloader.reload())
        self.assertEqual(self.applied, [])
        self.clock.advance(1)  # SIGHUP's reload tries again after a settle delay
        self.assertIn("all", (await self.first).groups)


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


class ReachesEveryReaderTests(SynchronousTestCase):
    """A reload reaches the readers that keep a setting of their own."""

    def test_store_retention_follows_a_reload(self) -> None:
        base = "models:\n  m:\n    cmd: x --port ${PORT}\n"
        service = build(
            parse_config(base + "store: {path: ':memory:', maxRows: 5, maxAgeDays: 2}\n"),
            MemoryReactorClock(),
        )
        self.assertEqual(service.store.retention, Retention(5, 2.0))
        service.apply(parse_config(base + "store: {path: ':memory:', maxRows: 7, maxAgeDays: 3}\n"))
        self.assertEqual(service.store.retention, Retention(7, 3.0))


class LiveConfigTests(SynchronousTestCase):
    """One object owns the configuration in use; a reload replaces it and every
    reader follows, so none keeps a slice of the old one."""

    BASE = "models:\n  m:\n    cmd: x --port ${PORT}\nstore: {path: ':memory:'}\n"

    def test_a_subscriber_hears_of_each_reload_after_the_readers_before_it(self) -> None:
        service = build(parse_config(self.BASE), MemoryReactorClock())
        seen: list[tuple[Config, int]] = []

        def follow(new: Config) -> None:  # a reader that subscribed itself
            seen.append((new, service.site.max_request_bytes))

        service.live.subscribe(follow)
        new = parse_config(self.BASE + "maxRequestBytes: 4096\n")
        changes = service.apply(new)
        # the subscriber got the new config, and the readers subscribed before it
        # had already switched
        self.assertEqual(seen, [(new, 4096)])
        self.assertIs(service.live.current, new)
        # the scheduler's report is still what a reload returns
        self.assertEqual(changes.get("unchanged"), ["m"])

    def test_a_reload_reaches_every_reader(self) -> None:
        service = build(parse_config(self.BASE), MemoryReactorClock())
        site, gate, store, api = service.site, service.gate, service.store, service.api
        door = site.checks[1]
        assert isinstance(door, BrowserDoor)
        self.assertFalse(door.policy.host.allows("llm.example"))
        new = parse_config(
            self.BASE.replace("':memory:'}", "':memory:', maxRows: 7}")
            + "logLevel: debug\n"
            + "logRequests: true\n"
            + "maxRequestBytes: 4096\n"
            + "connections: {maxPerClient: 3}\n"
            + "allowedHosts: [llm.example]\n"
            + "apiKeys: [{key: sk-live-config-test-key-0001, name: alice}]\n"
        )
        try:
            service.apply(new)
            self.assertEqual(level_filter.defaultLogLevel, LogLevel.debug)
        finally:
            set_log_level("info")
        self.assertIs(api.config, new)
        self.assertIs(api.scheduler.config, new)
        assert api.kvcache is not None
        self.assertIs(api.kvcache.config, new)
        self.assertTrue(api.recorder.log_requests)
        self.assertEqual(site.max_request_bytes, 4096)
        self.assertEqual(gate.limits.max_per_client, 3)
        self.assertEqual(store.retention.max_rows, 7)
        self.assertTrue(door.policy.host.allows("llm.example"))
        self.assertEqual([k.name for k in service.access.keyring.keys], ["alice"])


class KeyEditTests(SynchronousTestCase):
    """Edits of scoped keys a reload must take: only a file's end can be cut."""

    ALICE = "  - name: alice\n    key: sk-alice-5ecret\n    models: [keep]\n    maxConcurrent: 1\n"
    BOB = "  - {name: bob, key: sk-bob-5ecret}\n"

    def dropped(self, old: str, new: str) -> list[str]:
        return dropped_silently(parse_config(BEFORE + old), parse_config(BEFORE + new))

    def test_keys_one_the_start_of_another_can_be_kept(self) -> None:
        keys = f"apiKeys: [{FIRST_KEY}, {FIRST_KEY}-admin]\n"
        self.assertEqual(self.dropped(keys, keys + "maxRequestBytes: 4096\n"), [])
        both = f"apiKeys: [{FIRST_KEY}-admin, {SECOND_KEY}]\n"
        self.assertEqual(self.dropped(both, f"apiKeys: [{FIRST_KEY}, {SECOND_KEY}]\n"), [])

    def test_a_limit_removed_from_a_key_the_file_goes_on_after_is_lifted(self) -> None:
        lifted = self.ALICE.replace("    maxConcurrent: 1\n", "")
        self.assertEqual(
            self.dropped("apiKeys:\n" + self.ALICE + self.BOB, "apiKeys:\n" + lifted + self.BOB), []
        )
        after = "logLevel: info\n"
        self.assertEqual(
            self.dropped("apiKeys:\n" + self.ALICE + after, "apiKeys:\n" + lifted + after), []
        )

    def test_the_files_last_key_is_lifted_by_a_null_that_is_not_its_last_line(self) -> None:
        old = "apiKeys:\n" + self.ALICE
        cut = old.removesuffix(" 1\n")  # `maxConcurrent:` and nothing after: null
        self.assertEqual(self.dropped(old, cut), ["apiKeys[alice].maxConcurrent"])
        written = old.replace(
            "    maxConcurrent: 1\n", "    maxConcurrent: null\n    role: inference\n"
        )
        self.assertEqual(self.dropped(old, written), [])

    def test_a_key_moved_to_the_end_and_cut_there_keeps_its_limits(self) -> None:
        old = "apiKeys:\n" + self.ALICE + self.BOB
        cut = "apiKeys:\n" + self.BOB + self.ALICE.removesuffix("    maxConcurrent: 1\n")
        self.assertEqual(self.dropped(old, cut), ["apiKeys[alice].maxConcurrent"])
