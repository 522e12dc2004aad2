"""llama-server's router/child protocol: the child says itself when it is ready.

llama.cpp's router mode runs each model as a ``llama-server`` child with
``LLAMA_SERVER_ROUTER_PORT`` in its environment.  llama.cpp only checks that the
variable is *set* (``server_child::is_child``); the child never connects to that
port.  llamaswap sets it to ``0``, where nothing listens, so should a later
llama-server call back, it reaches nobody rather than llamaswap.  Such a child:

* prints ``cmd_child_to_router:state:{"payload": ..., "state": ...}`` lines on
  **stdout**, each after a newline of its own (``notify_to_router``): ``loading``
  with ``{"stages": [...], "current": stage, "value": 0..1}`` while the weights load
  (the first and last sample, at most one per 200 ms between), ``ready`` with the
  model's info once its HTTP server answers (``/health`` is already 200), and
  ``sleeping`` when ``--sleep-idle-seconds`` unloads it (a wake-up sends
  ``loading`` and an empty ``ready`` again);
* reads **stdin**: ``cmd_router_to_child:exit`` shuts it down cleanly (exit code 0),
  and end-of-file (its router is gone) ends it at once with exit code 1.  The
  command is read from just before ``ready``, but a shutdown requested before the
  server's main loop runs (a moment after ``ready``) is lost (llama.cpp 0.3.36's
  ``server_queue::start_loop`` sets ``running = true`` over it): hence SIGTERM a
  moment later, and SIGTERM alone for a child stopped while it loads.

Only stdout is read for these lines: a prompt echoed in a verbose log (stderr)
cannot make a model "ready".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs

from .logs import logger
from .readiness import HealthWatch, Progress, Ready

ROUTER_PORT_ENV = "LLAMA_SERVER_ROUTER_PORT"
ROUTER_PORT = "0"
STATE_PREFIX = "cmd_child_to_router:state:"
EXIT_COMMAND = b"cmd_router_to_child:exit\n"
# llama-server, llama-server.exe, llama-server-cuda, ...
EXECUTABLE = re.compile(r"llama-server(?:[-_.][\w.-]*)?", re.I)

log = logger()


def speaks_protocol(setting: str, executable: str) -> bool:
    """``childProtocol``: ``on``, ``off``, or ``auto`` (by the executable's name)."""
    if setting == "auto":
        return EXECUTABLE.fullmatch(os.path.basename(executable)) is not None
    return setting == "on"


@attrs.frozen
class ChildState:
    """One ``cmd_child_to_router:state:`` message."""

    state: str
    payload: Mapping[str, Any]


def parse(line: str) -> ChildState | None:
    """The message on ``line``; None for a log line.  Raises ValueError if garbled."""
    if not line.startswith(STATE_PREFIX):
        return None
    try:
        document = json.loads(line[len(STATE_PREFIX) :])
    except RecursionError as e:  # "[[[[...": not a ValueError
        raise ValueError("nested too deeply") from e
    if not isinstance(document, dict) or not isinstance(document.get("state"), str):
        raise ValueError("expected {'state': ..., 'payload': ...}")
    payload = document.get("payload")
    return ChildState(document["state"], payload if isinstance(payload, dict) else {})


def progress(payload: Mapping[str, Any]) -> tuple[float, str | None] | None:
    """The whole load's progress (0..1) from a ``loading`` payload, and its stage.

    The stages (text model, draft model, projector) load one after the other, so
    each counts for an equal share.
    """
    value = payload.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool) or value != value:
        return None
    try:
        fraction = min(max(float(value), 0.0), 1.0)
    except OverflowError:  # a JSON integer no float holds
        return None
    stage = payload.get("current")
    stage = stage if isinstance(stage, str) else None
    stages = payload.get("stages")
    if isinstance(stages, list) and stages and stage in stages:
        fraction = (stages.index(stage) + fraction) / len(stages)
    return fraction, stage


class ProtocolWatch:
    """A llama-server child: ready when it says ``ready``, progress from ``loading``.

    Until the child has said anything, ``fallback`` (a health check) keeps running:
    a llama-server older than router mode ignores the variable and never speaks.
    """

    talks = True

    def __init__(
        self, *, model: str, ready: Ready, progress: Progress, fallback: HealthWatch | None
    ) -> None:
        self._model = model
        self._ready = ready
        self._progress = progress
        self._fallback = fallback
        self.heard = False  # it has spoken the protocol
        self._done = False

    def begin(self) -> None:
        if self._fallback is not None:
            self._fallback.begin()

    def line(self, stream: str, text: str) -> bool:
        message = None
        if stream == "stdout":
            if not text:
                return True  # the newline the child writes before each message
            try:
                message = parse(text)
            except ValueError as e:
                log.warn(
                    "model {model}: garbled child protocol line ({error}): {line!r}",
                    model=self._model,
                    error=e,
                    line=text[:200],
                )
                return True
        if message is None:
            if not self.heard and self._fallback is not None:
                self._fallback.line(stream, text)
            return False
        self._heard(message)
        return True

    def _heard(self, message: ChildState) -> None:
        if not self.heard:
            self.heard = True
            if self._fallback is not None:
                self._fallback.cancel()  # it speaks: no more polling
        if self._done:
            self._heard_later(message)
            return
        if message.state == "loading":
            seen = progress(message.payload)
            if seen is not None:
                self._progress(*seen)
        elif message.state == "ready":
            self._done = True
            self._ready()

    def _heard_later(self, message: ChildState) -> None:
        """After the start: a child that sleeps (``--sleep-idle-seconds``) says so."""
        if message.state == "sleeping":
            log.info("model {model} is sleeping (its weights are unloaded)", model=self._model)
        elif message.state == "ready":
            log.info("model {model} is awake", model=self._model)

    def cancel(self) -> None:
        self._done = True
        if self._fallback is not None:
            self._fallback.cancel()
