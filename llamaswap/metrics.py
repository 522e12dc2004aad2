"""Prometheus metrics, fed by the event bus and read from the scheduler at scrape time.

Every ``model`` label is a configured model id (or ``<peer>/<model>``), every
other label a small fixed set, so the number of series is bounded by the config.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import Event, EventBus
from .process import ModelState
from .scheduler import Scheduler

LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
SPEED_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 800, 1600, 3200)


class Metrics:
    """Owns a registry of its own (not the process-global one)."""

    def __init__(self, scheduler: Scheduler, events: EventBus) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.swaps = Counter("llamaswap_swaps_total", "Swaps by outcome", ["outcome"], registry=r)
        self.swap_seconds = Histogram(
            "llamaswap_swap_seconds",
            "Swap duration: drain, stop, start",
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        r.register(_LiveState(scheduler))
        events.subscribe(self.on_event)

    def on_event(self, event: Event) -> None:
        data = event.data
        if event.kind == "model":
            self._model_event(data)
        elif event.kind == "swap":
            self.swaps.labels("ok" if data["ok"] else "failed").inc()
            self.swap_seconds.observe(data["seconds"])
        elif event.kind == "activity":
            self._activity(data)

    def _model_event(self, data: dict[str, Any]) -> None:
        model, state = data["id"], data["state"]
        if state == ModelState.STARTING.value:
            self.starts.labels(model).inc()
        elif state == ModelState.READY.value:
            self.start_seconds.labels(model).observe(data["start_seconds"])
        elif state == ModelState.FAILED.value:
            self.start_failures.labels(model, data.get("cause", "exit")).inc()
        elif state == ModelState.STOPPED.value and "reason" in data:
            self.stops.labels(model, data["reason"]).inc()

    def _activity(self, row: dict[str, Any]) -> None:
        model = row["model"]
        self.requests.labels(model, row["route"], str(row["status"])).inc()
        self.queue_wait.labels(model).observe(row["queue_ms"] / 1000)
        if row.get("tokens_in"):
            self.prompt_tokens.labels(model).inc(row["tokens_in"])
        if row.get("tokens_out"):
            self.completion_tokens.labels(model).inc(row["tokens_out"])
        if row.get("prompt_tps"):
            self.prompt_speed.labels(model).observe(row["prompt_tps"])
        if row.get("gen_tps"):
            self.generation_speed.labels(model).observe(row["gen_tps"])


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
