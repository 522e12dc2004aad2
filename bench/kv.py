# ruff: noqa: RUF001  (the typographic signs are meant for the Markdown)
"""Conversations across swaps: the follow-up's first token with and without the KV store.

One llamaswap, real llama-server children (the same GGUF under three ids):
``kv-on`` (``kvCache`` on, the default), ``kv-off`` (``kvCache: false``) and
``other`` (what the swap goes to).  For each conversation size, on each of the
two, side by side: ask the conversation (its prefill fills the slot), ask
``other`` (a swap: the model stops, its slot saved when the store is on), then
ask the follow-up (a swap back: started, restored, answered).  The follow-up's
time to its first streamed token is what a user waits; its ``timings`` say how
much of the prompt the server evaluated again (``prompt_n``) and found in its
cache (``cache_n``).

What saving and restoring add to the swaps comes from llamaswap's live log
(``/logs/stream``, stamped on arrival by the bench): the save runs between the
scheduler's "swap to …: stopping kv-on" and the process's "stopping kv-on (swap, …)"
lines, the restore between "model kv-on ready" and "restored … tokens" lines;
the server's own save and restore times are in those lines too.  The same
intervals of ``kv-off`` are the baseline subtracted.  Two rounds (which model
goes first alternates); the targets take the median of the rounds, the worse
one of two.
"""

from __future__ import annotations

import http.client as httpclient
import json
import re
import time
from typing import Any

from .common import CpuMonitor, Llamaswap, Procs, config_text, log
from .proxy import free_port_base
from .report import f, table
from .swap import LogStream

TITLE = "## Conversations across swaps (KV cache saved and restored)"
ARGS = "--threads 2 --no-webui --parallel 1 --temp 0 --top-k 1 --seed 1"
MODELS = {
    "kv-on": f"{ARGS} --ctx-size 6144",
    "kv-off": f"{ARGS} --ctx-size 6144",
    "other": f"{ARGS} --ctx-size 1024",
}
KV_OFF = "    kvCache: false"
CONFIG_MODEL = """\
    cmd: >-
      "${{env.LLAMA_SERVER}}" --host 127.0.0.1 --port ${{PORT}} -m "${{env.LLAMASWAP_MODEL}}"
      {args}"""
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
SIZES = {"1k": 46, "4k": 200}  # ~22 tokens a sentence: about 1,000 and 4,400 tokens
QUICK_SIZES = {"300": 14}
TARGET_RATIO = 10.0  # at 4k+ tokens: the follow-up's first token that much sooner
TARGET_ADDED_MS = 150.0  # save + restore, added to the swaps


def history(sentences: int) -> str:
    """A long first message whose facts the follow-up asks about."""
    return " ".join(
        f"Note {i}: the {COLORS[i % len(COLORS)]} box holds {i * 3} marbles "
        f"and sits on shelf {i % 7}."
        for i in range(sentences)
    )


def stream_chat(port: int, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """A streamed chat: seconds to the first content token, the text, the timings."""
    body = json.dumps(
        {
            "model": model,
            "messages": messages,
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
        }
    ).encode()
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    timings: dict[str, Any] = {}
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{model}: HTTP {response.status} {response.read()[:300]!r}")
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content")
                if delta:
                    if first is None:
                        first = time.perf_counter()
                    text.append(delta)
            timings = chunk.get("timings") or timings
    finally:
        conn.close()
    end = time.perf_counter()
    return {
        "ttft_s": (first or end) - start,
        "total_s": end - start,
        "text": "".join(text),
        "prompt_n": timings.get("prompt_n"),
        "prompt_ms": timings.get("prompt_ms"),
        "cache_n": timings.get("cache_n"),
        # the whole prompt: what was evaluated and what the cache held
        "prompt_tokens": _int(timings.get("prompt_n")) + _int(timings.get("cache_n")),
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def case(swap: Llamaswap, stream: LogStream, model: str, sentences: int) -> dict[str, Any]:
    """Conversation on ``model``, a swap to ``other`` and back, the follow-up."""
    messages = [{"role": "user", "content": history(sentences) + " Which box is on shelf 3?"}]
    first = stream_chat(swap.port, model, messages)
    log(
        f"  {model}: conversation of {first['prompt_tokens']} tokens asked in "
        f"{first['total_s']:.1f} s"
    )
    t1 = time.perf_counter()
    stream_chat(swap.port, "other", [{"role": "user", "content": "Say hi."}])
    messages += [
        {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "And how many marbles does box 5 hold?"},
    ]
    t2 = time.perf_counter()
    follow = stream_chat(swap.port, model, messages)
    t3 = time.perf_counter()
    time.sleep(0.3)  # the log lines of the swap back
    q = re.escape(model)
    out: dict[str, Any] = {
        "model": model,
        "conversation_tokens": first["prompt_tokens"],
        "first_s": first["total_s"],
        "ttft_ms": follow["ttft_s"] * 1000,
        "prompt_n": follow["prompt_n"],
        "cache_n": follow["cache_n"],
        "prefill_ms": follow["prompt_ms"],
    }
    asked = stream.first(t1, t2, rf"swap to other: stopping .*{q}")
    stopping = stream.first(t1, t2, rf"stopping {q} \(swap[,)]")
    if asked and stopping:
        out["save_wall_ms"] = (stopping[0] - asked[0]) * 1000
    saved = stream.first(t1, t2, rf"model {q}: saved slot .* in (\d+) ms")
    if saved:
        out["save_server_ms"] = float(re.findall(r"in (\d+) ms", saved[1])[-1])
        size = re.search(r"tokens, ([^)]+)\)", saved[1])
        out["file"] = size.group(1) if size else None
    ready = stream.first(t2, t3, rf"model {q} ready in")
    restored = stream.first(t2, t3, rf"model {q}: restored .* in (\d+) ms")
    if restored:
        out["restore_server_ms"] = float(re.findall(r"in (\d+) ms", restored[1])[-1])
        if ready:
            out["restore_wall_ms"] = (restored[0] - ready[0]) * 1000
    log(
        f"  {model}: follow-up first token {out['ttft_ms']:.0f} ms "
        f"(prompt_n {out['prompt_n']}, cache_n {out['cache_n']})"
    )
    return out


def run(
    procs: Procs, monitor: CpuMonitor, *, quick: bool = False, rounds: int = 2
) -> dict[str, Any]:
    slots = procs.workdir / "kv-slots"
    bodies = {name: CONFIG_MODEL.format(args=args) for name, args in MODELS.items()}
    bodies["kv-off"] += "\n" + KV_OFF
    config = config_text(
        f"healthCheckTimeout: 120\nstartPort: {free_port_base() + 300}\n"
        f"kvCache:\n  path: {slots}\n",
        bodies,
    )
    swap = Llamaswap(procs, "llamaswap-kv", config).start()
    stream = LogStream(swap.port)
    stream.start()
    sizes = QUICK_SIZES if quick else SIZES
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for n in range(1, (1 if quick else rounds) + 1):
            for i, (label, sentences) in enumerate(sizes.items()):
                # which goes first alternates, so a disturbance hits both alike
                order = ["kv-on", "kv-off"] if (i + n) % 2 else ["kv-off", "kv-on"]
                for model in order:
                    monitor.wait_quiet()
                    log(f"kv: round {n}, {label} conversation on {model}")
                    begun = time.perf_counter()
                    result = case(swap, stream, model, sentences)
                    busy, _ = monitor.others(begun, time.perf_counter())
                    rows.append({"size": label, "round": n, **result, "others_cores": busy})
        others, steal = monitor.others(started, time.perf_counter())
    finally:
        stream.close()
        swap.stop()
    return {
        "rows": rows,
        "rounds": 1 if quick else rounds,
        "others_cores": others,
        "steal_cores": steal,
        "quick": quick,
    }


Pair = tuple[dict[str, Any], dict[str, Any]]


def _pairs(rows: list[dict[str, Any]]) -> dict[tuple[str, int], Pair]:
    """(size, round) → its kv-on and kv-off cases."""
    found: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for x in rows:
        found.setdefault((x["size"], x.get("round", 1)), {})[x["model"]] = x
    return {key: (c["kv-on"], c["kv-off"]) for key, c in found.items() if len(c) == 2}


def sooner(pair: Pair) -> float | None:
    on, off = pair
    return off["ttft_ms"] / on["ttft_ms"] if on.get("ttft_ms") else None


def added_ms(on: dict[str, Any], off: dict[str, Any]) -> float | None:
    """Wall time the save and the restore added to the two swaps (kv-off: the baseline)."""
    if "save_wall_ms" not in on or "restore_wall_ms" not in on:
        return None
    return on["save_wall_ms"] - off.get("save_wall_ms", 0.0) + on["restore_wall_ms"]


def render(k: dict[str, Any], machine: dict[str, Any] | None = None) -> str:
    """The docs section (starts with TITLE)."""
    out: list[str] = []
    add = out.append
    add(TITLE)
    add("")
    add(
        'Generated by `python -m bench --only kv` (`make bench BENCH_ARGS="--only kv"`; code in '
        "[`bench/kv.py`](../bench/kv.py))"
        + (f", run of {machine['date']}" if machine else "")
        + ". One llamaswap, real llama-server children, SmolLM2-135M under three ids: "
        "`kv-on` (`kvCache` on, the default) and `kv-off` (`kvCache: false`), both "
        "`--ctx-size 6144 --parallel 1`, and `other`. On each, side by side: a conversation "
        "(one long user message, greedy, 8 tokens answered), a request for `other` (a swap), "
        f"then the follow-up (a swap back); {k.get('rounds', 1)} rounds, which model goes "
        "first alternating. *First token* is from sending the follow-up to its first streamed "
        "token: it includes the swap back (stop `other`, start the model, "
        "restore) and the prefill; *evaluated*, *from cache* and *prefill* are the follow-up's "
        "`timings.prompt_n`, `timings.cache_n` and `timings.prompt_ms`; *other cores* is what "
        "other processes used during the case (the machine is shared: a prefill on 2 cores "
        "slows down in proportion). "
        f"Other cores over the whole run: {f(k.get('others_cores'))}."
        + (" **Quick mode: smoke-test numbers only.**" if k.get("quick") else "")
    )
    add("")
    pairs = _pairs(k["rows"])
    rows = []
    for x in k["rows"]:
        pair = pairs.get((x["size"], x.get("round", 1)))
        ratio = sooner(pair) if pair and x["model"] == "kv-on" else None
        rows.append(
            [
                str(x.get("round", 1)),
                f"{x['conversation_tokens']:,}" if x["conversation_tokens"] else "–",
                x["model"],
                f"{x['first_s']:.1f}",
                f"{x['ttft_ms']:,.0f}",
                f(x["prompt_n"]),
                f(x["cache_n"]),
                f(x.get("prefill_ms"), 0),
                f"{ratio:.1f}×" if ratio else "",
                f(x.get("others_cores")),
            ]
        )
    add(
        table(
            [
                "round",
                "conversation tokens",
                "model",
                "conversation asked in s",
                "follow-up first token ms",
                "evaluated",
                "from cache",
                "prefill ms (server)",
                "sooner",
                "other cores",
            ],
            rows,
        )
    )
    add("")
    rows = []
    for (_, n), (on, off) in pairs.items():
        added = added_ms(on, off)
        rows.append(
            [
                str(n),
                f"{on['conversation_tokens']:,}" if on["conversation_tokens"] else "–",
                on.get("file") or "–",
                f(on.get("save_server_ms"), 0),
                f(on.get("save_wall_ms"), 0),
                f(off.get("save_wall_ms"), 0),
                f(on.get("restore_server_ms"), 0),
                f(on.get("restore_wall_ms"), 0),
                f(added, 0),
            ]
        )
    add(
        "What saving and restoring cost, from llamaswap's log: *server* is what llama-server "
        "says the save or restore took; *llamaswap* is the wall time of the hook (the save "
        "from the swap's decision to the stop, asking `/props` and `/slots` included; the "
        "restore from the model's readiness to the restored slot); *kv-off* is the same "
        "interval without the store. *Added* = save − kv-off's + restore."
    )
    add("")
    add(
        table(
            [
                "round",
                "conversation tokens",
                "file",
                "save ms (server)",
                "save ms (llamaswap)",
                "kv-off ms",
                "restore ms (server)",
                "restore ms (llamaswap)",
                "added to the swaps ms",
            ],
            rows,
        )
    )
    add("")
    add(table(["target", "measured", "status"], targets(k)))
    add("")
    return "\n".join(out)


def targets(k: dict[str, Any]) -> list[list[str]]:
    """The issue's targets at the largest conversation measured: the median of its
    rounds (nearest rank: of two, the worse), each round's figure beside it."""
    pairs = _pairs(k["rows"])
    if not pairs:
        return []
    largest = list(pairs)[-1][0]
    chosen = [pair for (size, _), pair in pairs.items() if size == largest]
    tokens = chosen[0][0].get("conversation_tokens") or 0
    ratios = [r for r in (sooner(p) for p in chosen) if r is not None]
    added = [a for a in (added_ms(*p) for p in chosen) if a is not None]
    ratio = sorted(ratios)[(len(ratios) - 1) // 2] if ratios else None  # the lower median
    cost = sorted(added)[len(added) // 2] if added else None  # the higher median
    big = tokens >= 4000
    each = "; rounds: "
    return [
        [
            f"follow-up's first token ≥ {TARGET_RATIO:g}× sooner at ≥ 4k tokens",
            f"{f(ratio, 1)}× at {tokens:,} tokens"
            + (each + ", ".join(f"{r:.1f}×" for r in ratios) if len(ratios) > 1 else ""),
            _status(ratio is not None and ratio >= TARGET_RATIO, big),
        ],
        [
            f"save + restore add ≤ {TARGET_ADDED_MS:g} ms to the swaps",
            f"{f(cost, 0)} ms at {tokens:,} tokens"
            + (each + ", ".join(f"{a:.0f} ms" for a in added) if len(added) > 1 else ""),
            _status(cost is not None and cost <= TARGET_ADDED_MS, big),
        ],
    ]


def _status(ok: bool, applies: bool) -> str:
    if not applies:
        return "– (no 4k conversation in this run)"
    return "met" if ok else "**missed**"
