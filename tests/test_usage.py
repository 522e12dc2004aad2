"""Reading token counts and speeds off responses without touching them."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.usage import ResponseMeter


class MeterTests(SynchronousTestCase):
    def test_llama_cpp_json_timings_win_over_usage(self) -> None:
        meter = ResponseMeter()
        meter.started(200, b"application/json")
        body = json.dumps(
            {
                "usage": {"prompt_tokens": 9, "completion_tokens": 4},
                "timings": {
                    "prompt_n": 10,
                    "predicted_n": 5,
                    "prompt_per_second": 800.0,
                    "predicted_per_second": 95.5,
                },
            }
        ).encode()
        for i in range(0, len(body), 7):
            meter.feed(body[i : i + 7])
        usage = meter.result()
        self.assertEqual((usage.tokens_in, usage.tokens_out), (10, 5))
        self.assertEqual((usage.prompt_tps, usage.gen_tps), (800.0, 95.5))

    def test_sse_usage_split_across_chunks(self) -> None:
        meter = ResponseMeter()
        meter.started(200, b"text/event-stream")
        stream = (
            b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'
            b'data: {"choices": [], "usage": {"input_tokens": 3, "output_tokens": 7}}\n\n'
            b"data: [DONE]\n\n"
        )
        for i in range(0, len(stream), 5):  # "usage" itself is cut in two
            meter.feed(stream[i : i + 5])
        usage = meter.result()
        self.assertEqual((usage.tokens_in, usage.tokens_out), (3, 7))
        self.assertEqual(meter.bytes, len(stream))

    def test_error_message_of_a_failed_response(self) -> None:
        meter = ResponseMeter()
        meter.started(400, b"application/json")
        meter.feed(b'{"error": {"message": "context too long", "code": 400}}')
        self.assertEqual(meter.result().error, "context too long")
        plain = ResponseMeter()
        plain.started(500, b"text/plain")
        plain.feed(b"upstream exploded")
        self.assertEqual(plain.result().error, "upstream exploded")
