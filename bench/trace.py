# ruff: noqa: RUF001, RUF002  (the typographic signs are meant for the Markdown)
"""Mixed traffic: arrival order (``scheduler.policy: fifo``) vs collation (``collate``).

Seeded, deterministic traces are replayed against llamaswap in front of fake
llama-servers (``llamaswap.testing.fake_server``) that take a realistic time to
load (1.5 s for a chat model, 0.5 s for an embeddings model) and stream 20–60
tokens at 0.02 s a token.  Every trace runs once per policy (and per group layout),
each time from a fresh daemon, with the same seed, so both policies see exactly
the same scripted clients.

The clients are closed loops: each step is sent when the previous answer (and
the client's think time after it) is over, so a policy that serves faster also
gets the next request sooner, as with real agents and users.

Measured per run: the whole trace's completion time; model loads
(``llamaswap_model_starts_total``) and evictions (``llamaswap_model_stops_total``
with ``reason="swap"``) from ``/metrics``; per model the latency of each request as
the client sees it (sent → answer complete) and its queue wait (``queue_ms`` of
``/api/activity``); model state changes from ``/api/events`` (the load and stop
times that enter the waiting bound, and which loads happened while a request
waited).  Streamed chats (the Open WebUI traces) also give the user's first token;
a chat that waited for its model's cold start is told apart by the model's
``ready`` event falling between the request and its first token.
"""

from __future__ import annotations

import contextlib
import http.client as httpclient
import json
import random
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import CpuMonitor, Llamaswap, Procs, config_text, http, log, percentile

TITLE = "## Mixed traffic: arrival order vs collation"

SEED = 20251121
TOKEN_DELAY = 0.02  # s per generated token (fake llama-server)
TOKENS = (20, 60)  # answer length, uniform
LOAD_CHAT = 1.5  # s a chat model takes to load
LOAD_EMBED = 0.5  # s the embeddings model takes to load
MAX_WAIT = 8.0  # scheduler.maxWait of the collate runs
MAX_RESIDENCY = 20.0  # scheduler.maxResidency of the collate runs
SLACK = 0.25  # s of scheduling, proxying and event-timestamp jitter in the bound
TITLE_LEAD = 0.2  # s between Open WebUI's title request and the chat request
TASK_TOKENS = {"title": 24, "follow-ups": 60, "tags": 16}  # background answers
PROMPT_TIME = 0.2  # s the fake servers of the Open WebUI traces spend on a prompt
LOAD_MIX = 1.0  # s a model of the closed-loop mix takes to load
REQUEST_TIMEOUT = 120.0  # a request not answered by then is reported as never answered
RUN_DEADLINE = 240.0  # a run whose clients have not finished by then is a hang

FAKE = (
    "    cmd: >-\n"
    "      python -m llamaswap.testing.fake_server --port ${{PORT}} --model ${{MODEL_ID}}\n"
    "      --load-time {load} --token-delay {delay} --tokens 40{flags}"
)


# --- traces ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One client action: ``count`` requests sent at once (``count`` > 1: a burst,
    spread over the client's ``width`` connections), then ``think`` seconds."""

    model: str
    tokens: int = 0  # chat: tokens in the answer; 0 for embeddings
    inputs: int = 0  # embeddings: texts per request
    count: int = 1
    think: float = 0.0
    # Open WebUI's background requests around a user message (to the task model):
    before: str = ""  # a title request, sent TITLE_LEAD s before the chat
    after: str = ""  # follow-ups and tags, sent together when the answer is in
    stream: bool = False  # streamed: the time to the first token is measured


@dataclass(frozen=True)
class Client:
    name: str
    start: float  # s after the trace starts
    steps: tuple[Step, ...]
    width: int = 1  # concurrent connections for bursts


@dataclass(frozen=True)
class Trace:
    name: str
    title: str
    description: str
    clients: tuple[Client, ...]
    models: dict[str, float]  # id -> load time
    variants: tuple[str, ...] = ("default",)  # group layouts it runs under
    policies: tuple[str, ...] = ("fifo", "collate")  # "default": no scheduler section
    extra: str = ""  # more top-level configuration (pools)
    flags: str = ""  # more arguments for every fake server

    @property
    def requests(self) -> int:
        tasks = sum(bool(s.before) + 2 * bool(s.after) for c in self.clients for s in c.steps)
        return sum(s.count for c in self.clients for s in c.steps) + tasks


def tokens(rng: random.Random) -> int:
    return rng.randint(*TOKENS)


def tool_time(rng: random.Random) -> float:
    """What an agent does between two model calls (run a tool, read files, search):
    log-normal, median 1 s, one in ten over 3.2 s, capped at 8 s."""
    return round(min(8.0, max(0.2, rng.lognormvariate(0.0, 0.9))), 3)


def agent_trace(rng: random.Random, agents: int, loops: int, *, lockstep: bool = False) -> Trace:
    """Agents looping A → B → A → C.  Realistic tool times are heavy-tailed and agents
    start at different moments; ``lockstep`` is the contrast: short, uniform tool
    times and a common start, which lets the agents fall into step."""
    clients = []
    spread = 2.0 if lockstep else 6.0
    for i in range(agents):
        steps = [
            Step(
                model,
                tokens=tokens(rng),
                think=round(rng.uniform(0.3, 1.5), 3) if lockstep else tool_time(rng),
            )
            for _ in range(loops)
            for model in ("A", "B", "A", "C")
        ]
        clients.append(Client(f"agent{i + 1}", round(rng.uniform(0.0, spread), 3), tuple(steps)))
    tools = (
        "0.3–1.5 s of tool time (uniform)"
        if lockstep
        else "a tool time drawn from a log-normal distribution (median 1 s, 10% over 3.2 s, "
        "0.2–8 s)"
    )
    return Trace(
        "agent-lockstep" if lockstep else "agent",
        "Agent pipeline, short uniform tool times (contrast)" if lockstep else "Agent pipeline",
        f"{agents} agents start within {spread:g} s of each other; each runs {loops} loops of "
        "A → B → A → C (planner, coder, planner, critic), every step sent when the previous "
        f"answer is in, after {tools}. A, B and C are in the default group (one model at a "
        "time).",
        tuple(clients),
        {"A": LOAD_CHAT, "B": LOAD_CHAT, "C": LOAD_CHAT},
    )


def two_users_trace(rng: random.Random, turns_a: int, turns_b: int) -> Trace:
    # user 1 hammers A from three sessions at once (chat, IDE assistant, a script),
    # so A is mostly busy when user 2's request for B comes in
    user1 = tuple(
        Client(
            f"user1-{session}",
            round(rng.uniform(0.0, 1.0), 3),
            tuple(
                Step("A", tokens=tokens(rng), think=round(rng.uniform(0.2, 1.0), 3))
                for _ in range(turns_a)
            ),
        )
        for session in ("chat", "ide", "script")
    )
    user2 = Client(
        "user2",
        round(rng.uniform(1.0, 3.0), 3),
        tuple(
            Step("B", tokens=tokens(rng), think=round(rng.uniform(3.0, 8.0), 3))
            for _ in range(turns_b)
        ),
    )
    return Trace(
        "users",
        "Two users on different models",
        f"user 1 hammers A from three sessions at once (say a chat, an IDE assistant and a "
        "script), "
        f"{turns_a} requests each, 0.2–1 s between an answer and the next request; user 2 "
        f"sends {turns_b} requests to B, 3–8 s apart. A and B are in the default group.",
        (*user1, user2),
        {"A": LOAD_CHAT, "B": LOAD_CHAT},
    )


def embeddings_trace(rng: random.Random, turns_a: int, turns_b: int, bursts: int) -> Trace:
    chat1 = Client(
        "chat1",
        0.0,
        tuple(
            Step("A", tokens=tokens(rng), think=round(rng.uniform(1.0, 4.0), 3))
            for _ in range(turns_a)
        ),
    )
    chat2 = Client(
        "chat2",
        round(rng.uniform(1.0, 4.0), 3),
        tuple(
            Step("B", tokens=tokens(rng), think=round(rng.uniform(3.0, 8.0), 3))
            for _ in range(turns_b)
        ),
    )
    indexer = Client(
        "indexer",
        round(rng.uniform(2.0, 5.0), 3),
        tuple(
            Step(
                "E",
                inputs=rng.randint(8, 32),
                count=rng.randint(6, 12),
                think=round(rng.uniform(5.0, 10.0), 3),
            )
            for _ in range(bursts)
        ),
        width=4,
    )
    return Trace(
        "embed",
        "Bursty embeddings beside chat",
        f"chat user 1 on A ({turns_a} requests, 1–4 s apart), chat user 2 on B ({turns_b} "
        f"requests, 3–8 s apart), and an indexer that sends {bursts} bursts of 6–12 embeddings "
        "requests (8–32 texts each, 4 at a time) to E, 5–10 s apart. Run twice: E in the "
        "default group with A and B, and E alone in a `persistent: true, exclusive: false` "
        "group.",
        (chat1, chat2, indexer),
        {"A": LOAD_CHAT, "B": LOAD_CHAT, "E": LOAD_EMBED},
        variants=("default", "resident"),
    )


def openwebui_traces(rng: random.Random, messages: int) -> list[Trace]:
    """Two users chatting with A through Open WebUI, which sends a title request
    just before each chat request and follow-ups and tags after each answer; three
    ways to set the task model (none, another model id, the pool of chat models)."""
    users = []
    for i in range(2):
        start = round(rng.uniform(0.0, 2.0), 3)
        steps = [
            (tokens(rng), round(rng.uniform(4.0, 10.0), 3)) for _ in range(messages)
        ]  # answer length, reading and typing time
        users.append((f"user{i + 1}", start, steps))
    common = (
        f"Two users chat with A through Open WebUI, {messages} messages each, 4–10 s of "
        "reading and typing between an answer and the next message (streamed; the time "
        "to the first token is measured). Models run with `--parallel 2` (a third answer "
        "waits for a slot, as in llama-server) and take "
        f"{PROMPT_TIME:g} s over each prompt before the first token (prompt processing: "
        "without it the first token would be the proxy's few milliseconds, and a ratio "
        "of those measures the machine's noise); A and B are chat models, T is a "
        "separate task model, all in the default group. "
    )
    kinds = (
        ("owui-none", "", "no background tasks (the baseline)", ""),
        (
            "owui-task",
            "T",
            f"the task model is T: a title request (sent {TITLE_LEAD:g} s before the chat), "
            "then follow-ups and tags, go to T",
            "",
        ),
        (
            "owui-pool",
            "tasks",
            "the task model is the pool `tasks: {models: [A, B], priority: -1}`: the same "
            "background requests go to whichever chat model is loaded",
            "pools:\n  tasks:\n    models: [A, B]\n    priority: -1\n",
        ),
    )
    out = []
    for name, task, what, extra in kinds:
        clients = tuple(
            Client(
                user,
                start,
                tuple(
                    Step("A", tokens=n, think=think, before=task, after=task, stream=True)
                    for n, think in steps
                ),
            )
            for user, start, steps in users
        )
        out.append(
            Trace(
                name,
                f"Open WebUI, {what.split(':')[0]}",
                common + what + ".",
                clients,
                {"A": LOAD_CHAT, "B": LOAD_CHAT, "T": LOAD_CHAT},
                policies=("fifo", "default"),
                extra=extra,
                flags=f" --parallel 2 --queue-slots --prompt-time {PROMPT_TIME:g}",
            )
        )
    return out


def closed_loop_trace(rng: random.Random, per_model: int, turns: int) -> Trace:
    """Three models, several closed-loop clients on each: the mix that makes
    arrival order load a model for almost every request."""
    clients = tuple(
        Client(
            f"{model}-{i + 1}",
            round(rng.uniform(0.0, 3.0), 3),
            tuple(
                Step(model, tokens=tokens(rng), think=round(rng.uniform(0.5, 2.0), 3))
                for _ in range(turns)
            ),
        )
        for model in ("X", "Y", "Z")
        for i in range(per_model)
    )
    return Trace(
        "closed",
        "Closed-loop mix: 3 models, 3 clients each",
        f"{per_model} clients per model (X, Y, Z; default group, {LOAD_MIX:g} s loads) start "
        f"within 3 s; each sends {turns} requests, the next 0.5–2 s after the answer.",
        clients,
        {"X": LOAD_MIX, "Y": LOAD_MIX, "Z": LOAD_MIX},
        policies=("fifo", "default"),
    )


def traces(seed: int, quick: bool) -> list[Trace]:
    """The traces, each from its own generator seeded from ``seed`` and its name."""

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}-{name}")

    if quick:
        return [
            agent_trace(rng("agent"), agents=2, loops=1),
            agent_trace(rng("agent-lockstep"), agents=2, loops=1, lockstep=True),
            two_users_trace(rng("users"), turns_a=3, turns_b=2),
            embeddings_trace(rng("embed"), turns_a=3, turns_b=1, bursts=1),
            *openwebui_traces(rng("owui"), messages=2),
            closed_loop_trace(rng("closed"), per_model=3, turns=1),
        ]
    return [
        agent_trace(rng("agent"), agents=4, loops=2),
        agent_trace(rng("agent-lockstep"), agents=3, loops=2, lockstep=True),
        two_users_trace(rng("users"), turns_a=10, turns_b=3),
        embeddings_trace(rng("embed"), turns_a=6, turns_b=3, bursts=3),
        *openwebui_traces(rng("owui"), messages=4),
        closed_loop_trace(rng("closed"), per_model=3, turns=3),
    ]


# --- configurations -------------------------------------------------------------


def scheduler_yaml(policy: str) -> str:
    if policy == "default":
        return ""
    if policy == "fifo":
        return "scheduler:\n  policy: fifo\n"
    return (
        f"scheduler:\n  policy: collate\n  maxWait: {MAX_WAIT:g}\n"
        f"  maxResidency: {MAX_RESIDENCY:g}\n"
    )


def trace_config(trace: Trace, policy: str, variant: str, start_port: int) -> str:
    head = (
        f"healthCheckTimeout: 60\nstartPort: {start_port}\n"
        "store:\n  path: ':memory:'\n" + scheduler_yaml(policy) + trace.extra
    )
    if variant == "resident":
        head += (
            "groups:\n  resident:\n    members: [E]\n    persistent: true\n    exclusive: false\n"
        )
    models = {
        m: FAKE.format(load=load, delay=TOKEN_DELAY, flags=trace.flags)
        for m, load in trace.models.items()
    }
    return config_text(head, models)


# --- replay -----------------------------------------------------------------------


@dataclass
class Sent:
    client: str
    model: str
    sent: float  # time.time()
    done: float = 0.0
    status: int = 0
    error: str = ""
    role: str = "chat"  # or an Open WebUI background task: title, follow-ups, tags
    first: float = 0.0  # streamed: when the first token came


def body(step: Step, client: str, index: int) -> dict[str, Any]:
    if step.tokens:
        return {
            "model": step.model,
            "max_tokens": step.tokens,
            "messages": [
                {"role": "system", "content": f"You are step {index} of {client}."},
                {"role": "user", "content": "Continue the task. " * 20},
            ],
            "fake": {"tokens": step.tokens, "delay": TOKEN_DELAY},
        }
    return {
        "model": step.model,
        "input": [f"chunk {index}.{i} of a document being indexed" for i in range(step.inputs)],
    }


def post_stream(port: int, path: str, document: dict[str, Any]) -> tuple[int, float, bytes]:
    """POST a streamed request; (status, time of the first token, the whole body)."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(
            "POST",
            path,
            body=json.dumps({**document, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        if response.status != 200:
            return response.status, 0.0, response.read()
        first = 0.0
        chunks = []
        while True:
            line = response.readline()
            if not line:
                break
            chunks.append(line)
            if not first and _has_token(line):
                first = time.time()
        return response.status, first, b"".join(chunks)
    finally:
        conn.close()


def _has_token(line: bytes) -> bool:
    """Is this SSE line a chunk with generated text (not the role, not [DONE])?"""
    if not line.startswith(b"data:") or b"[DONE]" in line:
        return False
    try:
        choices = json.loads(line[5:]).get("choices") or [{}]
    except ValueError:
        return False
    return bool((choices[0].get("delta") or {}).get("content"))


def replay(port: int, trace: Trace) -> tuple[list[Sent], float, float]:
    """Run every client of ``trace``; returns the requests and the start/end times."""
    results: list[Sent] = []
    lock = threading.Lock()
    t0 = time.time() + 0.2

    def send(client: str, step: Step, index: int, role: str = "chat") -> None:
        path = "/v1/chat/completions" if step.tokens else "/v1/embeddings"
        record = Sent(client, step.model, time.time(), role=role)
        try:
            if step.stream:
                status, first, reply = post_stream(port, path, body(step, client, index))
                record.first = first
            else:
                status, reply = http(port, "POST", path, body(step, client, index), REQUEST_TIMEOUT)
            record.status = status
            if status != 200:
                record.error = reply[:200].decode(errors="replace")
        except (OSError, httpclient.HTTPException) as e:
            record.error = f"{type(e).__name__}: {e}"
        record.done = time.time()
        with lock:
            results.append(record)

    def task(client: str, model: str, role: str, index: int) -> threading.Thread:
        """One of Open WebUI's background requests, sent without waiting for it."""
        step = Step(model, tokens=TASK_TOKENS[role])
        thread = threading.Thread(target=send, args=(client, step, index, role), daemon=True)
        thread.start()
        return thread

    def run_client(client: Client) -> None:
        time.sleep(max(0.0, t0 + client.start - time.time()))
        index = 0
        background: list[threading.Thread] = []
        for number, step in enumerate(client.steps, 1):
            if step.before:
                background.append(task(client.name, step.before, "title", index))
                time.sleep(TITLE_LEAD)
            if step.count == 1:
                send(client.name, step, index)
                index += 1
            else:
                jobs = list(range(index, index + step.count))
                index += step.count

                def worker(jobs: list[int] = jobs, step: Step = step) -> None:
                    while True:
                        with lock:
                            if not jobs:
                                return
                            n = jobs.pop(0)
                        send(client.name, step, n)

                workers = [
                    threading.Thread(target=worker, daemon=True)
                    for _ in range(min(client.width, step.count))
                ]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
            if step.after:
                background += [
                    task(client.name, step.after, r, index) for r in ("follow-ups", "tags")
                ]
            if number < len(client.steps):  # no think time after the last answer
                time.sleep(step.think)
        for thread in background:
            thread.join(REQUEST_TIMEOUT)

    threads = [threading.Thread(target=run_client, args=(c,), daemon=True) for c in trace.clients]
    for t in threads:
        t.start()
    deadline = time.time() + RUN_DEADLINE
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    hung = [c.name for c, t in zip(trace.clients, threads, strict=True) if t.is_alive()]
    if hung:
        raise RuntimeError(f"clients {hung} still running after {RUN_DEADLINE:g}s: a hang")
    end = max((r.done for r in results), default=t0)
    return results, t0, end


class EventStream(threading.Thread):
    """Reads llamaswap's /api/events and stamps model state changes on arrival."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.states: list[tuple[float, str, str]] = []  # time, model, state
        self.swaps: list[tuple[float, dict[str, Any]]] = []
        self.conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=None)
        self.connected = threading.Event()

    def run(self) -> None:
        kind = ""
        try:
            self.conn.request("GET", "/api/events")
            response = self.conn.getresponse()
            self.connected.set()
            while True:
                raw = response.readline()
                if not raw:
                    return
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind in ("model", "swap"):
                    data = json.loads(line[5:])
                    now = time.time()
                    if kind == "model":
                        self.states.append((now, data["id"], data["state"]))
                    else:
                        self.swaps.append((now, data))
        except (OSError, httpclient.HTTPException, AttributeError, ValueError):
            return
        finally:
            self.connected.set()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.conn.sock is not None:
                self.conn.sock.shutdown(2)
        self.conn.close()

    def durations(self, start: str, end: str) -> dict[str, list[float]]:
        """Per model, seconds from each ``start`` state to the next ``end`` state."""
        found: dict[str, list[float]] = {}
        began: dict[str, float] = {}
        for t, model, state in self.states:
            if state == start:
                began[model] = t
            elif state == end and model in began:
                found.setdefault(model, []).append(t - began.pop(model))
        return found

    def ready_times(self) -> list[tuple[float, str]]:
        return [(t, m) for t, m, s in self.states if s == "ready"]


def metric_sums(text: str) -> dict[str, float]:
    """Sum of each counter over its labels, plus stops by reason."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
        if not match:
            continue
        name, labels, value = match.group(1), match.group(2) or "", float(match.group(3))
        sums[name] = sums.get(name, 0.0) + value
        reason = re.search(r'reason="([^"]+)"', labels)
        if name == "llamaswap_model_stops_total" and reason:
            key = f"stops_{reason.group(1)}"
            sums[key] = sums.get(key, 0.0) + value
    return sums


def activity_rows(port: int, expected: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    deadline = time.time() + 10
    while time.time() < deadline:
        rows = []
        offset = 0
        while True:
            status, raw = http(port, "GET", f"/api/activity?limit=1000&offset={offset}")
            if status != 200:
                raise RuntimeError(f"/api/activity: HTTP {status} {raw[:200]!r}")
            page = json.loads(raw)
            page = page["data"]
            rows.extend(page)
            if len(page) < 1000:
                break
            offset += 1000
        if len(rows) >= expected:
            break
        time.sleep(0.5)
    return rows


# --- one run ------------------------------------------------------------------------


def stats3(values: list[float]) -> list[float]:
    if not values:
        return [float("nan")] * 3
    return [percentile(values, 50), percentile(values, 95), max(values)]


@dataclass
class Bound:
    """What a waiting request may wait under collate: its patience (maxWait, or
    ``patience`` times the wanted model's load when that is shorter), then the running
    model's longest answer to drain (D), its stop (S) and the load of the wanted
    model (L), plus SLACK.  With several models waiting in arrival order a request
    may also sit behind the swaps of requests that came first: each such load (k of
    them) adds one more D + S + L (the queue-aware bound)."""

    drain: float
    stop: float
    load: dict[str, float]
    max_wait: float
    patience: float = 0.0  # 0: maxWait alone

    def strict(self, model: str) -> float:
        limit = self.max_wait
        if self.patience > 0:
            limit = min(limit, self.patience * self.load[model])
        return limit + self.drain + self.stop + self.load[model] + SLACK

    def aware(self, model: str, ahead: int) -> float:
        step = self.drain + self.stop + max(self.load.values())
        return self.strict(model) + ahead * step


def analyse(
    trace: Trace,
    policy: str,
    variant: str,
    sent: list[Sent],
    t0: float,
    end: float,
    metrics: dict[str, float],
    rows: list[dict[str, Any]],
    events: EventStream,
) -> dict[str, Any]:
    # activity rows ↔ requests: per model, both in arrival order
    by_model_rows: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["time"]):
        by_model_rows.setdefault(row["model"], []).append(row)
    models = sorted(trace.models)
    per_model: dict[str, Any] = {}
    all_lat: list[float] = []
    all_queue: list[float] = []
    for model in models:
        mine = sorted((s for s in sent if s.model == model), key=lambda s: s.sent)
        lat = [s.done - s.sent for s in mine if s.status == 200]
        queue = [r["queue_ms"] / 1000 for r in by_model_rows.get(model, [])]
        all_lat += lat
        all_queue += queue
        per_model[model] = {
            "n": len(mine),
            "errors": sum(1 for s in mine if s.status != 200),
            "latency": stats3(lat),
            "queue": stats3(queue),
            "rows": len(by_model_rows.get(model, [])),
        }

    loads_by_model = events.durations("starting", "ready")
    stops = [x for v in events.durations("stopping", "stopped").values() for x in v]
    measured_load = {m: max(loads_by_model.get(m, [trace.models[m]])) for m in models}
    drain = (
        TOKENS[1] * TOKEN_DELAY if any(s.tokens for c in trace.clients for s in c.steps) else 0.0
    )
    bound = Bound(drain, max(stops, default=0.0), measured_load, *bound_of(policy))
    ready = events.ready_times()
    over_strict, over_aware, worst = [], [], None
    for row in rows:
        waited = row["queue_ms"] / 1000
        arrived = row["time"]
        ahead = sum(1 for t, m in ready if m != row["model"] and arrived < t < arrived + waited)
        entry = {
            "model": row["model"],
            "at_s": round(arrived - t0, 2),
            "waited_s": round(waited, 3),
            "loads_of_others_meanwhile": ahead,
            "strict_bound_s": round(bound.strict(row["model"]), 3),
            "aware_bound_s": round(bound.aware(row["model"], ahead), 3),
        }
        if waited > bound.strict(row["model"]):
            over_strict.append(entry)
        if waited > bound.aware(row["model"], ahead):
            over_aware.append(entry)
        if worst is None or waited > worst["waited_s"]:
            worst = entry
    errors = [asdict(s) for s in sent if s.status != 200]
    chats = [s for s in sent if s.role == "chat"]
    ttft = [s.first - s.sent for s in chats if s.first]
    # like with like: a chat that waited for its model to load ("cold") measures the
    # machine's process start-up; the rest measure what background work costs the user
    warm, after_load = [], []
    for chat in (s for s in chats if s.first):
        loaded = [t for t, m in ready if m == chat.model and chat.sent < t <= chat.first]
        if loaded:
            after_load.append(chat.first - max(loaded))
        else:
            warm.append(chat.first - chat.sent)
    roles = sorted({s.role for s in sent})
    by_role = {
        role: stats3([s.done - s.sent for s in sent if s.role == role and s.status == 200])
        for role in roles
    }
    return {
        "messages": len(chats),
        "ttft": stats3(ttft),
        "ttft_mean": sum(ttft) / len(ttft) if ttft else float("nan"),
        "ttft_warm": stats3(warm),
        "ttft_warm_mean": sum(warm) / len(warm) if warm else float("nan"),
        "warm_messages": len(warm),
        "cold_after_load": [round(x, 4) for x in after_load],
        "swaps_per_message": int(metrics.get("stops_swap", 0)) / max(1, len(chats)),
        "by_role": by_role,
        "trace": trace.name,
        "variant": variant,
        "policy": policy,
        "requests": len(sent),
        "expected": trace.requests,
        "activity_rows": len(rows),
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": end - t0,
        "loads": int(metrics.get("llamaswap_model_starts_total", 0)),
        "evictions": int(metrics.get("stops_swap", 0)),
        "swaps_metric": int(metrics.get("llamaswap_swaps_total", 0)),
        "latency": stats3(all_lat),
        "queue": stats3(all_queue),
        "models": per_model,
        "load_s": {m: [round(x, 3) for x in v] for m, v in loads_by_model.items()},
        "bound": asdict(bound),
        "over_strict": over_strict,
        "over_aware": over_aware,
        "worst_wait": worst,
    }


def bound_of(policy: str) -> tuple[float, float]:
    """The ``maxWait`` and ``patience`` a run's scheduler works with (the bound of its
    waits): the bench's ``maxWait`` under ``collate``, the defaults otherwise, and
    the default ``patience`` under both (the bench does not set it)."""
    from llamaswap.policy import Collate

    if policy == "fifo":
        return MAX_WAIT, 0.0
    return (Collate().max_wait if policy == "default" else MAX_WAIT), Collate().patience


def run_one(
    procs: Procs, monitor: CpuMonitor, trace: Trace, policy: str, variant: str
) -> dict[str, Any]:
    start_port = random.SystemRandom().randrange(20000, 39000, 10)
    name = f"llamaswap-trace-{trace.name}-{variant}-{policy}"
    swap = Llamaswap(procs, name, trace_config(trace, policy, variant, start_port)).start()
    events = EventStream(swap.port)
    events.start()
    events.connected.wait(5)
    try:
        p0 = time.perf_counter()
        sent, t0, end = replay(swap.port, trace)
        p1 = time.perf_counter()
        status, raw = http(swap.port, "GET", "/metrics")
        metrics = metric_sums(raw.decode()) if status == 200 else {}
        rows = activity_rows(swap.port, len(sent))
        time.sleep(0.2)  # the last state events
    finally:
        events.close()
        swap.stop()
    result = analyse(trace, policy, variant, sent, t0, end, metrics, rows, events)
    result["other_cores"] = monitor.others(p0, p1)[0]
    result["start_port"] = start_port
    log(
        f"  {trace.name}/{variant}/{policy}: {result['wall_s']:.1f} s, {result['loads']} loads, "
        f"p95 {result['latency'][1]:.2f} s, max wait {result['queue'][2]:.2f} s, "
        f"{result['errors']} errors, over bound: {len(result['over_strict'])} strict / "
        f"{len(result['over_aware'])} queue-aware; {result['swaps_per_message']:.2f} swaps "
        f"per message, first token p50 {result['ttft'][0]:.2f} s"
    )
    return result


def run(
    procs: Procs,
    monitor: CpuMonitor,
    *,
    quick: bool = False,
    seed: int = SEED,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    runs = []
    chosen = [t for t in traces(seed, quick) if not only or t.name in only]
    for trace in chosen:
        for variant in trace.variants:
            for policy in trace.policies:
                runs.append(run_one(procs, monitor, trace, policy, variant))
    return {
        "seed": seed,
        "quick": quick,
        "settings": {
            "token_delay": TOKEN_DELAY,
            "tokens": list(TOKENS),
            "load_chat": LOAD_CHAT,
            "load_embed": LOAD_EMBED,
            "max_wait": MAX_WAIT,
            "patience": bound_of("default")[1],
            "max_residency": MAX_RESIDENCY,
            "slack": SLACK,
        },
        "traces": [
            {
                "name": t.name,
                "title": t.title,
                "description": t.description,
                "requests": t.requests,
                "variants": list(t.variants),
                "policies": list(t.policies),
                "streams": any(s.stream for c in t.clients for s in c.steps),
            }
            for t in chosen
        ],
        "runs": runs,
    }


# --- report ------------------------------------------------------------------------


def _s(value: float | None, digits: int = 2) -> str:
    if value is None or value != value:
        return "–"
    return f"{value:.{digits}f}"


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f} ms" for v in values) or "–"


def _trio(values: list[float]) -> str:
    return " / ".join(_s(v) for v in values)


def _find(runs: list[dict[str, Any]], trace: str, policy: str, variant: str = "default") -> Any:
    return next(
        (
            r
            for r in runs
            if r["trace"] == trace and r["policy"] == policy and r["variant"] == variant
        ),
        None,
    )


def _cut(before: float, after: float) -> float:
    return (1 - after / before) * 100 if before else float("nan")


def _change(before: float, after: float, less: str, more: str) -> str:
    cut = round(_cut(before, after))
    return f"{cut}% {less}" if cut >= 0 else f"{-cut}% {more}"


def targets(t: dict[str, Any]) -> list[list[str]]:
    fifo, coll = _find(t["runs"], "agent", "fifo"), _find(t["runs"], "agent", "collate")
    if not fifo or not coll:
        return []
    fewer = _cut(fifo["loads"], coll["loads"])
    lower = _cut(fifo["latency"][1], coll["latency"][1])
    over = len(coll["over_strict"])
    over_aware = len(coll["over_aware"])

    def status(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = [
        [
            "agent trace: ≥ 30% fewer loads with collate",
            f"{fifo['loads']} → {coll['loads']} "
            f"({_change(fifo['loads'], coll['loads'], 'fewer', 'more')})",
            status(fewer >= 30),
        ],
        [
            "agent trace: ≥ 20% lower p95 latency with collate",
            f"{fifo['latency'][1]:.2f} s → {coll['latency'][1]:.2f} s "
            f"({_change(fifo['latency'][1], coll['latency'][1], 'lower', 'higher')})",
            status(lower >= 20),
        ],
        [
            "agent trace, collate: no wait past the bound (patience, drain, stop, load)",
            f"{over} of {coll['requests']} over (max wait {coll['queue'][2]:.2f} s); "
            f"queue-aware bound: {over_aware} over",
            status(over == 0),
        ],
    ]
    lf, lc = (
        _find(t["runs"], "agent-lockstep", "fifo"),
        _find(t["runs"], "agent-lockstep", "collate"),
    )
    if lf and lc:
        rows.append(
            [
                "(contrast, no target) agents in lockstep: loads, p95 latency",
                f"{lf['loads']} → {lc['loads']} "
                f"({_change(lf['loads'], lc['loads'], 'fewer', 'more')}); "
                f"{lf['latency'][1]:.2f} s → {lc['latency'][1]:.2f} s "
                f"({_change(lf['latency'][1], lc['latency'][1], 'lower', 'higher')})",
                "–",
            ]
        )
    return rows


def smart_targets(t: dict[str, Any]) -> list[list[str]]:
    """Issue 14's targets: the default schedule vs arrival order, and Open WebUI."""

    def status(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = []
    pool, none = _find(t["runs"], "owui-pool", "default"), _find(t["runs"], "owui-none", "default")
    if pool and none:
        ratio = (
            pool["ttft_warm_mean"] / none["ttft_warm_mean"]
            if none["ttft_warm_mean"]
            else float("nan")
        )
        rows += [
            [
                "Open WebUI, task model = pool, default config: 0 swaps per message",
                f"{pool['swaps_per_message']:.2f} ({pool['evictions']} evictions, "
                f"{pool['messages']} messages)",
                status(pool["evictions"] == 0),
            ],
            [
                "… user's first token ≤ +10% of no background tasks (mean of the messages "
                "sent to a loaded model; p50 / p95 / max)",
                f"{none['ttft_warm_mean']:.3f} s → {pool['ttft_warm_mean']:.3f} s "
                f"({(ratio - 1) * 100:+.0f}%, {none['warm_messages']} and "
                f"{pool['warm_messages']} messages; {_trio(none['ttft_warm'])} → "
                f"{_trio(pool['ttft_warm'])}); messages that waited for the cold start: "
                f"first token {_ms(none['cold_after_load'])} → {_ms(pool['cold_after_load'])} "
                "after A was ready",
                status(ratio <= 1.10),
            ],
        ]
    fifo, smart = _find(t["runs"], "closed", "fifo"), _find(t["runs"], "closed", "default")
    if fifo and smart:
        share = smart["loads"] / smart["requests"]
        lower = _cut(fifo["latency"][1], smart["latency"][1])
        rows += [
            [
                "closed loop, default config: starts ≤ 35% of requests",
                f"{smart['loads']} of {smart['requests']} ({share * 100:.0f}%; fifo "
                f"{fifo['loads']})",
                status(share <= 0.35),
            ],
            [
                "closed loop: p95 latency ≥ 25% below fifo",
                f"{fifo['latency'][1]:.2f} s → {smart['latency'][1]:.2f} s "
                f"({_change(fifo['latency'][1], smart['latency'][1], 'lower', 'higher')})",
                status(lower >= 25),
            ],
            [
                "closed loop, default config: no wait past the bound",
                f"{len(smart['over_strict'])} of {smart['requests']} over "
                f"(max wait {smart['queue'][2]:.2f} s)",
                status(not smart["over_strict"]),
            ],
        ]
    return rows


def render(t: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    """The docs section (starts with TITLE)."""
    s = t["settings"]
    out: list[str] = []
    add = out.append
    add(TITLE)
    add("")
    add(
        'Generated by `python -m bench --only trace` (`make bench BENCH_ARGS="--only trace"`; '
        "code in [`bench/trace.py`](../bench/trace.py))"
        + (f", run of {machine['date']}" if machine else "")
        + ". Seeded traces (seed "
        f"{t['seed']}) replayed against fake llama-servers (`llamaswap.testing.fake_server`): "
        f"chat models load in {s['load_chat']:g} s, the embeddings model in "
        f"{s['load_embed']:g} s, answers are {s['tokens'][0]}–{s['tokens'][1]} tokens at "
        f"{s['token_delay']:g} s a token, embeddings answer at once. Each trace runs under "
        "`scheduler: {policy: fifo}` and under `scheduler: {policy: collate, maxWait: "
        f"{s['max_wait']:g}, maxResidency: {s['max_residency']:g}}}`, each from a fresh "
        "daemon, same seed, same clients. Clients are closed loops (the next step leaves when "
        "the answer is in and the think time is over)."
        + (" **Quick mode: smoke-test numbers only.**" if t.get("quick") else "")
    )
    add("")
    if machine:
        load = machine.get("load_before")
        add(
            f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores shared by "
            "the clients, llamaswap and the fake servers; "
            f"{machine.get('llamaswap', '?')}"
            + (f"; load average before {', '.join(f'{x:.2f}' for x in load)}" if load else "")
            + "."
        )
        add("")
    rows = targets(t) + smart_targets(t)
    if rows:
        add("| target | measured | status |")
        add("|---|---|---|")
        out.extend(f"| {' | '.join(r)} |" for r in rows)
        add("")
    add(
        "*loads*: model starts (`llamaswap_model_starts_total`, the first cold start "
        "included); *evictions*: models stopped to make room (`llamaswap_model_stops_total"
        '{reason="swap"}`). Latency: request sent → answer complete, at the client. '
        "Wait: `queue_ms` of `/api/activity` (arrival → lease). Figures are "
        "p50 / p95 / max in seconds. *Over bound*: requests whose wait exceeded "
        "P + D + S + L + 0.25 s, where P = maxWait, or `patience` × L when that is "
        f"shorter (the default patience, {_s(s.get('patience'), 0)}, applies under both collate "
        "configurations), D = the longest answer the running model may "
        f"still be finishing ({s['tokens'][1]} × {s['token_delay']:g} s), S = the longest "
        "stop and L = the longest load of the wanted model, both measured in that run from "
        "`/api/events` — the bound collate promises to one waiting request. "
        "After the slash: the *queue-aware* bound, which adds one D + S + L for every "
        "load of another model that completed while the request waited (requests for "
        "other models that came first are served first). Under fifo there is no bound; "
        "the column is shown for comparison. The Open WebUI and closed-loop traces run "
        "under `fifo` and under the *default* configuration (no `scheduler` section: "
        "`collate` with its defaults, `hold` and `patience` included); for them the "
        "bound uses the default `maxWait`. *Swaps / message*: evictions per user chat "
        "message; *user's first token*: chat request sent → first generated token. The "
        "Open WebUI target compares like with like: the messages sent while A was "
        "loaded (what background work costs the user); a message that waited for A's "
        "cold start is shown apart, as its first token after A became ready (its total "
        "is the machine's process start-up, 1.6–2.3 s on this machine, which varies more "
        "between runs than anything the schedule does; and with a task model the title "
        f"starts A {TITLE_LEAD:g} s before the chat is sent, a head start the baseline "
        "lacks)."
    )
    add("")
    for info in t["traces"]:
        add(f"### {info['title']} ({info['requests']} requests)")
        add("")
        add(info["description"])
        add("")
        policies = info.get("policies", ["fifo", "collate"])
        streams = info.get("streams", False)
        header = [
            "policy",
            "total s",
            "loads",
            "evictions",
            "latency all",
            "wait all",
            "over bound",
            "errors",
            "other cores",
        ]
        if streams:
            header[4:4] = ["swaps / message", "user's first token"]
        if len(info["variants"]) > 1:
            header.insert(0, "E in")
        add("| " + " | ".join(header) + " |")
        add("|" + "|".join("---" for _ in header) + "|")
        for variant in info["variants"]:
            for policy in policies:
                r = _find(t["runs"], info["name"], policy, variant)
                if r is None:
                    continue
                cells = [
                    policy,
                    _s(r["wall_s"], 1),
                    str(r["loads"]),
                    str(r["evictions"]),
                    _trio(r["latency"]),
                    _trio(r["queue"]),
                    f"{len(r['over_strict'])} / {len(r['over_aware'])}",
                    str(r["errors"]),
                    _s(r.get("other_cores")),
                ]
                if streams:
                    cells[4:4] = [_s(r["swaps_per_message"]), _trio(r["ttft"])]
                if len(info["variants"]) > 1:
                    label = "default group" if variant == "default" else "resident group"
                    cells.insert(0, label)
                add("| " + " | ".join(cells) + " |")
        add("")
        header = ["policy", "model", "requests", "latency", "wait"]
        if len(info["variants"]) > 1:
            header.insert(0, "E in")
        add("| " + " | ".join(header) + " |")
        add("|" + "|".join("---" for _ in header) + "|")
        for variant in info["variants"]:
            for policy in policies:
                r = _find(t["runs"], info["name"], policy, variant)
                if r is None:
                    continue
                for model, m in r["models"].items():
                    cells = [policy, model, str(m["n"]), _trio(m["latency"]), _trio(m["queue"])]
                    if len(info["variants"]) > 1:
                        cells.insert(0, "default" if variant == "default" else "resident")
                    add("| " + " | ".join(cells) + " |")
        add("")
        for variant in info["variants"]:
            smart = policies[-1]
            r = _find(t["runs"], info["name"], smart, variant)
            if r and r["worst_wait"]:
                w = r["worst_wait"]
                add(
                    f"Longest wait under {smart}"
                    f"{'' if variant == 'default' else ' (E resident)'}"
                    f": {w['waited_s']:.2f} s for {w['model']} at {w['at_s']:.1f} s into the "
                    f"trace, with {w['loads_of_others_meanwhile']} load(s) of other models "
                    f"meanwhile; strict bound {w['strict_bound_s']:.2f} s, queue-aware "
                    f"{w['aware_bound_s']:.2f} s."
                )
        add("")
    note = Path(__file__).with_name("trace_analysis.md")
    if note.exists():
        add(note.read_text().strip())
        add("")
    return "\n".join(out)


def _bounds(lines: list[str], title: str) -> tuple[int, int] | None:
    """Where the section headed by the line ``title`` begins and ends in ``lines``."""
    if title not in lines:
        return None
    begin = lines.index(title)
    end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return begin, end


def splice(document: str, section: str) -> str:
    """``document`` with the section of ``section``'s title (its first line, as TITLE)
    replaced by ``section`` (appended if absent)."""
    lines = document.splitlines()
    bounds = _bounds(lines, section.splitlines()[0])
    if bounds is None:
        return document.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    begin, end = bounds
    kept = lines[:begin] + section.rstrip("\n").splitlines() + [""] + lines[end:]
    return "\n".join(kept).rstrip("\n") + "\n"


def section_of(document: str, title: str) -> str | None:
    """The section of ``document`` headed by the line ``title``, or None."""
    lines = document.splitlines()
    bounds = _bounds(lines, title)
    if bounds is None:
        return None
    return "\n".join(lines[bounds[0] : bounds[1]]).rstrip("\n") + "\n"


def main() -> None:
    """``python -m bench.trace NAME[,NAME...] [--quick]``: only these traces, printed."""
    import sys
    import tempfile

    from .common import sweep

    names = tuple(n for arg in sys.argv[1:] if not arg.startswith("-") for n in arg.split(","))
    procs = Procs(Path(tempfile.mkdtemp(prefix="llamaswap-trace-")))
    monitor = CpuMonitor().start()
    try:
        result = run(procs, monitor, quick="--quick" in sys.argv, only=names)
    finally:
        monitor.stop()
        procs.close()
        sweep()
    (procs.workdir / "trace.json").write_text(json.dumps(result, indent=1))
    print(render(result))
    log(f"raw results in {procs.workdir / 'trace.json'}")


if __name__ == "__main__":
    main()
