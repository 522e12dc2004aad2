"""Chaos: children that misbehave in every way we know, and llamaswap staying whole."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from .integration import FAKE, LiveTestCase, SlowClients, pid_alive


class ChaosTests(LiveTestCase):
    async def test_a_child_that_never_binds_times_out_and_is_killed(self) -> None:
        await self.serve("healthCheckTimeout: 0.5\nmodels:\n  mute:\n    cmd: sleep 60 ${PORT}\n")
        reply = await self.chat("mute")
        self.assertEqual(reply.code, 503)
        self.assertIn("not ready after 0.5s", reply.json()["error"]["message"])
        self.assertEqual(await self.running(), {})
        self.assertEqual(self.api.scheduler.processes["mute"].pid, None)

    async def test_a_child_that_ignores_sigterm_is_killed_after_its_grace(self) -> None:
        await self.serve(
            f"models:\n  stubborn:\n    cmd: {FAKE} --ignore-sigterm\n    unloadTimeout: 0.3\n"
        )
        await self.chat("stubborn")
        pid = (await self.running())["stubborn"]["pid"]
        await self.post("/api/models/unload/stubborn", {})
        self.assertFalse(pid_alive(pid))
        self.assertIn("killing it", (await self.request("GET", "/logs")).body.decode())

    async def test_megabytes_of_child_output_stay_bounded(self) -> None:
        await self.serve(f"models:\n  chatty:\n    cmd: {FAKE} --log-spam 60000\n")
        reply = await self.chat("chatty")
        self.assertEqual(reply.code, 200)
        logs = (await self.request("GET", "/logs")).body
        # the child printed several MB; the rings keep about 100 kB per source
        self.assertLess(len(logs), 250_000)
        self.assertIn(b"server is listening", logs)

    async def test_a_port_conflict_is_a_clear_start_failure(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        fixed = FAKE.replace("${PORT}", str(port))
        await self.serve(
            f"models:\n  clash:\n    cmd: {fixed}\n    proxy: http://127.0.0.1:{port}\n"
        )
        reply = await self.chat("clash")
        self.assertEqual(reply.code, 503)
        message = reply.json()["error"]["message"]
        self.assertIn("exited with code 1", message)
        self.assertIn("Address already in use", message)

    async def test_a_stream_cut_by_sigkill_then_the_model_comes_back(self) -> None:
        await self.serve(f"models:\n  fragile:\n    cmd: {FAKE}\n")
        await self.chat("fragile")
        pid = (await self.running())["fragile"]["pid"]
        os.kill(pid, 9)

        async def noticed() -> bool:
            return "fragile" not in await self.running()

        await self.eventually(noticed, "the kill is noticed")
        self.assertEqual((await self.chat("fragile")).code, 200)

    async def test_slow_clients_cannot_starve_a_daemon_short_of_files(self) -> None:
        # 400 open files, 500 slowloris connections: without the caps llamaswap ran
        # out of descriptors and chat requests failed ("Too many open files")
        path = Path(self.mktemp())
        path.write_text(
            f"startPort: {random.randrange(20000, 40000)}\nstore: {{path: ':memory:'}}\n"
            f"models:\n  m:\n    cmd: {FAKE}\n"
        )
        log = Path(self.mktemp())
        with log.open("w") as output:
            _twistd, port = await self.daemon(path, output, file_limit=400)
        crowd = SlowClients()
        crowd.open(port, 500)
        self.addCleanup(crowd.close_all)
        for _ in range(400):  # bounded: before the caps, most never got an answer
            if crowd.settled and crowd.held <= 64:
                break
            await deferLater(reactor, 0.05)
        # (400 - 128) / 2 = 136 in all, 64 (maxPerClient) from the slow clients' address
        self.assertLessEqual(crowd.held, 64)
        reply = await Deferred.fromCoroutine(self.chat("m")).addTimeout(20, reactor)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertIn("refusing new connections", log.read_text())
