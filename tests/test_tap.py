"""The twistd plugin and its command line, including what twistd itself prints."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import treq
from twisted.application import strports
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llamaswap.relay import BytesProducer
from llamaswap.tap import (
    DEFAULT_LISTEN,
    InvalidConfig,
    Listeners,
    Options,
    another_listen,
    makeService,
)

from .daemon import TWISTD, daemon_env, free_port, start_twistd
from .integration import kill_quietly, pid_alive

ROOT = Path(__file__).resolve().parent.parent


class OptionsTests(SynchronousTestCase):
    def config_file(self, text: str) -> str:
        path = str(self.mktemp())
        Path(path).write_text(text)
        return path

    def test_plugin_is_found(self) -> None:
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "llamaswap"]
        self.assertEqual(len(makers), 1)
        self.assertIsInstance(makers[0].options(), Options)

    def test_defaults_and_repeatable_listen(self) -> None:
        path = self.config_file("models:\n  m:\n    cmd: s --port ${PORT}\n")
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options["listen"], [DEFAULT_LISTEN])
        self.assertEqual(list(options["config_obj"].models), ["m"])
        options = Options()
        options.parseOptions(
            ["--config", path, "--listen", "tcp:9000", "--listen", "unix:/tmp/llamaswap.sock"]
        )
        self.assertEqual(options["listen"], ["tcp:9000", "unix:/tmp/llamaswap.sock"])

    def test_once_running_what_start_up_built_is_out_of_the_collectors_way(self) -> None:
        # full collections would otherwise walk every start-up object, stalling the
        # reactor for tens of milliseconds at a time in a long-running daemon
        path = self.config_file(
            "store: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"
        )
        options = Options()
        options.parseOptions(["--config", path, "--listen", "tcp:0"])
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)
        clock = MemoryReactorClock()
        makeService(options, clock)
        self.assertEqual(gc.get_freeze_count(), 0)  # not before the reactor runs
        clock.run()
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_an_idle_daemon_loads_no_child_or_docs_libraries(self) -> None:
        # psutil (~1 MiB) is needed once a model runs, the Swagger UI bundle when the
        # docs are asked for, Twisted's static files (which read the MIME types) when a
        # page is, Twisted's HTTP client when a model is asked for: an idle daemon stays
        # smaller without them
        path = self.config_file(
            "store: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"
        )
        probe = (
            "import os, sys\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from llamaswap.tap import Options, makeService\n"
            "options = Options()\n"
            f"options.parseOptions(['--config', {path!r}, '--listen', 'tcp:0'])\n"
            "clock = MemoryReactorClock()\n"
            "makeService(options, clock).startService()\n"
            "clock.run()\n"
            "clock.advance(120)\n"
            "unused = {'psutil', 'swagger_ui_bundle', 'twisted.web.static', 'twisted.web.client'}\n"
            "print(sorted(unused & set(sys.modules)), flush=True)\n"
            "os._exit(0)\n"  # the started service's threads would keep it alive
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
        )
        self.assertEqual(result.stdout.strip().splitlines()[-1], "[]")

    def test_config_is_required_and_validated(self) -> None:
        self.assertIn(
            "give --config FILE, --models-dir DIR, or both",
            str(self.assertRaises(UsageError, Options().parseOptions, [])),
        )
        path = self.config_file("models:\n  m:\n    cmd: s --port ${PORT}\n    ttl: forever\n")
        error = self.assertRaises(InvalidConfig, Options().parseOptions, ["--config", path])
        self.assertIn(f"{path}: models.m.ttl: expected a number, got str 'forever'", str(error))

    def test_a_listen_value_that_is_no_endpoint_gets_one_shown(self) -> None:
        path = self.config_file("models:\n  m:\n    cmd: s --port ${PORT}\n")

        def error(listen: str) -> str:
            return str(
                self.assertRaises(
                    UsageError, Options().parseOptions, ["--config", path, "--listen", listen]
                )
            )

        self.assertIn("did you mean --listen tcp:8080:interface=127.0.0.1?", error("8080"))
        self.assertIn("did you mean --listen tcp:9000:interface=0.0.0.0?", error("0.0.0.0:9000"))
        self.assertIn(
            "--listen 'tcp:8080:bogus=1' is not a Twisted endpoint string",
            error("tcp:8080:bogus=1"),
        )
        self.assertIn("write e.g. --listen tcp:8080:interface=127.0.0.1", error("tcp:abc"))
        # an IPv6 address: Twisted wants its colons escaped, and no brackets
        self.assertIn("did you mean --listen tcp:8080:interface=\\:\\:1?", error("[::1]:8080"))
        self.assertIn("did you mean --listen tcp:8080:interface=\\:\\:1?", error("::1:8080"))
        # an endpoint of another kind ending in a number is not taken for host:port
        self.assertNotIn("did you mean", error("le:/x:tcp:443"))
        # the parser reads files and lists too: a usage error, not a traceback
        missing = os.path.join(self.mktemp(), "key.pem")
        self.assertIn(
            f"--listen 'ssl:8443:privateKey={missing}' cannot be used",
            error(f"ssl:8443:privateKey={missing}"),
        )
        self.assertIn("cannot be used", error("systemd:domain=INET:index=0"))

    def test_help_mentions_the_options(self) -> None:
        text = str(Options())
        self.assertIn("--config", text)
        self.assertIn("--listen", text)


class TakenPortTests(SynchronousTestCase):
    """The ``--listen`` suggested when a port is taken is one that can be used."""

    def refused(self, listen: str) -> str:
        """The line said when the real listener for ``listen`` cannot bind."""
        listeners = Listeners()
        strports.service(listen, Factory(), reactor=reactor).setServiceParent(listeners)
        with capturedLogs() as events, self.assertRaises(SystemExit):
            listeners.privilegedStartService()
        (line,) = [formatEvent(e) for e in events if e["log_level"] == LogLevel.critical]
        return line

    def suggested(self, line: str) -> str:
        other = line.split("--listen ", 1)[1].split(";", 1)[0]
        serverFromString(reactor, other)  # a real endpoint string, or it raises
        self.assertLessEqual(int(other.split(":")[1]), 65535)
        return other

    def test_the_last_port_taken_suggests_the_one_below(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        with contextlib.suppress(OSError):  # taken already, by someone else: the same here
            taken.bind(("127.0.0.1", 65535))
        taken.listen()
        line = self.refused("tcp:65535:interface=127.0.0.1")
        self.assertIn("cannot listen on 127.0.0.1:65535", line)
        # before: tcp:65536, which --listen refuses in turn
        self.assertEqual(self.suggested(line), "tcp:65534:interface=127.0.0.1")

    def test_an_ipv6_interface_is_escaped_in_the_suggestion(self) -> None:
        self.assertEqual(another_listen("::1", 8080), "tcp:8081:interface=\\:\\:1")
        self.assertEqual(another_listen("", 65535), "tcp:65534")
        self.assertEqual(another_listen("", "http"), "tcp:8081")  # a named port
        # before: interface=::1, which the endpoint parser refuses (a TypeError)
        serverFromString(reactor, another_listen("::1", 8080))


class TwistdTests(TestCase):
    """Run the real ``twistd`` the way users do."""

    timeout = 60

    async def run_twistd(self, *args: str) -> tuple[int, str]:
        env = daemon_env()
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "llamaswap", *args], env=env, reactor=reactor
        )
        return code, (out + err).decode()

    async def test_a_port_in_use_stops_startup_with_a_clear_message(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        code, output = await self.run_twistd(
            "--config",
            str(ROOT / "config.example.yaml"),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        )
        self.assertNotEqual(code, 0)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}", output)
        self.assertIn("Address already in use", output)
        self.assertIn(f"--listen tcp:{port + 1}:interface=127.0.0.1", output)  # what to do
        self.assertNotIn("Traceback", output)

    async def test_an_invalid_config_exits_non_zero_naming_the_key(self) -> None:
        path = self.mktemp()
        Path(path).write_text("models:\n  m:\n    cmd: s --port ${PORT}\n    aliasses: [x]\n")
        code, output = await self.run_twistd("--config", path)
        self.assertEqual(code, 1)
        self.assertEqual(
            output.strip(),  # just what is wrong: not the option help first
            f"llamaswap: invalid configuration: {path}: models.m.aliasses: unknown key "
            "(did you mean 'aliases'?)",
        )

    async def test_several_problems_are_said_at_once_each_on_its_line(self) -> None:
        path = self.mktemp()
        model = "    cmd: s --port ${PORT}\n"
        Path(path).write_text(
            f"models:\n  a:\n{model}    ttl: ten\n  b:\n{model}    aliasses: [x]\n"
            "groups:\n  g:\n    members: [a, b, zzz]\napiKeys: [sk-with space]\n"
        )
        code, output = await self.run_twistd("--config", path)
        self.assertEqual(code, 1)
        self.assertEqual(
            output.strip().splitlines(),
            [
                f"llamaswap: invalid configuration: {path}: 4 problems:",
                f"{path}: models.a.ttl: expected a number, got str 'ten'",
                f"{path}: models.b.aliasses: unknown key (did you mean 'aliases'?)",
                f"{path}: groups.g.members[2]: unknown model 'zzz' (known models: a, b)",
                f"{path}: apiKeys[0]: a key must be non-empty and contain no spaces",
            ],
        )

    def launch(self, start_port: int) -> tuple[subprocess.Popen[bytes], int]:
        """A real ``twistd -n llamaswap`` with one fake model ``m``, on a free port."""
        path = self.mktemp()
        fake = f"{sys.executable} -m llamaswap.testing.fake_server --port ${{PORT}} --model m"
        Path(path).write_text(
            f"startPort: {start_port}\nstore: {{path: ':memory:'}}\n"
            f"models:\n  m:\n    cmd: {fake}\n"
        )
        port = free_port()
        twistd = start_twistd(path, port)
        self.addCleanup(twistd.kill)
        return twistd, port

    async def test_sigterm_lets_a_stream_finish_then_exits_0(self) -> None:
        twistd, port = self.launch(31900)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        body = json.dumps(
            {"model": "m", "stream": True, "fake": {"tokens": 20, "delay": 0.05}}
        ).encode()
        response = None
        for _ in range(200):
            try:
                response = await agent.request(
                    b"POST",
                    f"http://127.0.0.1:{port}/v1/chat/completions".encode(),
                    Headers({"content-type": ["application/json"]}),
                    BytesProducer(body),
                )
                break
            except ConnectError:
                await deferLater(reactor, 0.05)
        assert response is not None
        chunks: list[bytes] = []
        collected = treq.collect(response, chunks.append)
        twistd.send_signal(signal.SIGTERM)  # in the middle of the stream
        await collected
        streamed = b"".join(chunks)
        self.assertIn(b" t19", streamed)  # every token, not cut short
        self.assertNotIn(b'"error"', streamed)
        self.assertTrue(streamed.rstrip().endswith(b"data: [DONE]"))
        for _ in range(200):
            if twistd.poll() is not None:
                break
            await deferLater(reactor, 0.05)
        self.assertEqual(twistd.returncode, 0)

    async def load_m(self, port: int) -> int:
        """Load model ``m`` once twistd listens; its pid from ``/running``."""
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        loaded = None
        for _ in range(200):
            try:
                loaded = await agent.request(
                    b"POST", f"http://127.0.0.1:{port}/api/models/load/m".encode()
                )
                break
            except ConnectError:
                await deferLater(reactor, 0.05)
        assert loaded is not None
        self.assertEqual(json.loads(await treq.content(loaded))["state"], "ready")
        running = await agent.request(b"GET", f"http://127.0.0.1:{port}/running".encode())
        pid: int = json.loads(await treq.content(running))["running"][0]["pid"]
        return pid

    async def test_children_die_with_llamaswap_even_on_sigkill(self) -> None:
        twistd, port = self.launch(31800)
        child = await self.load_m(port)
        twistd.send_signal(signal.SIGKILL)
        twistd.wait()
        for _ in range(200):
            if not _alive(child):
                break
            await deferLater(reactor, 0.02)
        self.assertFalse(_alive(child))

    async def test_a_wrapper_scripts_server_dies_with_llamaswap_on_sigkill(self) -> None:
        # cmd is a wrapper script; the server it starts is a grandchild of llamaswap,
        # which a parent-death signal on the direct child never reached
        folder = Path(self.mktemp())
        folder.mkdir()
        wrapper = folder / "run-model.sh"
        wrapper.write_text(
            "#!/bin/sh\n"
            f'{sys.executable} -m llamaswap.testing.fake_server --port "$1" --model m &\n'
            f"echo $! > {folder / 'server.pid'}\n"
            "wait\n"
        )
        config = folder / "config.yaml"
        config.write_text(
            "startPort: 31700\nstore: {path: ':memory:'}\n"
            f"models:\n  m:\n    cmd: /bin/sh {wrapper} ${{PORT}}\n"
        )
        port = free_port()
        twistd = start_twistd(config, port)
        self.addCleanup(twistd.kill)
        script = await self.load_m(port)
        server = int((folder / "server.pid").read_text())
        self.addCleanup(kill_quietly, server)
        self.assertEqual(_group_members(script), {script, server, _watcher(script)})
        twistd.send_signal(signal.SIGKILL)
        twistd.wait()
        for _ in range(250):  # bounded: 5 s for the kernel to deliver and reap
            if not _group_members(script):
                break
            await deferLater(reactor, 0.02)
        # nothing of the model's process group is left: wrapper, server, watcher
        self.assertEqual(_group_members(script), set())
        self.assertFalse(pid_alive(server))


def _group_members(group: int) -> set[int]:
    """Live (not zombie) processes in process group ``group``."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            members.add(int(entry.name))
    return members


def _watcher(leader: int) -> int:
    """The lifeline watcher llamaswap forks into a child's group."""
    for pid in _group_members(leader):
        if b"llamaswap-lifeline" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no lifeline watcher in the group")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
