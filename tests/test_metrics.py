"""The per-request metrics, fed by Activity events, in memory."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.events import Activity
from llamaswap.metrics import Metrics

from .helpers import world
from .test_observability import metric


def row(**fields: Any) -> dict[str, Any]:
    return {
        "model": "a",
        "route": "/v1/chat/completions",
        "status": 200,
        "queue_ms": 2.0,
        "key": None,
        **fields,
    }


class RequestSeriesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = world()
        self.metrics = Metrics(self.world.scheduler, self.world.events)

    def text(self) -> str:
        return generate_latest(self.metrics.registry).decode()

    def test_each_request_counts_in_its_own_series(self) -> None:
        for fields in (
            {"tokens_out": 3},
            {"tokens_out": 4, "key": "ci"},
            {"status": 500, "key": "ci"},
            {"model": "b", "tokens_in": 5},
        ):
            self.world.events.publish(Activity(row(**fields)))
        text = self.text()
        chat = {"model": "a", "route": "/v1/chat/completions"}
        expected = [
            ("llamaswap_requests_total", {**chat, "status": "200"}, 2),
            ("llamaswap_requests_total", {**chat, "status": "500"}, 1),
            ("llamaswap_completion_tokens_total", {"model": "a"}, 7),
            ("llamaswap_prompt_tokens_total", {"model": "b"}, 5),
            ("llamaswap_queue_wait_seconds_count", {"model": "a"}, 3),
            ("llamaswap_key_requests_total", {"key": "ci", "model": "a", "status": "500"}, 1),
            ("llamaswap_key_tokens_total", {"key": "ci", "model": "a", "kind": "completion"}, 4),
        ]
        for name, labels, value in expected:
            self.assertEqual(metric(text, name, **labels), value, (name, labels))

    def test_a_series_appears_with_its_first_use(self) -> None:
        # no tokens, no speeds, no key: those series do not exist yet (no zero lines)
        self.world.events.publish(Activity(row()))
        text = self.text()
        self.assertIsNone(metric(text, "llamaswap_prompt_tokens_total", model="a"))
        self.assertIsNone(metric(text, "llamaswap_generation_tokens_per_second_count", model="a"))
        self.assertNotIn("llamaswap_key_requests_total{", text)
