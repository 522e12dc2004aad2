"""End to end: ``twistd llamaswap`` on the real demo, real llama-server, the official client.

Needs ``LLAMA_SERVER`` and ``LLAMASWAP_MODEL`` (``make test`` sets both from
``scripts/llama-server.sh`` and ``scripts/model.sh``); skipped without them,
except under CI, where their absence is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from .daemon import free_port, pid_alive, start_twistd

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "llamaswap" / "demo.yaml"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]

if not (os.environ.get("LLAMA_SERVER") and os.environ.get("LLAMASWAP_MODEL")):
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the end-to-end tests: LLAMA_SERVER/LLAMASWAP_MODEL unset")
    pytest.skip(
        "LLAMA_SERVER and LLAMASWAP_MODEL are not set (make test sets them)",
        allow_module_level=True,
    )


def until(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    """Poll a real process's observable state, bounded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"never happened within {seconds}s: {what}")


class Llamaswap:
    """A ``twistd -n llamaswap`` process on a free port."""

    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / "test-artifacts" / f"e2e-{self.port}.log", "w")  # noqa: SIM115
        self.process = start_twistd(config, self.port, self.log)
        self.http = httpx.Client(base_url=self.base, timeout=60)
        until(self._up, "llamaswap answers /health")
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0)

    def _up(self) -> bool:
        try:
            return self.http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def running(self) -> dict[str, Any]:
        return {r["model"]: r for r in self.http.get("/running").json()["running"]}

    def slots_busy(self, model: str) -> bool:
        slots = self.http.get(f"/upstream/{model}/slots").json()
        return any(slot["is_processing"] for slot in slots)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.http.close()
        self.log.close()
        return code


@pytest.fixture(scope="module")
def swap() -> Iterator[Llamaswap]:
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    server = Llamaswap(DEMO)
    yield server
    server.stop()


def test_the_embeddings_model_is_preloaded_and_stays_beside_swapping_chat_models(
    swap: Llamaswap,
) -> None:
    until(lambda: swap.running().get("smollm2-embed", {}).get("state") == "ready", "preload")
    embed_pid = swap.running()["smollm2-embed"]["pid"]
    for model in ("smollm2-greedy", "smollm2", "smollm2-greedy"):
        swap.client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
        assert sorted(swap.running()) == sorted([model, "smollm2-embed"])
    assert swap.running()["smollm2-embed"]["pid"] == embed_pid


def test_variants_change_sampling_without_a_reload(swap: Llamaswap) -> None:
    swap.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2)
    pid = swap.running()["smollm2"]["pid"]
    precise = [
        swap.client.chat.completions.create(
            model="smollm2-precise", messages=QUESTION, max_tokens=12
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert precise[0] == precise[1]  # temperature 0, top_k 1
    creative = swap.client.chat.completions.create(
        model="smollm2-creative", messages=QUESTION, max_tokens=12
    )
    assert creative.choices[0].message.content
    assert swap.running()["smollm2"]["pid"] == pid


def test_a_streamed_answer_shows_loading_progress_first(swap: Llamaswap) -> None:
    swap.http.post("/api/models/unload/smollm2-greedy")
    swap.http.post("/api/models/unload/smollm2")
    stream = swap.client.chat.completions.create(
        model="smollm2-greedy", messages=QUESTION, max_tokens=8, stream=True
    )
    reasoning, content = [], []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning_content"):
            reasoning.append(extra["reasoning_content"])
        if delta.content:
            content.append(delta.content)
    progress = "".join(reasoning)
    assert "smollm2-greedy is not loaded yet" in progress
    assert "smollm2-greedy is ready after" in progress
    assert content


def test_chat(swap: Llamaswap) -> None:
    reply = swap.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24)
    assert reply.choices[0].message.content
    assert reply.model == "smollm2"
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_chat_streams_while_the_model_is_still_generating(swap: Llamaswap) -> None:
    stream = swap.client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=300,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces = []
    generating_at_first_token = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if generating_at_first_token is None:
                # the first token is here; the model must still be working on the rest
                generating_at_first_token = swap.slots_busy("smollm2")
    assert generating_at_first_token is True
    assert len(pieces) > 50


def test_completions(swap: Llamaswap) -> None:
    reply = swap.client.completions.create(model="chat", prompt="Once upon a time", max_tokens=8)
    assert reply.choices[0].text


def test_embeddings(swap: Llamaswap) -> None:
    reply = swap.client.embeddings.create(model="smollm2-embed", input=["a cat", "a dog"])
    vectors = [item.embedding for item in reply.data]
    assert len(vectors) == 2
    assert len(vectors[0]) == len(vectors[1]) > 100
    assert vectors[0] != vectors[1]


def test_swap_there_and_back_gives_the_same_greedy_answer(swap: Llamaswap) -> None:
    def greedy() -> str:
        reply = swap.client.chat.completions.create(
            model="smollm2-greedy", messages=QUESTION, max_tokens=16
        )
        return reply.choices[0].message.content or ""

    first = greedy()
    assert "smollm2" not in swap.running()
    other = swap.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4)
    assert other.choices[0].message.content is not None
    assert "smollm2-greedy" not in swap.running()
    assert greedy() == first
    assert first


def test_upstream_props_and_llama_cpp_timings_pass_through(swap: Llamaswap) -> None:
    props = swap.http.get("/upstream/smollm2/props").json()
    assert "default_generation_settings" in props
    plain = swap.http.post(
        "/v1/chat/completions", json={"model": "smollm2", "messages": QUESTION, "max_tokens": 4}
    ).json()
    assert plain["timings"]["predicted_n"] == 4
    assert plain["usage"]["completion_tokens"] == 4
    with swap.http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "smollm2", "messages": QUESTION, "max_tokens": 4, "stream": True},
    ) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert any("timings" in json.loads(event) for event in events[:-1])


def test_hanging_up_mid_stream_stops_generation(swap: Llamaswap) -> None:
    stream = swap.client.chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for count, _ in enumerate(stream):
        if count == 3:
            break
    assert swap.slots_busy("smollm2")
    stream.close()
    # 4000 tokens would take half a minute; the slot must go idle long before that
    until(lambda: not swap.slots_busy("smollm2"), "llama-server stops generating", seconds=5)


def test_no_llama_server_is_left_after_llamaswap_stops() -> None:
    server = Llamaswap(DEMO)
    server.client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=2)
    pid = server.running()["smollm2"]["pid"]
    assert pid_alive(pid)
    assert server.stop() == 0
    assert (
        "all model servers stopped"
        in (ROOT / "test-artifacts" / f"e2e-{server.port}.log").read_text()
    )
    assert not pid_alive(pid)
