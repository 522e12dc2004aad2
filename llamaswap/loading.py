"""Loading progress for streaming chat clients (``sendLoadingState``).

A chat client that asked for a stream gets ``200 text/event-stream`` at once and,
while its model is queued or loading, ``reasoning_content`` deltas saying where it
stands: its place in the queue, the model being started, the time spent, and the
load's progress as its process reports it (``progress`` events: llama-server's
child protocol, or a percentage in another server's log).  The model's own stream
then continues on the same response.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.server import Request

from .errors import ApiError
from .events import Event, EventBus, Progress
from .eventstream import begin_event_stream, data_event, end_event_stream
from .lifecycle import ModelState
from .origin import not_ours
from .scheduler import Lease, Scheduler

TICK = 1.0


class LoadingStream:
    """Writes progress deltas to one waiting client until its lease arrives."""

    def __init__(
        self,
        request: Request,
        *,
        model_id: str,
        requested: str,
        scheduler: Scheduler,
        events: EventBus,
        clock: IReactorTime,
    ) -> None:
        self.request = request
        self.events = events
        self.model_id = model_id
        self.requested = requested
        self.scheduler = scheduler
        self.clock = clock
        self.started = clock.seconds()
        self._tick: IDelayedCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._last_position: int | None = None
        self._last_state: ModelState | None = None
        self._last_percent = -1

    def begin(self, waiting: Deferred[Lease]) -> None:
        """Answer 200 now and report until :meth:`end`."""
        self.waiting = waiting
        self.request.setResponseCode(200)
        begin_event_stream(self.request)
        not_ours(self.request.responseHeaders)  # the rest of the body is the server's
        self.say(f"llamaswap: {self.model_id} is not loaded yet.\n")
        self._report()
        self._unsubscribe = self.events.subscribe(self._progress, (Progress,))

    def say(self, text: str) -> None:
        delta = {"role": "assistant", "reasoning_content": text}
        self.request.write(
            data_event(
                {
                    "id": "llamaswap-loading",
                    "object": "chat.completion.chunk",
                    "created": int(self.clock.seconds()),
                    "model": self.requested,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                }
            )
        )

    def _report(self) -> None:
        self._tick = None
        position = self.scheduler.position(self.waiting)
        state = self.scheduler.view(self.model_id).state
        elapsed = self.clock.seconds() - self.started
        if position is not None and position > 1 and position != self._last_position:
            self.say(f"Queue position: #{position} ({position - 1} ahead of this request).\n")
        elif state is not self._last_state and state is ModelState.STARTING:
            self.say(f"Starting {self.model_id}...\n")
        elif self._last_position is not None or self._last_state is not None:
            self.say(f"... {elapsed:.0f}s\n")
        self._last_position, self._last_state = position, state
        self._tick = self.clock.callLater(TICK, self._report)

    def _progress(self, event: Event) -> None:
        if not isinstance(event, Progress) or event.id != self.model_id:
            return
        percent = int(event.progress * 100)
        if percent > self._last_percent:
            self._last_percent = percent
            self.say(f"Loading {self.model_id}: {percent}%\n")

    def stop(self) -> None:
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def end(self) -> None:
        """The model is ready: one last line, then its own stream follows."""
        self.stop()
        elapsed = self.clock.seconds() - self.started
        self.say(f"{self.model_id} is ready after {elapsed:.1f}s.\n\n")

    def fail(self, error: Exception) -> None:
        """The start failed: an error event, then the end of the stream."""
        self.stop()
        api_error = (
            error
            if isinstance(error, ApiError)
            else ApiError(503, str(error), "model_start_failed")
        )
        end_event_stream(self.request, api_error.body())
