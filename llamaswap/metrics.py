"""Prometheus metrics, fed by the event bus and read from the scheduler at scrape time.

Every ``model`` label is a configured model id (or ``<peer>/<model>``), every
other label a small fixed set, so the number of series is bounded by the config.

A scrape also asks every ready child for its own ``GET /metrics`` (llama-server's
``llamacpp:*``, served when it runs with ``--metrics``) and appends those samples,
each labelled with the child's ``model``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar, cast

import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from .events import Activity, Event, EventBus, ModelChanged, Swapped
from .lifecycle import ModelState
from .logs import logger
from .relay import CappedBody, Hop
from .scheduler import Scheduler

LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
SPEED_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 800, 1600, 3200)

M = TypeVar("M", Counter, Histogram)


class Children(Generic[M]):
    """The series of a labelled metric, each looked up once per label values.

    ``labels()`` checks and joins its arguments and takes a lock on every call; a
    request touches up to nine series, all named by values from the config (model
    ids, route paths, key names) or a status code, so the set stays small.  A series
    appears on its first use, as with ``labels()``."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._series: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = self.metric.labels(*values)
        return series


class Metrics:
    """Owns a registry of its own (not the process-global one)."""

    def __init__(
        self, scheduler: Scheduler, events: EventBus, children: ChildMetrics | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.children = children
        if children is not None:
            r.register(children.failures)
        self.starts = Counter("llamaswap_model_starts_total", "Model starts", ["model"], registry=r)
        self.start_seconds = Histogram(
            "llamaswap_model_start_seconds",
            "Time from spawn to ready",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.start_failures = Counter(
            "llamaswap_model_start_failures_total",
            "Starts that did not become ready, by cause (exit, timeout, spawn)",
            ["model", "cause"],
            registry=r,
        )
        self.stops = Counter(
            "llamaswap_model_stops_total",
            "Model stops by reason (swap, ttl, manual, crash, shutdown)",
            ["model", "reason"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "llamaswap_queue_wait_seconds",
            "Time a request waited for its model",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "llamaswap_requests_total",
            "Proxied requests by route and status",
            ["model", "route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "llamaswap_prompt_tokens_total", "Prompt tokens", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "llamaswap_completion_tokens_total", "Generated tokens", ["model"], registry=r
        )
        self.prompt_speed = Histogram(
            "llamaswap_prompt_tokens_per_second",
            "Prompt processing speed reported by the model",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=r,
        )
        self.generation_speed = Histogram(
            "llamaswap_generation_tokens_per_second",
            "Generation speed reported by the model",
            ["model"],
            buckets=SPEED_BUCKETS,
            registry=r,
        )
        # per API key name (a small set, from the config): who used which model how much
        self.key_requests = Counter(
            "llamaswap_key_requests_total",
            "Proxied requests by API key name, model and status",
            ["key", "model", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "llamaswap_key_tokens_total",
            "Tokens by API key name, model and kind (prompt, completion)",
            ["key", "model", "kind"],
            registry=r,
        )
        self.swaps = Counter("llamaswap_swaps_total", "Swaps by outcome", ["outcome"], registry=r)
        self.swap_seconds = Histogram(
            "llamaswap_swap_seconds",
            "Swap duration: drain, stop, start",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self._series = _RequestSeries.of(self)
        r.register(_LiveState(scheduler))
        events.subscribe(self.on_event, (ModelChanged, Swapped, Activity))

    async def exposition(self) -> bytes:
        """The text for ``GET /metrics``: llamaswap's own, then the children's."""
        children = b"" if self.children is None else await self.children.text()
        # after the children were asked, so this scrape's failures are in it
        return generate_latest(self.registry) + children

    def on_event(self, event: Event) -> None:
        if isinstance(event, ModelChanged):
            self._model_event(event)
        elif isinstance(event, Swapped):
            self.swaps.labels("ok" if event.ok else "failed").inc()
            self.swap_seconds.observe(event.seconds)
        elif isinstance(event, Activity):
            self._activity(event.row)

    def _model_event(self, event: ModelChanged) -> None:
        model, state = event.id, event.state
        if state is ModelState.STARTING:
            self.starts.labels(model).inc()
        elif state is ModelState.READY and event.start_seconds is not None:
            self.start_seconds.labels(model).observe(event.start_seconds)
        elif state is ModelState.FAILED:
            self.start_failures.labels(model, event.cause or "exit").inc()
        elif state is ModelState.STOPPED and event.reason is not None:
            self.stops.labels(model, event.reason).inc()

    def _activity(self, row: Mapping[str, Any]) -> None:
        series = self._series
        model = row["model"]
        status = str(row["status"])
        series.requests(model, row["route"], status).inc()
        series.queue_wait(model).observe(row["queue_ms"] / 1000)
        if row.get("tokens_in"):
            series.prompt_tokens(model).inc(row["tokens_in"])
        if row.get("tokens_out"):
            series.completion_tokens(model).inc(row["tokens_out"])
        if row.get("prompt_tps"):
            series.prompt_speed(model).observe(row["prompt_tps"])
        if row.get("gen_tps"):
            series.generation_speed(model).observe(row["gen_tps"])
        key = row.get("key")
        if key is not None:
            series.key_requests(key, model, status).inc()
            for kind, field in (("prompt", "tokens_in"), ("completion", "tokens_out")):
                if row.get(field):
                    series.key_tokens(key, model, kind).inc(row[field])


@attrs.frozen
class _RequestSeries:
    """The per-request metrics' series, by label values (see :class:`Children`)."""

    requests: Children[Counter]
    queue_wait: Children[Histogram]
    prompt_tokens: Children[Counter]
    completion_tokens: Children[Counter]
    prompt_speed: Children[Histogram]
    generation_speed: Children[Histogram]
    key_requests: Children[Counter]
    key_tokens: Children[Counter]

    @classmethod
    def of(cls, metrics: Metrics) -> _RequestSeries:
        return cls(
            **{field.name: Children(getattr(metrics, field.name)) for field in attrs.fields(cls)}
        )


class _LiveState(Collector):
    """Gauges read from the scheduler when scraped: state, in flight, queued."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "llamaswap_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        load = GaugeMetricFamily(
            "llamaswap_model_load_seconds_estimate",
            "Learned time to start (moving average of measured starts)",
            labels=["model"],
        )
        memory = GaugeMetricFamily(
            "llamaswap_model_memory_bytes",
            "Measured memory of each running model, by resource",
            labels=["model", "resource"],
        )
        in_flight = GaugeMetricFamily(
            "llamaswap_in_flight_requests", "Requests being served", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "llamaswap_queued_requests", "Requests waiting for the model", labels=["model"]
        )
        stuck = GaugeMetricFamily(
            "llamaswap_stuck_processes",
            "Earlier children of a model that would not go (survived SIGKILL, or left "
            "their group holding the output); their ports stay reserved",
            labels=["model"],
        )
        progress = GaugeMetricFamily(
            "llamaswap_model_load_progress",
            "How far each starting model's load got (0..1), as its server reports it",
            labels=["model"],
        )
        for model_id, process in sorted(self.scheduler.processes.items()):
            for candidate in ModelState:
                state.add_metric(
                    [model_id, candidate.value], 1 if process.state is candidate else 0
                )
            in_flight.add_metric([model_id], self.scheduler.in_flight(model_id))
            if process.load_seconds is not None:
                load.add_metric([model_id], process.load_seconds)
            footprint = self.scheduler.footprint(model_id)
            if footprint is not None and process.pid is not None:
                for resource, value in footprint.measured.items():
                    memory.add_metric([model_id, resource], value)
            queued.add_metric([model_id], self.scheduler.queued(model_id))
            stuck.add_metric([model_id], len(process.stuck))
            if process.progress is not None:
                progress.add_metric([model_id], process.progress)
        yield state
        yield load
        yield memory
        yield in_flight
        yield queued
        yield stuck
        yield progress


# --- the children's own metrics ----------------------------------------------------

#: How long a child may take to answer ``GET /metrics`` before it is skipped.
SCRAPE_TIMEOUT = 2.0
#: A child's metrics text larger than this is skipped (llama-server's is ~3 KB).
MAX_CHILD_METRICS_BYTES = 1_000_000
#: Statuses of a child that serves no metrics: skipped without counting.
#: llama-server answers 501 unless started with ``--metrics``; other servers 404.
NO_METRICS = frozenset({404, 501})


class ScrapeFailed(Exception):
    """A child that was asked for its metrics and did not give them."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChildMetrics:
    """Asks every ready child for its own metrics, all at once, each with a timeout.

    Concurrent scrapes of llamaswap share one round of asking, so however often
    ``/metrics`` is asked, each child gets at most one metrics request at a time.
    """

    log = logger()

    def __init__(
        self,
        scheduler: Scheduler,
        agent: IAgent,
        clock: IReactorTime,
        hop: Hop,
        timeout: float = SCRAPE_TIMEOUT,
    ) -> None:
        self.scheduler = scheduler
        self.agent = agent
        self.clock = clock
        self.hop = hop
        self.timeout = timeout
        self.failures = Counter(
            "llamaswap_child_metrics_failures_total",
            "Ready children that did not give their metrics when asked "
            "(timeout, error, status, too_large)",
            ["model", "reason"],
            registry=None,
        )
        self._round: Deferred[bytes] | None = None
        self._waiters: list[Deferred[bytes]] = []

    def text(self) -> Deferred[bytes]:
        """The children's samples, relabelled and merged (joins a round in progress)."""
        waiter: Deferred[bytes] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        if self._round is None:
            self._round = Deferred.fromCoroutine(self._ask_all())
            self._round.addBoth(self._deliver)
        return waiter

    def _deliver(self, result: bytes | Failure) -> None:
        self._round = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _ask_all(self) -> bytes:
        ready = [
            (model_id, process.base_url)
            for model_id, process in sorted(self.scheduler.processes.items())
            if process.state is ModelState.READY
        ]
        asked = [
            Deferred.fromCoroutine(self._ask(url + "/metrics")).addTimeout(
                self.timeout, self.clock, onTimeoutCancel=_timed_out
            )
            for _, url in ready
        ]
        answers = await DeferredList(asked, consumeErrors=True)
        texts: dict[str, bytes] = {}
        for (model_id, url), (_, answer) in zip(ready, answers, strict=True):
            outcome = cast(bytes | Failure | None, answer)  # a failure when not ok
            if not isinstance(outcome, Failure):
                if outcome is not None:
                    texts[model_id] = outcome
                continue
            process = self.scheduler.processes.get(model_id)
            if process is None or process.state is not ModelState.READY:
                continue  # it stopped meanwhile: nothing to report
            reason = _failure_reason(outcome)
            self.failures.labels(model_id, reason).inc()
            self.log.debug(
                "{model}: no metrics from {url}/metrics ({reason})",
                model=model_id,
                url=url,
                reason=outcome.getErrorMessage() or reason,
            )
        return merge_child_metrics(texts)

    async def _ask(self, url: str) -> bytes | None:
        headers = Headers()
        self.hop.mark(headers)  # a child URL leading back here gets a 508, not a loop
        response: IResponse = await self.agent.request(b"GET", url.encode("ascii"), headers)
        body = CappedBody(MAX_CHILD_METRICS_BYTES, lambda: ScrapeFailed("too_large"))
        response.deliverBody(body)
        text = await body.done  # read to the end, so the connection can be reused
        if response.code == 200:
            return text
        if response.code in NO_METRICS:
            return None
        raise ScrapeFailed("status")


def _timed_out(result: object, timeout: float) -> None:
    """Whatever the cancelled request ended with, it is a timeout."""
    raise ScrapeFailed("timeout")


def _failure_reason(failure: Failure) -> str:
    return failure.value.reason if isinstance(failure.value, ScrapeFailed) else "error"


# --- merging texts in the Prometheus text format (version 0.0.4) -------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_META = re.compile(rf"#[ \t]+(HELP|TYPE)[ \t]+({_NAME})(?:[ \t]+(.*))?$")
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})?[ \t]+(\S+)(?:[ \t]+(-?[0-9]+))?[ \t]*$")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*(,|$)')
_VALUE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?Inf|NaN")
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
#: names llamaswap's own families use; a child's are never allowed to mix in
OWN_PREFIX = "llamaswap_"


@attrs.define
class _Family:
    name: str
    help: str | None = None
    type: str | None = None
    samples: list[str] = attrs.Factory(list)

    def has(self, sample: str) -> bool:
        if sample == self.name:
            return True
        return any(sample == self.name + s for s in _SUFFIXES.get(self.type or "", ()))


def merge_child_metrics(texts: dict[str, bytes]) -> bytes:
    """Every child's samples with ``model="<id>"`` added, grouped by family.

    Each family gets one HELP and one TYPE (the first child's), followed by the
    samples of all children, so the result stays valid text format.  Lines that
    do not parse, families typed differently by another child, repeated series,
    and families named like llamaswap's own are dropped.
    """
    families: dict[str, _Family] = {}
    seen: set[str] = set()
    for model_id, raw in texts.items():
        _merge_one(families, seen, _escape(model_id), raw.decode("utf-8", errors="replace"))
    return "".join(_render(f) for f in families.values() if f.samples).encode("utf-8")


def _merge_one(families: dict[str, _Family], seen: set[str], model: str, text: str) -> None:
    current: _Family | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            meta = _META.match(line)
            if meta is not None:
                current = _declare(families, *meta.groups())
            continue
        sample = _SAMPLE.match(line)
        if sample is None:
            continue
        name, labels, value, timestamp = sample.groups()
        if current is None or not current.has(name):
            current = _declare(families, "TYPE", name, None)
        if current is None or _VALUE.fullmatch(value) is None:
            continue
        relabelled = _relabel(model, labels or "")
        if relabelled is None:
            continue
        series = f"{name}{{{relabelled}}}"
        if series in seen:
            continue
        seen.add(series)
        current.samples.append(f"{series} {value}" + (f" {timestamp}" if timestamp else ""))


def _declare(
    families: dict[str, _Family], kind: str, name: str, text: str | None
) -> _Family | None:
    """The family a HELP or TYPE line (or an undeclared sample) opens, if acceptable."""
    if name.startswith(OWN_PREFIX):
        return None
    family = families.setdefault(name, _Family(name))
    if kind == "HELP":
        if family.help is None:
            family.help = text or ""
        return family
    declared = (text or "untyped").strip()
    if declared not in _TYPES:
        declared = "untyped"
    if family.type is None and not family.samples:
        family.type = declared
    elif (family.type or "untyped") != declared:
        return None  # another child typed it differently: its samples would not fit
    return family


def _relabel(model: str, labels: str) -> str | None:
    """``labels`` (the text between braces) with ``model`` first; None if malformed.

    A label name given twice (``model`` and ``exported_model`` alike, once renamed)
    fails a Prometheus scrape as a whole, and ``__name__`` and the other reserved
    ``__`` names would name another series: such a sample is dropped.
    """
    pairs = [f'model="{model}"']
    names = {"model"}
    position = 0
    while position < len(labels):
        label = _LABEL.match(labels, position)
        if label is None or label.end() == position:
            return None
        name, value, _ = label.groups()
        name = "exported_model" if name == "model" else name
        if name in names or name.startswith("__"):
            return None
        names.add(name)
        pairs.append(f'{name}="{value}"')
        position = label.end()
    return ",".join(pairs)


def _render(family: _Family) -> str:
    head = ""
    if family.help is not None:
        head += f"# HELP {family.name} {family.help}\n"
    if family.type is not None and family.type != "untyped":
        head += f"# TYPE {family.name} {family.type}\n"
    return head + "".join(sample + "\n" for sample in family.samples)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
