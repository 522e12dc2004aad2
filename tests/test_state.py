"""State trouble (unopenable or full activity log) never stops serving, nor floods the log."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.error import ConnectError
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from llamaswap import activity
from llamaswap.activity import ActivityStore, Outage

from .daemon import free_port, start_twistd
from .integration import FAKE, LiveTestCase
from .test_observability import metric

ONE = f"""
models:
  alpha:
    cmd: {FAKE}
"""
WRITE_FAILED = "activity log: writing to :memory: failed (database or disk is full)"


def tiny_row() -> dict[str, object]:
    """Smaller than any row a request makes: once it does not fit, nothing does."""
    return {
        "time": reactor.seconds(),
        "model": "a",
        "path": "/",
        "status": 200,
        "duration_ms": 0,
        "queue_ms": 0,
        "load_ms": 0,
    }


class UnopenableStoreTests(LiveTestCase):
    async def test_a_daemon_whose_state_directory_cannot_be_made_starts_and_serves(
        self,
    ) -> None:
        root = Path(self.mktemp())
        root.mkdir()
        (root / "state").write_text("a file where the state directory should be")
        database = root / "state" / "llamaswap" / "activity.sqlite3"
        config = root / "config.yaml"
        config.write_text(
            f"startPort: {random.randrange(20000, 40000)}\nstore: {{path: '{database}'}}\n" + ONE
        )
        port = free_port()
        with (root / "twistd.log").open("w") as output:
            twistd = start_twistd(config, port, output)
        self.addCleanup(twistd.wait)
        self.addCleanup(twistd.terminate)
        self.base = f"http://127.0.0.1:{port}"
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

        async def serving() -> bool:
            try:
                return bool((await self.request("GET", "/health")).code == 200)
            except ConnectError:
                if twistd.poll() is not None:
                    self.fail(f"twistd exited: {(root / 'twistd.log').read_text()}")
                return False

        await self.eventually(serving, "twistd serves", tries=1500)
        self.assertEqual((await self.chat("alpha")).code, 200)
        self.assertEqual((await self.request("GET", "/api/activity")).json()["total"], 1)
        store = (await self.request("GET", "/api/activity/stats")).json()["store"]
        self.assertEqual((store["persistent"], store["available"]), (False, True))
        log = (root / "twistd.log").read_text()
        self.assertEqual(log.count("activity log: cannot open"), 1, log)
        self.assertIn(f"cannot open {database}", log)  # the path, and what to do
        self.assertIn(f"Make {database.parent} writable, or set store.path", log)


class BrokenFileTests(TestCase):
    async def test_a_file_that_is_not_a_database_is_replaced_by_one_in_memory(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"not a database" * 1000)
        store = ActivityStore(str(path), reactor)
        store.start()
        self.addCleanup(store.stop)
        self.assertFalse(store.persistent)
        store.add(tiny_row())
        self.assertEqual((await store.query())["total"], 1)
        self.assertEqual(path.read_bytes(), b"not a database" * 1000)  # left as it was


class FullStoreTests(LiveTestCase):
    """A database that cannot grow (sqlite's max_page_count: what a full disk does)."""

    async def test_writes_that_fail_are_counted_warned_once_and_reads_get_503(self) -> None:
        connections: list[sqlite3.Connection] = []

        def capped(path: str) -> sqlite3.Connection:
            db = sqlite3.connect(path, check_same_thread=False)
            db.execute("PRAGMA max_page_count = 8")
            connections.append(db)
            return db

        self.patch(activity, "connect", capped)
        await self.serve(ONE)
        store = self.api.store
        assert store is not None
        written = 0
        while not store.dropped and written < 5000:  # fill it up, one row at a time
            store.add(tiny_row())
            await store.flush()
            written += 1
        self.assertEqual(store.dropped, 1)
        written -= 1

        for _ in range(2):
            self.assertEqual((await self.chat("alpha")).code, 200)  # serving goes on
        for route in ("/api/activity", "/api/activity/stats"):
            reply = await self.request("GET", route)
            self.assertEqual(reply.code, 503)
            error = reply.json()["error"]
            self.assertEqual(error["code"], "activity_log_unavailable")
            self.assertIn("database or disk is full", error["message"])
        metrics = (await self.request("GET", "/metrics")).body.decode()
        self.assertEqual(metric(metrics, "llamaswap_activity_rows_dropped_total"), 3)
        self.assertEqual(metric(metrics, "llamaswap_activity_store_up"), 0)
        logs = (await self.request("GET", "/logs")).body.decode()
        self.assertEqual(logs.count(WRITE_FAILED), 1, logs)
        self.assertNotIn("Traceback", logs)

        connections[0].execute("PRAGMA max_page_count = 1000000")  # room again
        await self.chat("alpha")
        rows = (await self.request("GET", "/api/activity")).json()
        self.assertEqual(rows["total"], written + 1)
        store_health = (await self.request("GET", "/api/activity/stats")).json()["store"]
        self.assertEqual((store_health["available"], store_health["dropped"]), (True, 3))
        logs = (await self.request("GET", "/logs")).body.decode()
        self.assertEqual(logs.count("works again; 3 rows were dropped in all"), 1, logs)
        self.assertEqual(logs.count(WRITE_FAILED), 1)


class OutageTests(TestCase):
    def test_a_flapping_task_is_reported_once_per_quiet_period(self) -> None:
        clock = Clock()
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)  # a callable is all a Logger needs
        outage = Outage(Logger(observer=observer), clock, "writing", quiet=600)
        for _ in range(5):  # fails, works, fails... every second
            outage.failed("disk full", "rows are dropped")
            clock.advance(1)
            outage.worked()
            clock.advance(1)
        outage.failed("disk full", "rows are dropped")
        self.assertEqual(outage.error, "disk full")  # the state is always told truly
        said = [formatEvent(e) for e in events]
        self.assertEqual(len(said), 2, said)
        self.assertIn("writing failed (disk full)", said[0])
        self.assertEqual(said[1], "writing works again")
        clock.advance(600)
        outage.worked()
        outage.failed("disk full", "rows are dropped")
        self.assertEqual(len(events), 3)  # a new outage, after the quiet period
