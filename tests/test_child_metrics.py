"""``/metrics`` also carries each running child's own metrics, labelled by model."""

from __future__ import annotations

import os
import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.metrics import SCRAPE_TIMEOUT, ChildMetrics, merge_child_metrics
from llamaswap.relay import Hop
from llamaswap.testing.fake_server import FakeLlamaServer

from .helpers import World, world
from .integration import FAKE, LiveTestCase
from .test_observability import metric

LLAMACPP = b"""\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 12
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
"""


def families(text: str) -> dict[str, Any]:
    """Parsed with prometheus_client's own parser: raises on invalid text."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def type_lines(text: str) -> list[str]:
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]


class MergeTests(SynchronousTestCase):
    def test_every_sample_gets_its_model_and_each_family_one_help_and_type(self) -> None:
        text = merge_child_metrics({"alpha": LLAMACPP, "beta": LLAMACPP}).decode()
        self.assertEqual(metric(text, "llamacpp:prompt_tokens_total", model="alpha"), 12)
        self.assertEqual(metric(text, "llamacpp:requests_processing", model="beta"), 1)
        self.assertEqual(
            type_lines(text), ["llamacpp:prompt_tokens_total", "llamacpp:requests_processing"]
        )
        self.assertEqual(text.count("# HELP "), 2)
        parsed = families(text)
        self.assertEqual(parsed["llamacpp:requests_processing"].type, "gauge")
        self.assertEqual(len(parsed["llamacpp:requests_processing"].samples), 2)

    def test_what_would_make_the_text_invalid_is_dropped(self) -> None:
        odd = (
            b"# TYPE llamacpp:requests_processing counter\n"  # typed otherwise by alpha
            b"llamacpp:requests_processing 5\n"
            b"# TYPE llamaswap_requests_total counter\n"  # one of llamaswap's own names
            b"llamaswap_requests_total 99\n"
            b"not a sample line\n"
            b"bad_value 1_000\n"
            b'broken_labels{a="1",b} 1\n'
            b'with_model{model="x",slot="0"} 3 1700000000000\n'
            b'with_model{model="x",slot="0"} 4\n'  # the same series again
        )
        text = merge_child_metrics({"alpha": LLAMACPP, 'we"ird\\': odd}).decode()
        parsed = families(text)
        self.assertEqual(len(parsed["llamacpp:requests_processing"].samples), 1)
        self.assertNotIn("llamaswap_requests_total", text)
        self.assertNotIn("bad_value", text)
        self.assertNotIn("broken_labels", text)
        (sample,) = parsed["with_model"].samples
        self.assertEqual(sample.labels, {"model": 'we"ird\\', "exported_model": "x", "slot": "0"})
        self.assertEqual(sample.value, 3)

    def test_a_sample_that_would_fail_the_scrape_or_name_another_series_is_dropped(
        self,
    ) -> None:
        hostile = (
            b'twice{model="x",exported_model="y"} 1\n'  # exported_model twice once renamed
            b'twice{a="1",a="2"} 2\n'
            b'forged{__name__="llamaswap_up"} 3\n'  # a reserved name: another series
            b'forged{__meta_x="1"} 4\n'
            b'fine{slot="0"} 5\n'
        )
        text = merge_child_metrics({"m": hostile}).decode()
        self.assertEqual(text, 'fine{model="m",slot="0"} 5\n')
        for line in text.splitlines():  # Prometheus refuses a whole scrape for one of these
            names = re.findall(r'([a-zA-Z_]\w*)="', line)
            self.assertEqual(len(names), len(set(names)), line)

    def test_histograms_keep_their_samples_together(self) -> None:
        histogram = (
            b"# HELP latency_seconds Latency\n# TYPE latency_seconds histogram\n"
            b'latency_seconds_bucket{le="1"} 2\nlatency_seconds_bucket{le="+Inf"} 3\n'
            b"latency_seconds_sum 1.5\nlatency_seconds_count 3\n"
        )
        text = merge_child_metrics({"a": histogram, "b": histogram}).decode()
        self.assertEqual(type_lines(text), ["latency_seconds"])
        self.assertEqual(len(families(text)["latency_seconds"].samples), 8)


class _Hanging(Resource):
    """A child that takes the metrics request and never answers it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def render_GET(self, request: Request) -> Any:
        self.asked += 1
        return NOT_DONE_YET


class _ByPort(Resource):
    """Hands each request to the resource of the child at the port it was sent to."""

    isLeaf = True

    def __init__(self, children: dict[int, Any]) -> None:
        super().__init__()
        self.children = children
        self.hops: list[bytes] = []

    def render(self, request: Request) -> Any:
        self.hops.extend(request.requestHeaders.getRawHeaders(b"via", []))
        host = request.getHeader(b"host") or b""
        return self.children[int(host.rpartition(b":")[2])].render(request)


THREE = """
groups:
  all:
    members: [a, b, c]
    swap: false
models:
  a:
    cmd: sleep --port ${PORT} --model a
  b:
    cmd: sleep --port ${PORT} --model b
  c:
    cmd: sleep --port ${PORT} --model c
"""


class ScrapeTests(SynchronousTestCase):
    """In memory: a fake child with --metrics, one that hangs, one without --metrics."""

    def setUp(self) -> None:
        self.world: World = world(THREE)
        for model_id in ("a", "b", "c"):
            self.world.scheduler.load(model_id)
            self.world.make_ready(model_id)
        ports: dict[str, int] = {}
        for model_id in ("a", "b", "c"):
            port = self.world.process(model_id).port
            assert port is not None
            ports[model_id] = port
        self.with_metrics = FakeLlamaServer(self.world.reactor, "a", metrics=True)
        self.with_metrics.start()
        self.without = FakeLlamaServer(self.world.reactor, "c")
        self.without.start()
        self.hanging = _Hanging()
        self.upstream = _ByPort(
            {
                ports["a"]: self.with_metrics.resource(),
                ports["b"]: self.hanging,
                ports["c"]: self.without.resource(),
            }
        )
        self.agent = RequestTraversalAgent(self.upstream)
        self.hop = Hop()
        self.children = ChildMetrics(self.world.scheduler, self.agent, self.world.reactor, self.hop)

    def failures(self, model: str, reason: str) -> float:
        labels = {"model": model, "reason": reason}
        return sum(
            sample.value
            for family in self.children.failures.collect()
            for sample in family.samples
            if sample.name.endswith("_total") and sample.labels == labels
        )

    def test_a_silent_child_is_skipped_after_the_timeout_and_counted(self) -> None:
        first = self.children.text()
        second = self.children.text()  # joins the round in progress
        self.agent.flush()
        self.assertNoResult(first)
        self.world.reactor.advance(SCRAPE_TIMEOUT)
        self.agent.flush()
        text = self.successResultOf(first).decode()
        self.assertEqual(self.successResultOf(second).decode(), text)
        self.assertEqual(self.hanging.asked, 1)
        self.assertEqual(metric(text, "llamacpp:requests_processing", model="a"), 0)
        self.assertNotIn('model="b"', text)
        self.assertNotIn('model="c"', text)
        self.assertEqual(self.failures("b", "timeout"), 1)
        self.assertEqual(self.failures("c", "status"), 0)  # 501: quietly skipped
        self.assertTrue(all(self.hop.name in via for via in self.upstream.hops))

    def test_a_scraper_that_leaves_does_not_cut_the_others_short(self) -> None:
        leaving = self.children.text()
        staying = self.children.text()
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        self.world.reactor.advance(SCRAPE_TIMEOUT)
        self.agent.flush()
        self.assertIn(b'llamacpp:requests_processing{model="a"} 0', self.successResultOf(staying))

    def test_stopped_models_are_not_asked(self) -> None:
        unloading: Deferred[None] = self.world.scheduler.unload(["b"])
        self.successResultOf(unloading)
        text = self.successResultOf(self.children.text())
        self.assertEqual(self.hanging.asked, 0)
        self.assertIn(b'model="a"', text)


TOGETHER = f"""
logRequests: true
groups:
  all:
    members: [alpha, beta, gamma]
    swap: false
models:
  alpha:
    cmd: {FAKE} --metrics
  beta:
    cmd: {FAKE} --metrics
  gamma:
    cmd: {FAKE}
"""


class LiveChildMetricsTests(LiveTestCase):
    """Real sockets, real fake-llama-server children."""

    async def test_children_metrics_are_merged_into_llamaswaps(self) -> None:
        await self.serve(TOGETHER)
        for model in ("alpha", "beta", "gamma"):
            self.assertEqual((await self.chat(model)).code, 200)
        await self.chat("beta")
        reply = await self.request("GET", "/metrics")
        self.assertEqual(reply.code, 200)
        self.assertTrue((reply.header("content-type") or "").startswith("text/plain"))
        text = reply.body.decode()
        parsed = families(text)  # the whole page is valid text format
        # the parser names a counter family without its _total
        self.assertEqual(parsed["llamacpp:tokens_predicted"].type, "counter")
        self.assertEqual(metric(text, "llamacpp:tokens_predicted_total", model="alpha"), 8)
        self.assertEqual(metric(text, "llamacpp:tokens_predicted_total", model="beta"), 16)
        self.assertNotIn('model="gamma"', text.split("llamacpp:", 1)[1])  # no --metrics
        self.assertEqual(
            metric(text, "llamaswap_completion_tokens_total", model="beta"), 16
        )  # llamaswap's own families are still there
        self.assertEqual(len(type_lines(text)), len(set(type_lines(text))))
        self.assertNotIn("llamaswap_child_metrics_failures_total{", text)


LLAMA_SERVER = os.environ.get("LLAMA_SERVER")
MODEL = os.environ.get("LLAMASWAP_MODEL")


class RealLlamaServerMetricsTests(LiveTestCase):
    """The real llama-server's ``llamacpp:*`` families come through, labelled."""

    timeout = 120

    if not (LLAMA_SERVER and MODEL):
        skip = "LLAMA_SERVER and LLAMASWAP_MODEL are not set (make test sets them)"

    async def test_llamacpp_metrics_through_llamaswap(self) -> None:
        await self.serve(
            "healthCheckTimeout: 90\nmodels:\n  smol:\n    cmd: >-\n"
            '      "${env.LLAMA_SERVER}" --host 127.0.0.1 --port ${PORT} '
            '-m "${env.LLAMASWAP_MODEL}" --threads 1 --ctx-size 512 --parallel 1 '
            "--no-webui --metrics\n"
        )
        reply = await self.post(
            "/v1/completions", {"model": "smol", "prompt": "One, two,", "max_tokens": 3}
        )
        self.assertEqual(reply.code, 200)
        text = (await self.request("GET", "/metrics")).body.decode()
        parsed = families(text)
        self.assertEqual(
            metric(text, "llamacpp:tokens_predicted_total", model="smol"),
            reply.json()["usage"]["completion_tokens"],
        )
        self.assertEqual(parsed["llamacpp:requests_processing"].type, "gauge")
        self.assertEqual(len(type_lines(text)), len(set(type_lines(text))))
