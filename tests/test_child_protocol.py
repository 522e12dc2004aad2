"""llama-server's router/child protocol, and the HTTP health check for other servers."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.error import ProcessDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.server import Site
from zope.interface import implementer

from llamaswap import childproto
from llamaswap.config import ConfigError, parse_config
from llamaswap.events import Event, Progress
from llamaswap.lifecycle import IModelWatcher, ModelView
from llamaswap.process import MAX_LINE, ChildProtocol, ModelState, Timing
from llamaswap.scheduler import IModelHooks, NoHooks
from llamaswap.tap import Supervisor
from llamaswap.testing.fake_server import FakeLlamaServer
from llamaswap.testing.fakes import FakeProcess

from .helpers import World, world
from .integration import FAKE, LiveTestCase, pid_alive

SPEAKS = """
models:
  a:
    cmd: sleep --port ${PORT} --model a
    childProtocol: on
  b:
    cmd: sleep --port ${PORT} --model b
"""
TIMING = Timing(health_timeout=30, poll_interval=0.25, stop_timeout=10, exit_grace=1)


def state(name: str, payload: object = None) -> str:
    document = {"payload": payload if payload is not None else {}, "state": name}
    return childproto.STATE_PREFIX + json.dumps(document)


def loading(value: float, current: str = "text_model", stages: Any = ("text_model",)) -> str:
    return state("loading", {"stages": list(stages), "current": current, "value": value})


class ProtocolTests(SynchronousTestCase):
    def starting(self, text: str = SPEAKS) -> tuple[World, Deferred[Any]]:
        w = world(text, timing=TIMING)
        return w, w.scheduler.acquire("a")

    def ready_and_idle(self, w: World, d: Deferred[Any]) -> FakeProcess:
        """``a`` says it is ready, serves the request that started it, and is idle."""
        a = w.child("a")
        a.say(state("ready"), fd=1)
        self.successResultOf(d).release()
        return a

    def test_the_child_is_a_routers_child_with_stdin_kept_open(self) -> None:
        w, _ = self.starting()
        a = w.child("a")
        self.assertEqual(a.env[childproto.ROUTER_PORT_ENV], "0")
        self.assertFalse(a.stdin_closed)
        other = world(SPEAKS, timing=TIMING)
        other.scheduler.acquire("b")  # childProtocol auto, and not a llama-server
        self.assertNotIn(childproto.ROUTER_PORT_ENV, other.child("b").env)
        self.assertTrue(other.child("b").stdin_closed)

    def test_ready_on_stdout_makes_the_model_ready_without_a_health_check(self) -> None:
        w, d = self.starting()
        a = w.child("a")
        a.say(loading(0.0), fd=1)  # it speaks: the health check stops
        w.reactor.advance(5)
        self.assertEqual(w.health.probes, [])
        self.assertNoResult(d)
        a.say("", fd=1)
        a.say(state("ready", {"id": "a"}), fd=1)
        self.successResultOf(d)
        self.assertIs(w.process("a").state, ModelState.READY)

    def test_protocol_lines_are_not_log_lines(self) -> None:
        w, _ = self.starting()
        a = w.child("a")
        a.say("main: loading model")
        a.say("", fd=1)
        a.say(loading(0.5), fd=1)
        a.say("", fd=1)
        a.say(state("ready"), fd=1)
        self.assertEqual(w.logs.history("a"), ["main: loading model"])
        self.assertEqual(list(w.process("a").tail), ["main: loading model"])

    def test_a_ready_line_on_stderr_is_only_a_log_line(self) -> None:
        w, d = self.starting()
        w.child("a").say(state("ready"), fd=2)  # e.g. a prompt echoed by a verbose log
        self.assertNoResult(d)
        self.assertIn(state("ready"), w.logs.history("a"))

    def test_a_garbled_message_is_dropped(self) -> None:
        w, d = self.starting()
        w.child("a").say(childproto.STATE_PREFIX + '{"state": "rea', fd=1)
        w.child("a").say(childproto.STATE_PREFIX + "[1, 2]", fd=1)
        self.assertNoResult(d)
        self.assertEqual(w.logs.history("a"), [])

    def test_loading_progress_is_published_and_kept_until_ready(self) -> None:
        w, d = self.starting()
        seen: list[Event] = []
        w.process("a").events.subscribe(seen.append)
        a = w.child("a")
        a.say(loading(0.25), fd=1)
        self.assertEqual(w.process("a").progress, 0.25)
        # a projector after the text model: the second half of the whole load
        a.say(loading(0.5, "mmproj_model", ["text_model", "mmproj_model"]), fd=1)
        self.assertEqual(w.process("a").progress, 0.75)
        self.assertEqual(w.process("a").stage, "mmproj_model")
        progress = [e for e in seen if isinstance(e, Progress)]
        self.assertEqual([p.progress for p in progress], [0.25, 0.75])
        a.say(state("ready"), fd=1)
        self.successResultOf(d)
        self.assertIsNone(w.process("a").progress)

    def test_a_loaded_child_gets_a_spare_connection_before_it_says_ready(self) -> None:
        """Its warm-up takes a while: the waiting request then goes out at once."""
        w, d = self.starting()
        a = w.child("a")
        a.say(loading(0.5), fd=1)
        self.assertEqual(w.spares, [])
        a.say(loading(1.0), fd=1)
        self.assertEqual(w.spares, [w.process("a").base_url])
        a.say(state("ready"), fd=1)
        self.successResultOf(d)

    def test_a_server_that_is_polled_gets_no_spare(self) -> None:
        """Its next health probe would take it."""
        w = world(SPEAKS, timing=TIMING)
        w.scheduler.acquire("b")
        w.child("b").say("llm_load: 100 %")  # progress read off the log
        self.assertEqual(w.process("b").progress, 1.0)
        self.assertEqual(w.spares, [])

    def test_a_child_that_never_speaks_is_still_found_ready_over_http(self) -> None:
        """A llama-server older than router mode ignores the variable."""
        w, d = self.starting()
        w.health.status[w.process("a").base_url] = 200
        w.reactor.advance(TIMING.poll_interval)
        self.successResultOf(d)

    def test_stop_is_the_exit_command_then_term_then_kill(self) -> None:
        w, d = self.starting()
        a = self.ready_and_idle(w, d)
        a.ignore_term = True
        stopped = w.process("a").stop()
        self.assertEqual(a.stdin, [childproto.EXIT_COMMAND])
        self.assertEqual(a.signals, [])
        w.reactor.advance(TIMING.exit_grace)
        self.assertEqual(a.signals, ["TERM"])
        w.reactor.advance(TIMING.stop_timeout - TIMING.exit_grace)
        self.assertEqual(a.signals, ["TERM", "KILL"])
        self.successResultOf(stopped)

    def test_an_idle_child_the_scheduler_stops_gets_sigkill_at_once(self) -> None:
        """quickStop: nothing is lost, and llama-server is gone in half the time."""
        w, d = self.starting()
        a = self.ready_and_idle(w, d)
        self.successResultOf(w.scheduler.unload(["a"]))
        self.assertEqual((a.stdin, a.signals), ([], ["KILL"]))
        self.assertIs(w.process("a").state, ModelState.STOPPED)

    def test_a_swap_stops_the_idle_child_with_sigkill(self) -> None:
        text = SPEAKS.replace("--model b", "--model b\n    childProtocol: on")
        w, d = self.starting(text)
        a = self.ready_and_idle(w, d)
        swapped = w.scheduler.acquire("b")
        self.assertEqual((a.stdin, a.signals), ([], ["KILL"]))
        w.child("b").say(state("ready"), fd=1)
        self.successResultOf(swapped)

    def test_without_quick_stop_an_idle_child_gets_the_exit_command(self) -> None:
        w, d = self.starting(
            SPEAKS.replace("childProtocol: on", "childProtocol: on\n    quickStop: false")
        )
        a = self.ready_and_idle(w, d)
        w.scheduler.unload(["a"])
        self.assertEqual((a.stdin, a.signals), ([childproto.EXIT_COMMAND], []))

    def test_a_child_with_a_request_in_flight_gets_the_exit_command(self) -> None:
        w, d = self.starting()
        a = w.child("a")
        a.say(state("ready"), fd=1)
        lease = self.successResultOf(d)
        w.scheduler.unload(["a"])
        self.assertEqual((a.stdin, a.signals), ([childproto.EXIT_COMMAND], []))
        lease.release()

    def test_a_save_still_running_at_its_timeout_gets_the_exit_command(self) -> None:
        """The hook's save may still be writing in the child: let it finish cleanly."""

        @implementer(IModelHooks)
        class TimedOut(NoHooks):
            def before_stop(self, process: ModelView, reason: str) -> Deferred[bool]:
                return succeed(False)

        w = world(SPEAKS, timing=TIMING, hooks=lambda config, reactor: TimedOut())
        a = self.ready_and_idle(w, w.scheduler.acquire("a"))
        w.scheduler.unload(["a"])
        self.assertEqual((a.stdin, a.signals), ([childproto.EXIT_COMMAND], []))

    def test_a_request_granted_while_the_hook_saves_gets_the_exit_command(self) -> None:
        """An unload does not keep requests away while ``before_stop`` saves: one
        that came meanwhile is in flight when the stop is asked, so no SIGKILL."""
        saving: Deferred[bool] = Deferred()

        @implementer(IModelHooks)
        class Slow(NoHooks):
            def before_stop(self, process: ModelView, reason: str) -> Deferred[bool]:
                return saving

        w = world(SPEAKS, timing=TIMING, hooks=lambda config, reactor: Slow())
        a = self.ready_and_idle(w, w.scheduler.acquire("a"))
        w.scheduler.unload(["a"])
        lease = self.successResultOf(w.scheduler.acquire("a"))  # still ready: granted
        saving.callback(True)
        self.assertEqual((a.stdin, a.signals), ([childproto.EXIT_COMMAND], []))
        lease.release()

    def test_a_request_granted_to_a_swap_victim_while_it_saves_finishes_first(self) -> None:
        """A swap's victim still serves more urgent requests while ``before_stop``
        saves; one granted then is not cut by the stop (which aborts what is in
        flight): the stop waits for it, and saves again."""
        saving: Deferred[bool] = Deferred()
        saves: list[str] = []

        @implementer(IModelHooks)
        class Slow(NoHooks):
            def before_stop(self, process: ModelView, reason: str) -> Deferred[bool]:
                saves.append(reason)
                return saving if len(saves) == 1 else succeed(True)

        w = world(SPEAKS, timing=TIMING, hooks=lambda config, reactor: Slow())
        a = self.ready_and_idle(w, w.scheduler.acquire("a"))
        background = w.scheduler.acquire("b", priority=-1)  # a swap, a its victim
        urgent = self.successResultOf(w.scheduler.acquire("a"))  # still ready: granted
        saving.callback(True)
        self.assertEqual((a.stdin, w.process("a").state), ([], ModelState.READY))
        urgent.release()
        self.assertEqual(saves, ["swap", "swap"])
        self.assertEqual(a.signals, ["KILL"])  # idle now: quickStop
        self.assertNoResult(background)
        self.assertEqual(w.spawned_models(), ["a", "b"])

    def test_a_child_a_reload_replaces_while_it_restores_gets_the_exit_command(self) -> None:
        """``after_start`` may still be reading a slot file into it."""
        restoring: Deferred[bool] = Deferred()

        @implementer(IModelHooks)
        class Restoring(NoHooks):
            def after_start(self, process: ModelView) -> Deferred[bool]:
                return restoring

        w = world(SPEAKS, timing=TIMING, hooks=lambda config, reactor: Restoring())
        waiting = w.scheduler.acquire("a")
        a = w.child("a")
        a.say(state("ready"), fd=1)
        self.assertNoResult(waiting)  # no lease while it restores
        w.reload(SPEAKS.replace("--model a", "--model a --ctx-size 4096"))
        self.assertEqual((a.stdin, a.signals), ([childproto.EXIT_COMMAND], []))
        restoring.callback(True)

    def test_a_child_that_exits_on_the_command_gets_no_signal(self) -> None:
        w, d = self.starting()
        a = self.ready_and_idle(w, d)
        stopped = w.process("a").stop()
        a.exit(0)  # as llama-server does on the exit command
        self.successResultOf(stopped)
        w.reactor.advance(TIMING.stop_timeout)
        self.assertEqual(a.signals, [])
        self.assertEqual(w.process("a").state, ModelState.STOPPED)

    def test_a_child_stopped_while_it_loads_gets_term_at_once(self) -> None:
        """llama-server would read the command only once loaded, and then lose it."""
        w, d = self.starting()
        w.child("a").say(loading(0.5), fd=1)
        w.process("a").stop()
        self.assertEqual(w.child("a").stdin, [])
        self.assertEqual(w.child("a").signals, ["TERM"])
        self.failureResultOf(d)

    def test_a_child_that_never_spoke_gets_term_at_once(self) -> None:
        w, d = self.starting()
        w.health.status[w.process("a").base_url] = 200
        w.reactor.advance(TIMING.poll_interval)
        self.successResultOf(d).release()
        w.process("a").stop()
        self.assertEqual(w.child("a").stdin, [])
        self.assertEqual(w.child("a").signals, ["TERM"])

    def test_cmd_stop_replaces_the_exit_command(self) -> None:
        stop = "childProtocol: on\n    cmdStop: kill -TERM ${PID}"
        text = SPEAKS.replace("childProtocol: on", stop)
        w, d = self.starting(text)
        w.child("a").say(state("ready"), fd=1)
        self.successResultOf(d).release()
        w.process("a").stop()
        self.assertEqual(w.child("a").stdin, [])
        self.assertEqual(w.reactor.spawned[-1].args[:2], ["kill", "-TERM"])
        w.reactor.spawned[-1].say("kill: sent")  # what cmdStop says is in the model's log
        self.assertEqual(w.logs.history("a")[-1], "[cmdStop] kill: sent")

    def test_no_message_starts_inside_a_line_cut_for_its_length(self) -> None:
        w, d = self.starting()
        a = w.child("a")
        # a long stdout line whose text a client chose, ending in a forged message
        a.proto.childDataReceived(1, b"x" * (MAX_LINE + 1))
        a.proto.childDataReceived(1, b"y" * 100 + b"\n" + b"z" * (MAX_LINE + 1))
        a.proto.childDataReceived(1, state("ready").encode() + b"\n")
        a.say("main: the next line is a line again", fd=1)
        self.assertNoResult(d)
        self.assertEqual(
            w.logs.history("a"),
            ["x" * MAX_LINE, "z" * MAX_LINE, "main: the next line is a line again"],
        )
        a.say(state("ready"), fd=1)
        self.successResultOf(d)

    def test_a_line_whose_handling_fails_leaves_the_pipe_read(self) -> None:
        heard: list[str] = []

        def on_line(stream: str, text: str) -> None:
            if text == "boom":
                raise RuntimeError("a bug in a line's handling")
            heard.append(text)

        reader = ChildProtocol(on_line, lambda reason: None)
        reader.attach()
        reader.childDataReceived(1, b"before\nboom\nafter\nrest")
        self.assertEqual(heard, ["before", "after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        reader.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(heard, ["before", "after", "rest"])

    def test_after_ready_messages_do_not_move_the_state(self) -> None:
        w, d = self.starting()
        a = self.ready_and_idle(w, d)
        a.say(state("sleeping"), fd=1)
        a.say(loading(0.5), fd=1)
        self.assertIs(w.process("a").state, ModelState.READY)
        self.assertIsNone(w.process("a").progress)
        self.assertEqual(w.logs.history("a"), [])


class HealthTests(SynchronousTestCase):
    """Servers that do not speak the protocol are asked over HTTP."""

    def test_a_miss_after_a_line_waits_for_the_next_poll(self) -> None:
        w = world(timing=TIMING)
        d = w.scheduler.acquire("b")
        url = w.process("b").base_url
        w.health.status[url] = 503
        w.child("b").say("main: model loaded")
        self.assertEqual(len(w.health.probes), 1)
        w.health.status[url] = 200
        w.reactor.advance(TIMING.poll_interval - 0.01)
        self.assertNoResult(d)
        w.reactor.advance(0.01)
        self.successResultOf(d)
        self.assertEqual(len(w.health.probes), 2)

    def test_lines_during_a_probe_ask_for_one_more_after_it(self) -> None:
        w = world(timing=TIMING)
        pending: list[Deferred[int]] = []

        def probe(url: str) -> Deferred[int]:
            pending.append(Deferred())
            return pending[-1]

        w.process("b")._probe_url = probe
        d = w.scheduler.acquire("b")
        for _ in range(5):
            w.child("b").say("load_tensors: ...")
        self.assertEqual(len(pending), 1)  # one at a time
        pending[0].callback(503)
        self.assertEqual(len(pending), 2)  # and one more for the lines it missed
        pending[1].callback(200)
        self.successResultOf(d)

    def test_a_percentage_in_a_loading_line_is_progress(self) -> None:
        w = world(timing=TIMING)
        w.scheduler.acquire("b")
        w.child("b").say("llama_model_load: progress 40%")
        w.child("b").say("sampled 99% of nothing")  # not about loading
        self.assertEqual(w.process("b").progress, 0.4)


class SettingTests(SynchronousTestCase):
    def test_auto_goes_by_the_executables_name(self) -> None:
        for name, expected in [
            ("/opt/llama.cpp/build/bin/llama-server", True),
            ("llama-server-cuda", True),
            ("LLAMA-SERVER.EXE", True),
            ("/usr/bin/python3", False),
            ("llama-server-wrapper/../vllm", False),
            ("my-llama-server", False),
        ]:
            self.assertEqual(childproto.speaks_protocol("auto", name), expected, name)
        self.assertTrue(childproto.speaks_protocol("on", "/usr/bin/python3"))
        self.assertFalse(childproto.speaks_protocol("off", "llama-server"))

    def test_the_key_accepts_auto_on_off_and_rejects_the_rest(self) -> None:
        base = "models:\n  m:\n    cmd: llama-server --port ${PORT}\n"
        self.assertEqual(parse_config(base).models["m"].child_protocol, "auto")
        for value, expected in [("on", "on"), ("off", "off"), ("'auto'", "auto")]:
            config = parse_config(base + f"    childProtocol: {value}\n")
            self.assertEqual(config.models["m"].child_protocol, expected)
        with self.assertRaises(ConfigError) as caught:
            parse_config(base + "    childProtocol: yes-please\n")
        self.assertIn("models.m.childProtocol", str(caught.exception))

    def test_progress_of_odd_payloads(self) -> None:
        self.assertIsNone(childproto.progress({"stage": "mmproj_model"}))
        self.assertIsNone(childproto.progress({"value": True}))
        self.assertIsNone(childproto.progress({"value": float("nan")}))
        self.assertEqual(childproto.progress({"value": 7}), (1.0, None))
        self.assertIsNone(childproto.progress({"value": 10**400}))  # no float holds it
        self.assertEqual(childproto.progress({"value": -float("inf")}), (0.0, None))
        with self.assertRaises(ValueError):
            childproto.parse(childproto.STATE_PREFIX + "[" * 100_000)
        self.assertEqual(
            childproto.progress({"value": 0.5, "current": "x", "stages": ["a"]}), (0.5, "x")
        )


SPEAKING_FAKE = f"""
sendLoadingState: true
models:
  talk:
    cmd: {FAKE} --load-time 0.4
    childProtocol: on
    quickStop: false
  quick:
    cmd: {FAKE}
    childProtocol: on
  other:
    cmd: {FAKE}
  wrapped:
    cmd: sh -c 'sleep 300 & {FAKE}; echo the wrapper outlived its server'
    childProtocol: on
"""


def progress_of(process: Any) -> list[float]:
    """The progress ``process`` will publish, as it comes."""
    seen: list[float] = []
    process.events.subscribe(lambda e: seen.append(e.progress) if isinstance(e, Progress) else None)
    return seen


class FakeChildTests(LiveTestCase):
    """The fake llama-server speaks the protocol as a real child process."""

    async def unloaded(self, api: Any, model: str) -> tuple[int, Exits]:
        """Unload ``model``; its pid, and how it ended."""
        process = api.scheduler.process(model)
        pid = process.pid
        assert pid is not None
        exits = Exits()
        process.watch(exits)
        await api.scheduler.unload([model])
        await self.eventually(lambda: _done(exits), "the exit was reported")
        return pid, exits

    async def test_ready_progress_and_a_clean_exit_on_the_command(self) -> None:
        api = await self.serve(SPEAKING_FAKE)
        process = api.scheduler.process("talk")
        seen = progress_of(process)
        reply = await self.chat("talk")
        self.assertEqual(reply.code, 200)
        self.assertEqual(seen, [0.0, 0.25, 0.5, 0.75, 1.0])
        self.assertFalse(any("cmd_child_to_router" in line for line in api.logs.history("talk")))
        pid, exits = await self.unloaded(api, "talk")
        self.assertEqual(exits.how, ["exited with code 0"])  # not killed: it took the command
        self.assertIn(
            "srv  operator(): exit command received, exiting...", api.logs.history("talk")
        )
        self.assertFalse(pid_alive(pid))

    async def test_an_idle_child_is_gone_at_once_with_quick_stop(self) -> None:
        api = await self.serve(SPEAKING_FAKE)
        process = api.scheduler.process("quick")
        self.assertEqual((await self.chat("quick")).code, 200)
        pid, exits = await self.unloaded(api, "quick")
        self.assertEqual(exits.how, ["killed by SIGKILL"])
        self.assertEqual(exits.failed, [False])  # a stop, not a crash
        self.assertFalse(pid_alive(pid))
        self.assertEqual(process.stuck, [])

    async def test_quick_stop_leaves_nothing_of_a_wrapper_that_does_not_exec(self) -> None:
        """SIGKILL goes to the child's whole process group: the server a shell runs
        (without exec), and a helper it left in the background, go with the shell."""
        api = await self.serve(SPEAKING_FAKE)
        self.assertEqual((await self.chat("wrapped")).code, 200)
        pid, exits = await self.unloaded(api, "wrapped")
        self.assertEqual(exits.how, ["killed by SIGKILL"])

        async def group_empty() -> bool:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            return False

        # its members die with the shell (SIGKILL's teardown may outlast the report)
        await self.eventually(group_empty, "what the shell ran is gone")
        self.assertNotIn("the wrapper outlived its server", api.logs.history("wrapped"))

    async def test_the_child_exits_when_its_stdin_closes(self) -> None:
        api = await self.serve(SPEAKING_FAKE)
        reply = await self.chat("talk")
        self.assertEqual(reply.code, 200)
        process = api.scheduler.process("talk")
        assert process._child is not None
        exits = Exits()
        process.watch(exits)
        process._child.transport.closeStdin()  # as when llamaswap dies
        await self.eventually(lambda: _done(exits), "the child exited")
        self.assertEqual(exits.how, ["exited with code 1"])

    async def test_a_plain_request_cut_by_an_unload_says_the_model_was_stopped(self) -> None:
        api = await self.serve(SPEAKING_FAKE)
        self.assertEqual((await self.chat("talk")).code, 200)
        # never answered by itself
        answer = Deferred.fromCoroutine(self.chat("talk", fake={"hold": True}))

        async def in_flight() -> bool:
            return api.scheduler.in_flight("talk") == 1

        await self.eventually(in_flight, "the request went out")
        await api.scheduler.unload(["talk"])
        reply = await answer
        self.assertEqual(reply.code, 502)
        self.assertIn("was stopped before it answered", reply.json()["error"]["message"])
        self.assertEqual(api.scheduler.in_flight("talk"), 0)

    async def test_a_stop_leaves_a_server_another_model_uses_carrying_its_request(self) -> None:
        """Two models relayed to one server (both ``proxy`` URLs lead to it): the stop
        of one cuts nothing the other sent, as that server does not exit."""
        server = FakeLlamaServer(clock=reactor, model="shared", load_time=0)
        server.start()
        site: Any = Site(server.resource())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        api = await self.serve(
            "groups:\n  both:\n    swap: false\n    members: [m, n]\n"
            "models:\n"
            f"  m:\n    cmd: sleep 60\n    proxy: {url}\n    checkEndpoint: none\n"
            f"  n:\n    cmd: sleep 60\n    proxy: {url}\n    checkEndpoint: none\n"
        )
        self.assertEqual((await self.chat("m")).code, 200)
        self.assertEqual((await self.chat("n")).code, 200)
        answer = Deferred.fromCoroutine(self.chat("n", fake={"tokens": 3, "delay": 0.5}))

        async def in_flight() -> bool:
            return api.scheduler.in_flight("n") == 1

        await self.eventually(in_flight, "n's request went out")
        await api.scheduler.unload(["m"])
        reply = await answer
        self.assertEqual(reply.code, 200, reply.json())

    async def test_a_child_blocked_writing_to_a_slow_client_exits_at_once(self) -> None:
        """Unloaded while its stream waits for a client that does not read: the
        child's HTTP thread is blocked in that write, so neither the exit command
        nor SIGTERM could end it (before: SIGKILL after ``unloadTimeout``).  llamaswap
        cuts its connection to the child as the stop begins: the write fails, the
        child takes the command, and the client, once it reads, gets an error event
        and the end of the stream."""
        api = await self.serve(
            f"models:\n  blocked:\n    cmd: {FAKE} --blocking-writes\n"
            "    childProtocol: on\n    unloadTimeout: 10\n"
        )
        messages = [{"role": "user", "content": "hi"}]
        endless = {"tokens": 100_000_000, "delay": 0}
        _, reader = await self.stream(
            {"model": "blocked", "stream": True, "messages": messages, "fake": endless}
        )
        await reader.until(b"data:")
        assert reader.transport is not None
        reader.transport.pauseProducing()  # type: ignore[attr-defined]
        process = api.scheduler.process("blocked")
        (supervisor,) = [s for s in self.service if isinstance(s, Supervisor)]
        opened = supervisor.endpoints._opened[(b"127.0.0.1", process.port or 0)]

        seen_held: list[bool] = []
        last: dict[str, object] = {}

        async def held_up() -> bool:
            """For good: llamaswap reads from the child only as its client reads,
            and the child waits in a write (the buffers between them may still
            grow a little: so, on ten checks in a row)."""
            busy = [p.transport for p in opened if getattr(p, "state", "") != "QUIESCENT"]  # type: ignore[attr-defined]
            answer = await treq.get(process.base_url + "/fake/stats", persistent=False, timeout=5)
            stats = await treq.json_content(answer)
            reading = [t in reactor.getReaders() for t in busy]
            held = bool(busy) and not any(reading)
            seen_held[:] = [*seen_held, True] if held and stats["blocked"] else []
            last.update(upstream_reading=reading, child_blocked=stats["blocked"])
            return len(seen_held) >= 10

        # normally within a second or two; bounded in seconds, not tries, so a slow
        # machine fails here, saying what it saw, rather than at the test's timeout
        await self.eventually(
            held_up, "the child's write waits for the client", within=20, seen=lambda: last
        )
        pid, exits = await self.unloaded(api, "blocked")
        self.assertEqual(exits.how, ["exited with code 0"])  # the command, not SIGKILL
        self.assertFalse(pid_alive(pid))
        self.assertEqual(api.scheduler.in_flight("blocked"), 0)  # the lease is back

        reader.transport.resumeProducing()  # type: ignore[attr-defined]
        try:
            await reader.done.addTimeout(10, reactor)
        except TimeoutError:
            self.fail("the client never got the end of its stream after the stop")
        events = [e for e in reader.text.split("\n\n") if e.strip()]
        self.assertEqual(events[-1], "data: [DONE]")
        self.assertIn('"upstream_disconnected"', events[-2])
        self.assertIn("was stopped in the middle of the answer", events[-2])

    async def test_a_child_s_hostile_protocol_lines_cost_nothing(self) -> None:
        """Lines no llama-server writes: each is dropped (or clamped), the start goes on."""
        huge = "1" + "0" * 400  # a JSON integer no float holds
        hostile = [
            state("loading", {"value": json.loads(huge)}),
            state("loading", {"value": -json.loads(huge), "stages": [], "current": "x"}),
            state("loading", {"value": "0.5"}),
            childproto.STATE_PREFIX + '{"state": "loading", "payload": {"value": NaN}}',
            childproto.STATE_PREFIX + '{"state": "loading", "payload": {"value": Infinity}}',
            state("hacked", {"model": "other"}),
            childproto.STATE_PREFIX + "\udcff\udcfe binary",
            childproto.STATE_PREFIX + "[" * 100_000,  # nested past the parser's recursion
        ]
        arguments = " ".join(f"--say-first {shlex.quote(line)}" for line in hostile)
        api = await self.serve(
            f"models:\n  talk:\n    cmd: {json.dumps(f'{FAKE} {arguments}')}\n"
            "    childProtocol: on\n"
        )
        process = api.scheduler.process("talk")
        seen = progress_of(process)
        reply = await self.chat("talk")
        self.assertEqual(reply.code, 200)
        self.assertIs(process.state, ModelState.READY)
        self.assertTrue(all(0.0 <= p <= 1.0 for p in seen), seen)
        self.assertEqual(seen[-1], 1.0)  # the child's own progress after the junk


@implementer(IModelWatcher)
class Exits:
    """Records how a process's children ended."""

    def __init__(self) -> None:
        self.how: list[str] = []
        self.failed: list[bool] = []

    def model_ready(self, process: ModelView) -> None:
        pass

    def model_exited(self, process: ModelView, how: str, failed: bool) -> None:
        self.how.append(how)
        self.failed.append(failed)


async def _done(exits: Exits) -> bool:
    return bool(exits.how)


REAL = """
models:
  smol:
    cmd: >-
      ${env.LLAMA_SERVER} --host 127.0.0.1 --port ${PORT} -m ${env.LLAMASWAP_MODEL}
      --threads 1 --ctx-size 512 --parallel 1 --no-webui
    quickStop: false
"""


class RealLlamaServerTests(LiveTestCase):
    """The real llama-server (``LLAMA_SERVER``, ``LLAMASWAP_MODEL``), recognised by name."""

    timeout = 120

    def setUp(self) -> None:
        if not (os.environ.get("LLAMA_SERVER") and os.environ.get("LLAMASWAP_MODEL")):
            raise SkipTest("LLAMA_SERVER and LLAMASWAP_MODEL are not set (make test sets them)")

    async def test_ready_by_the_protocol_progress_seen_clean_exit_on_the_command(self) -> None:
        api = await self.serve(REAL)
        process = api.scheduler.process("smol")
        events: list[Event] = []
        process.events.subscribe(events.append)
        exits = Exits()
        process.watch(exits)

        reply = await self.chat("smol", max_tokens=1)
        self.assertEqual(reply.code, 200, reply.body)
        self.assertTrue(process._watch.heard)  # it spoke the protocol
        progress = [e.progress for e in events if isinstance(e, Progress)]
        self.assertEqual(progress[-1], 1.0)
        self.assertEqual(progress, sorted(progress))
        log = api.logs.history("smol")
        self.assertFalse([line for line in log if "cmd_child_to_router" in line])
        self.assertNotIn("", log)  # nor the newline before each message

        pid = process.pid
        assert pid is not None
        await api.scheduler.unload(["smol"])
        await self.eventually(lambda: _done(exits), "the exit was reported")
        self.assertEqual(exits.how, ["exited with code 0"])  # it took the command: no signal
        self.assertTrue(any("exit command received" in line for line in api.logs.history("smol")))
        self.assertFalse(pid_alive(pid))
