"""Public Twisted APIs only: what ``llamaswap.twisted_compat`` relies on still holds,
the upstream connections stay quiet through public APIs, and no other module reaches
into a private attribute."""

from __future__ import annotations

import ast
import signal
import sys
from pathlib import Path
from typing import Any

import treq
from twisted.application.app import ApplicationRunner
from twisted.internet import reactor
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

import llamaswap
from llamaswap.twisted_compat import forget_exit_signal
from llamaswap.upstream import UpstreamEndpoints

PACKAGE = Path(llamaswap.__file__).parent
ADAPTER = PACKAGE / "twisted_compat.py"
#: underscore names that are public by their owner's documentation
PUBLIC_UNDERSCORE = {("os", "_exit")}


@implementer(_ISupportsExitSignalCapturing)
class _SignalledReactor(MemoryReactor):
    """A reactor that was stopped by SIGTERM: ``run`` returns at once."""

    _exitSignal: int | None = signal.SIGTERM

    def run(self) -> None:
        pass


def _runner_after(stopped: Any) -> ApplicationRunner:
    """twistd's runner, once its reactor (``stopped``) has returned from ``run``."""
    runner = object.__new__(ApplicationRunner)  # only startReactor is exercised
    runner.config = {"profile": False, "debug": False, "nodaemon": True}
    runner.profiler = None  # type: ignore[assignment]  # profile is off
    runner.startReactor(stopped, sys.stdout, sys.stderr)
    return runner


class ExitSignalTests(SynchronousTestCase):
    """``forget_exit_signal`` sets a private attribute: these fail if it stops meaning
    "twistd will re-raise this signal"."""

    def test_the_reactor_records_the_signal_that_stops_it(self) -> None:
        fresh = SelectReactor()  # never run: its handlers are called by hand
        self.assertTrue(_ISupportsExitSignalCapturing.providedBy(fresh))
        self.assertIsNone(fresh._exitSignal)
        fresh.sigTerm(signal.SIGTERM)
        self.assertEqual(fresh._exitSignal, signal.SIGTERM)
        fresh.sigInt(signal.SIGINT)
        self.assertEqual(fresh._exitSignal, signal.SIGINT)
        forget_exit_signal(fresh)
        self.assertIsNone(fresh._exitSignal)

    def test_twistd_exits_by_the_recorded_signal_unless_it_was_forgotten(self) -> None:
        self.assertEqual(_runner_after(_SignalledReactor())._exitSignal, signal.SIGTERM)
        forgotten = _SignalledReactor()
        forget_exit_signal(forgotten)
        self.assertIsNone(_runner_after(forgotten)._exitSignal)

    def test_a_reactor_without_the_attribute_is_left_alone(self) -> None:
        clock = MemoryReactor()
        forget_exit_signal(clock)
        self.assertFalse(hasattr(clock, "_exitSignal"))


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"hello"


class UpstreamEndpointTests(TestCase):
    """Upstream connections log nothing, through ``Agent.usingEndpointFactory``."""

    async def factory_lines(self, agent_for: Any) -> list[str]:
        """The "Starting/Stopping factory" lines one request through an agent logs
        (the listening site's own lines left out)."""
        site = Site(_Hello())
        listening: Any = reactor.listenTCP
        port = listening(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        lines: list[str] = []

        @implementer(ILogObserver)
        def observe(event: LogEvent) -> None:
            factory = event.get("factory")
            if "factory" in str(event.get("log_format", "")) and factory is not site:
                lines.append(str(event["log_format"]))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        pool = HTTPConnectionPool(reactor, persistent=True)
        response = await agent_for(pool).request(
            b"GET", f"http://127.0.0.1:{port.getHost().port}/".encode()
        )
        self.assertEqual(await treq.content(response), b"hello")
        await pool.closeCachedConnections()
        return lines

    async def test_twisted_logs_each_upstream_connection_by_default(self) -> None:
        """The noise UpstreamEndpoints silences (if this fails, Twisted went quiet)."""
        lines = await self.factory_lines(lambda pool: Agent(reactor, pool=pool))
        self.assertIn("Starting factory {factory!r}", lines)

    async def test_upstream_endpoints_log_nothing(self) -> None:
        lines = await self.factory_lines(
            lambda pool: Agent.usingEndpointFactory(reactor, UpstreamEndpoints(reactor, 10), pool)
        )
        self.assertEqual(lines, [])

    def test_https_and_unknown_schemes(self) -> None:
        endpoints = UpstreamEndpoints(MemoryReactor(), 10)
        endpoints.endpointForURI(URI.fromBytes(b"https://peer.example:8443/v1"))
        self.assertRaises(
            SchemeNotSupported, endpoints.endpointForURI, URI.fromBytes(b"ftp://peer.example/")
        )


def private_reaches(source: str) -> list[str]:
    """Where ``source`` names a private attribute of something other than ``self`` or
    ``cls`` (Twisted's or another of our objects), or imports a private Twisted name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Name) and (owner.id, node.attr) in PUBLIC_UNDERSCORE:
                continue
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            names = [a.name for a in node.names if _private(a.name)]
            if names or any(_private(part) for part in (node.module or "").split(".")):
                found.append(f"line {node.lineno}: from {node.module} import {names}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "twisted" and any(_private(p) for p in parts):
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


class PrivateNamesTests(SynchronousTestCase):
    def test_no_module_outside_the_adapter_names_a_private_attribute(self) -> None:
        reaches = {}
        for module in sorted(PACKAGE.rglob("*.py")):
            if module != ADAPTER:
                found = private_reaches(module.read_text())
                if found:
                    reaches[str(module.relative_to(PACKAGE))] = found
        self.assertEqual(reaches, {})

    def test_the_check_sees_each_kind_of_reach(self) -> None:
        source = (
            "from twisted.web.client import _HTTP11ClientFactory\n"
            "from twisted.web._newclient import RequestNotSent\n"
            "import twisted.web._newclient\n"
            "pool._factory = None\n"
            "self.relay._agent.request()\n"
            "getattr(reactor, '_exitSignal', None)\n"
            "self._mine = os._exit\n"
        )
        self.assertEqual(len(private_reaches(source)), 6)
        self.assertTrue(private_reaches(ADAPTER.read_text()))  # the adapter is where they are
