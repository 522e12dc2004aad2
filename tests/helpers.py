"""Shared builders for the in-memory tests."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from llamaswap.access import Access
from llamaswap.api import Api
from llamaswap.config import Config, ModelConfig, parse_config
from llamaswap.events import EventBus
from llamaswap.logs import LogHub
from llamaswap.ports import PortAllocator
from llamaswap.process import ModelProcess, Timing
from llamaswap.recorder import Recorder
from llamaswap.relay import Relay
from llamaswap.scheduler import IModelHooks, NoHooks, Scheduler
from llamaswap.testing.fakes import FakeHealth, FakeProcess, FakeProcessReactor


def next_request(buffer: bytes) -> tuple[bytes, bytes] | None:
    """The first whole HTTP/1.1 request in ``buffer`` (its head and its Content-Length
    or chunked body) and what follows it; None while it is incomplete."""
    head, found, rest = buffer.partition(b"\r\n\r\n")
    if not found:
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        if line.lower() == b"transfer-encoding: chunked":  # it ends at the last chunk
            end = rest.find(b"0\r\n\r\n")
            length = end + 5 if end >= 0 else len(rest) + 1
    if len(rest) < length:
        return None
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def notices_of(config: Config) -> tuple[str, ...]:
    """The load's notices but those saying a command is not installed (the tests'
    commands are made up, or not on the test's PATH)."""
    return tuple(n for n in config.notices if "command not found" not in n)


# arrival order, explicitly: the tests built on it assert fifo's swaps
TWO_MODELS = """
scheduler:
  policy: fifo
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
  c:
    cmd: sleep --port ${PORT} --model c
    ttl: 30
"""


@attrs.define
class World:
    """A scheduler over fake children, a fake clock and scripted health answers."""

    config: Config
    reactor: FakeProcessReactor
    health: FakeHealth
    logs: LogHub
    events: EventBus
    scheduler: Scheduler
    ports: PortAllocator
    make_process: Callable[[ModelConfig], ModelProcess]  # as a reload makes them
    busy_ports: set[int] = attrs.field(factory=set)  # ports something else listens on
    spares: list[str] = attrs.field(factory=list)  # URLs a spare connection was opened to

    def process(self, model_id: str) -> ModelProcess:
        return self.scheduler.process(model_id)

    def api(self, relay: Relay) -> Api:
        """The HTTP application over this world, wired as ``tap.build`` wires it."""
        recorder = Recorder(self.reactor, self.events)
        access = Access(self.config.api_keys, self.reactor, self.config.session_ttl)
        return Api(
            self.config,
            self.scheduler,
            relay,
            self.logs,
            self.reactor,
            self.events,
            recorder,
            access=access,
        )

    def reload(self, text: str) -> dict[str, list[str]]:
        """Adopt a new configuration as a live reload does (``tap.build``)."""
        self.config = parse_config(text, "test.yaml")
        return self.scheduler.reconfigure(self.config, self.make_process)

    def child(self, model_id: str) -> FakeProcess:
        """The newest spawned child of ``model_id``."""
        for spawned in reversed(self.reactor.spawned):
            if f"--model {model_id}" in " ".join(spawned.args):
                return spawned
        raise AssertionError(f"{model_id} was never spawned")

    def spawned_models(self) -> list[str]:
        return [p.args[p.args.index("--model") + 1] for p in self.reactor.spawned]

    def make_ready(self, model_id: str) -> None:
        """The child finishes loading: health says 200 and it prints a line."""
        process = self.process(model_id)
        self.health.status[process.base_url] = 200
        self.child(model_id).say("main: server is listening")


def world(
    text: str = TWO_MODELS,
    timing: Timing | None = None,
    hooks: Callable[[Config, FakeProcessReactor], IModelHooks] | None = None,
) -> World:
    config = parse_config(text, "test.yaml")
    reactor = FakeProcessReactor()
    health = FakeHealth()
    logs = LogHub()
    events = EventBus()
    busy_ports: set[int] = set()
    spares: list[str] = []
    ports = PortAllocator(config.start_port, is_free=lambda port: port not in busy_ports)

    def make_process(model: ModelConfig) -> ModelProcess:
        return ModelProcess(
            model,
            reactor=reactor,
            clock=reactor,
            logs=logs,
            ports=ports,
            probe=health,
            timing=timing
            or Timing(
                health_timeout=config.health_check_timeout, stop_timeout=model.unload_timeout
            ),
            base_env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
            process_groups=False,
            events=events,
            open_spare=spares.append,
        )

    processes = [make_process(model) for model in config.models.values()]
    scheduler = Scheduler(
        processes,
        reactor,
        config,
        events,
        hooks(config, reactor) if hooks is not None else NoHooks(),
    )
    return World(
        config, reactor, health, logs, events, scheduler, ports, make_process, busy_ports, spares
    )
