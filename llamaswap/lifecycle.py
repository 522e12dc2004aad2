"""A model process as the rest of llamaswap sees it.

:class:`~llamaswap.process.ModelProcess` owns a child; everything else gets one of
two narrower things:

- the scheduler, which must act when a model becomes ready or its process ends,
  is an :class:`IModelWatcher` that each process calls directly (never through the
  event bus, which only carries observations);
- everyone who only looks (the API, metrics, the recorder, loading progress, the
  KV store) gets a :class:`ModelView`, which has no way to start or stop anything.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

from zope.interface import Interface

from .config import ModelConfig


class ModelState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


class StuckView(Protocol):
    """An earlier child of a model that would not go (read-only)."""

    @property
    def live_pid(self) -> int | None: ...
    @property
    def group(self) -> int | None: ...
    @property
    def port(self) -> int | None: ...
    @property
    def stuck_since(self) -> float | None: ...
    @property
    def why(self) -> str: ...


class ModelView(Protocol):
    """What may be read of a model's process, and nothing that changes it."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> ModelConfig: ...
    @property
    def state(self) -> ModelState: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def port(self) -> int | None: ...
    @property
    def base_url(self) -> str: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def started_at(self) -> float | None: ...
    @property
    def ready_at(self) -> float | None: ...
    @property
    def load_seconds(self) -> float | None: ...
    @property
    def stop_seconds(self) -> float | None: ...
    @property
    def progress(self) -> float | None: ...
    @property
    def stuck(self) -> Sequence[StuckView]: ...


class IModelWatcher(Interface):
    """Told by a model process what the scheduler must act on, as it happens."""

    def model_ready(process: ModelView) -> None:
        """``process`` became ready (called before anyone waiting for its start)."""

    def model_exited(process: ModelView, how: str, failed: bool) -> None:
        """The child of ``process`` is gone (``how``: its exit in words).

        ``failed``: it crashed while serving, or its start failed.  Not called for a
        start that never spawned a child (command not found, no free port).
        """
