"""Metrics, the activity log, live events and the API description, over real sockets."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
from typing import Any

from openapi_spec_validator import validate
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, capturedLogs, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import IResponse

from llamaswap.activity import SCHEMA, ActivityStore, Retention, percentiles
from llamaswap.api import Api
from llamaswap.events import ModelChanged
from llamaswap.lifecycle import ModelState
from llamaswap.logs import PROXY, LogHub, logger

from .integration import FAKE, LiveTestCase, StreamReader

TWO = f"""
logRequests: true
models:
  alpha:
    cmd: {FAKE}
  beta:
    cmd: {FAKE}
"""

ROW = {"model": "m", "path": "/x", "status": 200, "duration_ms": 1, "queue_ms": 0, "load_ms": 0}


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels in any order)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        sample, _, raw_labels = series.partition("{")
        found = dict(
            pair.split("=", 1) for pair in raw_labels.rstrip("}").split(",") if "=" in pair
        )
        if sample == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return None


class MetricsTests(LiveTestCase):
    async def test_swaps_requests_tokens_and_states_are_counted(self) -> None:
        await self.serve(TWO)
        await self.chat("alpha")
        await self.chat("beta", stream=True)
        await self.chat("beta", fake={"status": 500})
        text = (await self.request("GET", "/metrics")).body.decode()
        self.assertEqual(metric(text, "llamaswap_model_starts_total", model="alpha"), 1)
        self.assertEqual(
            metric(text, "llamaswap_model_stops_total", model="alpha", reason="swap"), 1
        )
        route = "/v1/chat/completions"
        self.assertEqual(
            metric(text, "llamaswap_requests_total", model="beta", route=route, status="200"), 1
        )
        self.assertEqual(
            metric(text, "llamaswap_requests_total", model="beta", route=route, status="500"), 1
        )
        # 8 tokens from the plain answer, 8 more read off the event stream
        self.assertEqual(metric(text, "llamaswap_completion_tokens_total", model="alpha"), 8)
        self.assertEqual(metric(text, "llamaswap_completion_tokens_total", model="beta"), 8)
        self.assertEqual(metric(text, "llamaswap_model_state", model="beta", state="ready"), 1)
        self.assertEqual(metric(text, "llamaswap_model_state", model="alpha", state="ready"), 0)
        self.assertEqual(metric(text, "llamaswap_swaps_total", outcome="ok"), 2)
        self.assertEqual(metric(text, "llamaswap_model_start_seconds_count", model="beta"), 1)
        self.assertEqual(metric(text, "llamaswap_queued_requests", model="alpha"), 0)

    async def test_start_failures_are_counted_by_cause(self) -> None:
        await self.serve(f"models:\n  bad:\n    cmd: {FAKE} --fail-start 2\n")
        await self.chat("bad")
        text = (await self.request("GET", "/metrics")).body.decode()
        self.assertEqual(
            metric(text, "llamaswap_model_start_failures_total", model="bad", cause="exit"), 1
        )


class ActivityTests(LiveTestCase):
    async def test_one_row_per_request_with_waits_tokens_and_speeds(self) -> None:
        await self.serve(TWO)
        await self.chat("alpha")
        await self.chat("alpha", stream=True)
        await self.chat("beta", fake={"status": 418})
        rows = (await self.request("GET", "/api/activity")).json()
        self.assertEqual(rows["total"], 3)
        newest, streamed, first = rows["data"]
        self.assertEqual((newest["model"], newest["status"]), ("beta", 418))
        self.assertEqual(newest["error"], "fake upstream error")
        self.assertGreater(newest["load_ms"], 0)  # beta had to start for it
        self.assertEqual((first["tokens_in"], first["tokens_out"]), (1, 8))
        self.assertEqual(first["gen_tps"], 100.0)
        self.assertEqual(streamed["tokens_out"], 8)
        self.assertEqual(streamed["load_ms"], 0)  # alpha was already running
        self.assertGreater(first["queue_ms"], first["load_ms"] - 1)
        only_alpha = (await self.request("GET", "/api/activity?model=alpha&limit=1")).json()
        self.assertEqual((only_alpha["total"], len(only_alpha["data"])), (2, 1))
        page_two = (await self.request("GET", "/api/activity?model=alpha&limit=1&offset=1")).json()
        self.assertEqual(page_two["data"][0]["id"], first["id"])
        stats = (await self.request("GET", "/api/activity/stats")).json()["models"]
        self.assertEqual((stats["alpha"]["requests"], stats["alpha"]["tokens_out"]), (2, 16))
        self.assertEqual(stats["beta"]["errors"], 1)
        self.assertIsNotNone(stats["alpha"]["latency_ms"]["p99"])
        bad = await self.request("GET", "/api/activity?limit=lots")
        self.assertEqual(bad.code, 400)
        # logRequests: an access line per request in the proxy log
        self.assertIn(
            "beta /v1/chat/completions 418", (await self.request("GET", "/logs")).body.decode()
        )


class StoreTests(TestCase):
    async def test_retention_keeps_the_newest_rows_within_age(self) -> None:
        store = ActivityStore(":memory:", reactor, Retention(max_rows=3, max_age_days=1))
        store.start()
        self.addCleanup(store.stop)
        now = reactor.seconds()
        for i in range(5):
            store.add(
                {
                    "time": now,
                    "model": "m",
                    "path": "/x",
                    "status": 200,
                    "duration_ms": i,
                    "queue_ms": 0,
                    "load_ms": 0,
                }
            )
        store.add(
            {
                "time": now - 3 * 86400,
                "model": "old",
                "path": "/x",
                "status": 200,
                "duration_ms": 0,
                "queue_ms": 0,
                "load_ms": 0,
            }
        )
        result = await store.query()
        # the old row is past its age, and of the rest only the newest 3 stay
        self.assertEqual([r["duration_ms"] for r in result["data"]], [4, 3, 2])
        self.assertEqual(result["total"], 3)

    async def test_rows_not_yet_written_are_written_by_a_clean_stop(self) -> None:
        """Rows are written in batches (one transaction per flush); what is still
        pending when the daemon stops is written before the database closes."""
        path = os.path.abspath(self.mktemp())
        store = ActivityStore(path, reactor, flush_interval=3600)  # no flush on its own
        store.start()
        now = reactor.seconds()
        ids = [store.add({**ROW, "time": now, "duration_ms": i})["id"] for i in range(3)]
        await store.stop()
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT id, duration_ms FROM activity ORDER BY id").fetchall()
        self.assertEqual(rows, [(ids[i], i) for i in range(3)])

    async def test_an_older_log_gets_the_added_columns_and_keeps_its_rows(self) -> None:
        path = os.path.abspath(self.mktemp())
        old = sqlite3.connect(path)
        with old:
            old.executescript(SCHEMA)  # as written before cache_n was recorded
            old.execute("ALTER TABLE activity ADD COLUMN other TEXT")  # another's addition
            old.execute(
                "INSERT INTO activity (id, time, model, path, status, duration_ms, queue_ms,"
                " load_ms, other) VALUES (1, ?, 'm', '/x', 200, 1, 0, 0, 'theirs')",
                (reactor.seconds(),),
            )
        old.close()
        for _ in range(2):  # opened again: nothing more to add
            store = ActivityStore(path, reactor)
            store.start()
            store.add({**ROW, "time": reactor.seconds(), "cache_n": 47})
            await store.stop()
        self.assertFalse(self.flushLoggedErrors())
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        columns = [row[1] for row in db.execute("PRAGMA table_info(activity)")]
        self.assertEqual(columns.count("cache_n"), 1)
        self.assertIn("other", columns)
        self.assertEqual(
            db.execute("SELECT id, other, cache_n FROM activity ORDER BY id").fetchall(),
            [(1, "theirs", None), (2, None, 47), (3, None, 47)],
        )

    def test_percentiles(self) -> None:
        self.assertEqual(percentiles(list(range(1, 101))), {"p50": 50, "p95": 95, "p99": 99})
        self.assertEqual(percentiles([]), {"p50": None, "p95": None, "p99": None})


class EventTests(LiveTestCase):
    async def test_states_logs_activity_and_queue_changes_arrive_live(self) -> None:
        await self.serve(TWO)
        response: IResponse = await self.agent.request(b"GET", (self.base + "/api/events").encode())
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(response.headers.getRawHeaders(b"cache-control"), [b"no-cache"])
        self.assertEqual(response.headers.getRawHeaders(b"x-accel-buffering"), [b"no"])
        reader = StreamReader()
        response.deliverBody(reader)
        await reader.until(b'"id": "beta"')  # the initial state of every model
        await self.chat("alpha")
        await reader.until(b"event: activity")
        events = self.parse(reader.text)
        kinds = {kind for kind, _ in events}
        self.assertTrue({"model", "log", "activity", "queue", "swap"} <= kinds, kinds)
        states = [d["state"] for k, d in events if k == "model" and d["id"] == "alpha"]
        self.assertEqual(states, ["stopped", "starting", "ready"])
        activity = [d for k, d in events if k == "activity"]
        self.assertEqual((activity[0]["model"], activity[0]["status"]), ("alpha", 200))
        reader.hang_up()
        await reader.done

    async def test_a_subscriber_that_stops_reading_is_dropped_cleanly(self) -> None:
        # found with 25 event-stream clients that never read while models swapped: each
        # drop logged a critical "Producer was not unregistered for b'/api/events'"
        api = await self.serve(TWO)
        host, port = self.base.removeprefix("http://").split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        self.addCleanup(stalled.close)
        stalled.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        before = len(api.events._subscribers)
        for _ in range(200):  # until it is subscribed
            if len(api.events._subscribers) > before:
                break
            await deferLater(reactor, 0.01)
        big = ModelChanged("alpha", ModelState.STOPPED, None, "x" * 100_000)
        with capturedLogs() as events:
            for _ in range(5000):
                if len(api.events._subscribers) == before:
                    break  # dropped
                api.events.publish(big)
                await deferLater(reactor, 0)
        self.assertEqual(len(api.events._subscribers), before)
        said = "\n".join(formatEvent(e) + str(e.get("log_failure", "")) for e in events)
        self.assertNotIn("Producer was not unregistered", said)

    def parse(self, text: str) -> list[tuple[str, dict[str, Any]]]:
        events = []
        for block in text.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in lines and "data" in lines:
                events.append((lines["event"], json.loads(lines["data"])))
        return events


class DocumentationTests(LiveTestCase):
    async def test_openapi_is_valid_and_covers_every_route(self) -> None:
        await self.serve(TWO)
        document = (await self.request("GET", "/openapi.json")).json()
        validate(document)
        documented = set(document["paths"])
        for rule in Api.router.url_map.iter_rules():
            path = rule.rule.replace("<path:rest>", "{model}/{path}")
            path = path.replace("<path:name>", "{model}").replace("<path:source>", "{source}")
            path = re.sub(r"<(\w+)>", r"{\1}", path)
            if path in ("/", "/ui", "/swagger", "/swagger/static/") or "__rest__" in path:
                continue  # redirects and static assets
            self.assertIn(path, documented)

    async def test_swagger_ui_is_served_without_a_cdn(self) -> None:
        await self.serve(TWO)
        page = await self.request("GET", "/swagger/")
        self.assertIn(b"/swagger/static/swagger-ui-bundle.js", page.body)
        self.assertNotIn(b"https://", page.body)
        bundle = await self.request("GET", "/swagger/static/swagger-ui-bundle.js")
        self.assertEqual(bundle.code, 200)
        self.assertGreater(len(bundle.body), 100_000)

    async def test_browsers_asking_for_logs_get_the_ui(self) -> None:
        await self.serve(TWO)
        reply = await self.request("GET", "/logs", headers={"accept": "text/html"})
        self.assertEqual((reply.code, reply.header("location")), (302, "/ui/#logs"))
        index = await self.request("GET", "/ui/")
        self.assertEqual(index.code, 200)
        self.assertIn(b"<html", index.body.lower())


class LogRingTests(SynchronousTestCase):
    """What reaches the proxy log ring behind /logs."""

    def test_twisted_chatter_in_llamaswap_classes_stays_out_warnings_come_in(self) -> None:
        hub = LogHub()
        observer = hub.observer()
        # how Twisted's own class loggers speak from llamaswap's subclasses (an
        # HTTPChannel subclass timing out an idle client): one line per connection
        twisted_style = Logger(namespace="llamaswap.connections.BoundedDoorChannel")
        with capturedLogs():
            globalLogPublisher.addObserver(observer)
            try:
                twisted_style.info("Timing out client: {peer}", peer="IPv4Address(...)")
                twisted_style.warn("a warning from Twisted")
                try:
                    1 / 0  # noqa: B018
                except ZeroDivisionError:
                    twisted_style.failure("Unhandled Error Processing Request.")
                logger("llamaswap.own").info("llamaswap's own line")
            finally:
                globalLogPublisher.removeObserver(observer)
        self.flushLoggedErrors(ZeroDivisionError)
        text = "\n".join(hub.history(PROXY))
        self.assertNotIn("Timing out client", text)
        self.assertIn("a warning from Twisted", text)
        self.assertIn("ZeroDivisionError", text)
        self.assertIn("llamaswap's own line", text)
