"""Chaos: children that misbehave in every way we know, and llamaswap staying whole."""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from .integration import FAKE, LiveTestCase, SlowClients, kill_quietly, pid_alive

SERVER = f"{sys.executable} -m llamaswap.testing.fake_server"


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

    def script(self, body: str) -> str:
        """A wrapper script in a temp dir; ``$1`` is the port, ``$2`` a pid file."""
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "run-model.sh"
        path.write_text("#!/bin/sh\n" + body)
        return f"/bin/sh {path} ${{PORT}} {folder / 'server.pid'}"

    def server_pid(self, cmd: str) -> int:
        pid = int(Path(cmd.split()[-1]).read_text())
        self.addCleanup(kill_quietly, pid)
        return pid

    async def test_a_server_that_left_the_group_with_the_pipes_does_not_block_a_swap(
        self,
    ) -> None:
        # the wrapper daemonizes its server (setsid) but the server keeps its stdout;
        # a stop ends the wrapper, the server lives on
        leaky = self.script(f'setsid {SERVER} --port "$1" --model leaky &\necho $! > "$2"\nwait\n')
        await self.serve(
            f"models:\n  leaky:\n    cmd: {leaky}\n    unloadTimeout: 30\n"
            f"  other:\n    cmd: {FAKE}\n"
        )
        self.assertEqual((await self.chat("leaky")).code, 200)
        helper = self.server_pid(leaky)
        port = (await self.running())["leaky"]["port"]
        # before: "leaky" stayed stopping until the helper exited; "other" got no answer
        self.assertEqual((await self.chat("other")).code, 200)
        self.assertTrue(pid_alive(helper))
        reply = await self.request("GET", "/running")
        [stuck] = [e for e in reply.json()["running"] if e["state"] == "stuck"]
        self.assertEqual((stuck["model"], stuck["port"], stuck["pid"]), ("leaky", port, None))
        self.assertIn("holds its output", stuck["why"])
        metrics = (await self.request("GET", "/metrics")).body.decode()
        self.assertRegex(metrics, r'llamaswap_stuck_processes\{model="leaky"\} 1\.0')
        self.assertIn("KillMode=control-group", (await self.request("GET", "/logs")).body.decode())
        self.assertNotEqual((await self.running())["other"]["port"], port)

    async def test_a_child_that_forks_its_server_and_exits_is_not_ready(self) -> None:
        forker = self.script(f'{SERVER} --port "$1" --model forker &\necho $! > "$2"\nexit 0\n')
        await self.serve(f"models:\n  forker:\n    cmd: {forker}\n")
        reply = await self.chat("forker")
        # before: ready (the forked server answered health) with the dead pid shown
        self.assertEqual(reply.code, 503)
        self.assertIn("exited with code 0 while starting", reply.json()["error"]["message"])
        self.assertEqual(await self.running(), {})
        server = self.server_pid(forker)

        async def gone() -> bool:
            return not pid_alive(server)

        await self.eventually(gone, "the forked server is killed with its group")

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
