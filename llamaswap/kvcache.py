"""The KV store: conversations survive swaps.

Before a llama-server child is stopped (a swap, an idle timeout, an eviction,
shutdown), every slot that holds a worthwhile context is saved to disk with the
server's own ``POST /slots/{id}?action=save``; after the model starts again, the
saved states are restored (``?action=restore``) before its first request is
relayed, so the next message of a long chat does not pay the prefill of its
history again.

Saved states are keyed by the conversation their slot last served (a hash of
the message prefix llamaswap relayed), kept within a disk budget (least recently
used go first) and valid only for the same command, model file and server build:
anything else discards them.  Nothing here can make an answer wrong or a swap
hang: every call to the child has a timeout on the injected clock, a failure
costs only the attempt, and the scheduler's hooks never fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from . import webclient
from .config import Config, KvCacheConfig, ModelConfig
from .errors import ApiError
from .events import Activity, Event
from .lifecycle import ModelState, ModelView
from .logs import logger
from .relay import BytesProducer, Hop
from .resources import human
from .scheduler import IModelHooks

T = TypeVar("T")
DiskRunner = Callable[[Callable[[], T]], "Deferred[T]"]
"""Runs a small file operation off the reactor (a thread in production)."""

INDEX = "index.json"
SLOT_FILE = "slot-"  # how the names of llamaswap's own slot files begin
TAIL = 64  # characters of a conversation's last message that identify its slot
RECENT = 64  # conversations remembered per model


def run_here(work: Callable[[], T]) -> Deferred[T]:
    """A :data:`DiskRunner` that runs at once (tests, and startup)."""
    d: Deferred[T] = Deferred()
    try:
        d.callback(work())
    except Exception:
        d.errback(Failure())
    return d


@attrs.frozen
class Conversation:
    """What a request says about the conversation it belongs to.

    ``prefixes[i]`` hashes the first ``i + 1`` messages, so a request that
    continues a conversation holds the key of the one before it among them.
    ``tail`` is the end of its last message: how a slot's prompt is recognised.
    """

    prefixes: tuple[str, ...]
    tail: str

    @property
    def key(self) -> str:
        return self.prefixes[-1]

    @classmethod
    def of(cls, document: Mapping[str, Any]) -> Conversation | None:
        """The conversation of a chat (``messages``) or completion (``prompt``) body."""
        messages = document.get("messages")
        if isinstance(messages, list) and messages:
            prefixes = []
            digest = ""
            for message in messages:
                if not isinstance(message, dict):
                    return None
                part = json.dumps(
                    [message.get("role"), message.get("content")], sort_keys=True, default=str
                )
                digest = hashlib.sha256((digest + part).encode()).hexdigest()[:32]
                prefixes.append(digest)
            return cls(tuple(prefixes), _text(messages[-1].get("content"))[-TAIL:].strip())
        prompt = document.get("prompt")
        if isinstance(prompt, str) and prompt:
            return cls((hashlib.sha256(prompt.encode()).hexdigest()[:32],), prompt[-TAIL:].strip())
        return None


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part["text"]) for part in content if isinstance(part, dict) and "text" in part
        )
    return ""


@attrs.define
class SavedState:
    """One slot's KV cache on disk."""

    model: str
    directory: str
    filename: str
    fingerprint: str
    tokens: int
    bytes: int
    saved_at: float
    used_at: float
    key: str | None = None  # the conversation the slot last served

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.filename)


@attrs.define
class _Counts:
    saves: int = 0
    restores: int = 0
    failures: int = 0
    skipped: int = 0  # saves given up at the time bound
    saved_bytes: int = 0
    restored_bytes: int = 0
    cached_tokens: int = 0  # prompt tokens the server did not evaluate after a restore


class SlotError(Exception):
    """A call to the child's slot API did not work."""


class ChildLost(SlotError):
    """The child went away while a saved state was restored into it (llama-server
    aborts on a damaged slot file)."""


@implementer(IModelHooks)
class KvStore:
    """Owner of the saved states and of the slot calls to llama-server children."""

    log = logger()

    def __init__(
        self,
        config: Config,
        agent: IAgent,
        clock: IReactorTime,
        disk: DiskRunner[Any] = run_here,
        hop: Hop | None = None,
    ) -> None:
        self.config = config
        self._agent = agent
        self._clock = clock
        self._disk = disk
        self._hop = hop
        self.states: list[SavedState] = []
        self.counts: dict[str, _Counts] = {}
        self._recent: dict[str, deque[Conversation]] = {}
        # per child (model id, start time): its fingerprint, and its restore
        self._fingerprints: dict[_Child, str] = {}
        self._restoring: dict[_Child, Deferred[bool]] = {}
        self._pending_cache: dict[str, int] = {}  # requests after a restore to count
        # models whose last child died restoring: their next one starts with nothing
        self._plain_next: set[str] = set()
        self._index_lock = DeferredLock()  # one index write at a time, in order
        self._index_written: str | None = None  # what the index file holds, once known
        # models whose slot directory holds no stray file of ours: swept since their
        # last save request (a stop with nothing to save then costs no disk work)
        self._swept: set[str] = set()
        self._load_index()
        self.ensure_directories()

    @property
    def settings(self) -> KvCacheConfig:
        return self.config.kv_cache

    # --- what others tell us ----------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.ensure_directories()

    def ensure_directories(self) -> None:
        """llama-server refuses to start with a ``--slot-save-path`` that is not a
        directory: create each model's (once per configuration; it is quick)."""
        for model in self.config.models.values():
            self._ensure_directory(model)

    def _ensure_directory(self, model: ModelConfig) -> None:
        if model.slot_save_path is None:
            return
        try:
            if model.slot_save_added:  # conversations: for llamaswap's user only
                os.makedirs(self.settings.path, mode=0o700, exist_ok=True)
            os.makedirs(model.slot_save_path, mode=0o700, exist_ok=True)
        except OSError as e:
            self.log.error(
                "model {model}: cannot create its slot directory {path} ({error}); "
                "its server may refuse to start: set kvCache.path or kvCache: false",
                model=model.id,
                path=model.slot_save_path,
                error=e,
            )

    def before_start(self, process: ModelView) -> None:
        """The slot directory again, in case it was removed since (a state-directory
        cleaner, a user): llama-server would refuse to start without it."""
        model = self._model(process.id)
        if model is not None:
            self._ensure_directory(model)

    def note(self, model_id: str, conversation: Conversation | None) -> None:
        """A request for ``model_id`` arrived (its body parsed once, by the API)."""
        if conversation is None or self._model(model_id) is None:
            return
        recent = self._recent.setdefault(model_id, deque(maxlen=RECENT))
        with contextlib.suppress(ValueError):
            recent.remove(conversation)
        recent.appendleft(conversation)

    def observe(self, event: Event) -> None:
        """Count the prompt tokens restored slots spared (``timings.cache_n``)."""
        if not isinstance(event, Activity):
            return
        model = event.row.get("model")
        cache_n = event.row.get("cache_n")
        if not isinstance(model, str) or not self._pending_cache.get(model):
            return
        if isinstance(cache_n, int) and cache_n > 0:
            self._pending_cache[model] -= 1
            self._counts(model).cached_tokens += cache_n

    def check_client_slot_action(self, model: ModelConfig, actions: Sequence[str]) -> None:
        """Clients may not save or restore slots in the directory llamaswap added:
        its files are within llamaswap's disk budget and hold others' conversations.

        ``actions``: every ``action`` the query gives (llama-server acts on the last).
        """
        if model.slot_save_added and {"save", "restore"} & set(actions):
            raise ApiError(
                403,
                f"model {model.id!r}: slots are saved and restored by llamaswap (kvCache); "
                "give the model its own --slot-save-path to manage slot files yourself",
                "slot_action_forbidden",
            )

    # --- the hooks ----------------------------------------------------------------

    def before_stop(self, process: ModelView, reason: str) -> Deferred[bool]:
        """Save the worthwhile slots of a ready child; within ``timeout``; never fails.
        False when a save was still running in the child at the timeout."""
        model = self._model(process.id)
        if (
            model is None
            or process.state is not ModelState.READY
            or (reason == "shutdown" and not self.settings.save_on_shutdown)
        ):
            return succeed(True)
        self._ensure_directory(model)  # removed while it ran: the server could not save
        saving = Deferred.fromCoroutine(self._save_all(process, model))
        return self._bounded(saving, process.id, "saving")

    def after_start(self, process: ModelView) -> Deferred[bool]:
        """Restore saved states into a child that just became ready, once per child;
        False if the child died of it (the scheduler starts it again, plainly)."""
        model = self._model(process.id)
        if model is None or process.state is not ModelState.READY:
            return succeed(True)
        child = _child(process)
        restoring = self._restoring.get(child)
        if restoring is None:
            lost: list[Failure] = []

            def note_lost(failure: Failure) -> Failure:
                if failure.check(ChildLost):
                    lost.append(failure)
                return failure

            work = Deferred.fromCoroutine(self._restore_all(process, model))
            work.addErrback(note_lost)
            bounded = self._bounded(work, process.id, "restoring")
            restoring = self._restoring[child] = bounded.addCallback(lambda _: not lost)
            for old in [c for c in self._restoring if c[0] == process.id and c != child]:
                del self._restoring[old]
        # each caller gets its own Deferred: the shared one keeps its result
        follower: Deferred[bool] = Deferred()

        def fire(result: bool) -> bool:
            follower.callback(result)
            return result

        restoring.addBoth(fire)
        return follower

    def _bounded(self, work: Deferred[None], model_id: str, what: str) -> Deferred[bool]:
        """``work`` within ``timeout``, never failing: False when it timed out (what it
        asked of the child may still be running there)."""
        timeout = self.settings.timeout

        def settle(result: object) -> bool:
            if not isinstance(result, Failure):
                return True
            counts = self._counts(model_id)
            timed_out = bool(result.check(defer.TimeoutError))
            if timed_out:
                counts.skipped += 1
                why = f"took longer than kvCache.timeout ({timeout:g}s)"
            else:
                counts.failures += 1
                why = f"failed ({result.getErrorMessage() or repr(result.value)})"
            self.log.warn(
                "model {model}: {what} its slots {why}; skipped, the swap goes on",
                model=model_id,
                what=what,
                why=why,
            )
            return not timed_out

        work.addTimeout(timeout, self._clock)
        return work.addBoth(settle)

    # --- saving -----------------------------------------------------------------------

    async def _save_all(self, process: ModelView, model: ModelConfig) -> None:
        directory = model.slot_save_path
        assert directory is not None
        status, slots = await self._call(process, b"GET", "/slots")
        if status != 200 or not isinstance(slots, list):
            raise SlotError(f"GET /slots answered {status}")
        worth = [
            slot
            for slot in slots
            if isinstance(slot, dict)
            and not slot.get("is_processing")
            and isinstance(slot.get("n_prompt_tokens"), int)
            and slot["n_prompt_tokens"] >= self.settings.min_tokens
        ]
        # the child's fingerprint (a /props call) only when something is saved
        fingerprint = await self._fingerprint(process, model) if worth else ""
        recent = list(self._recent.get(model.id, ()))
        for slot in worth:
            conversation = _served(slot.get("prompt"), recent)
            if conversation is not None:
                recent.remove(conversation)
            await self._save(process, model, directory, fingerprint, slot["id"], conversation)
        await self._enforce_budget()
        if model.slot_save_added and model.id not in self._swept:
            await self._sweep(model.id, directory)

    async def _save(
        self,
        process: ModelView,
        model: ModelConfig,
        directory: str,
        fingerprint: str,
        slot_id: object,
        conversation: Conversation | None,
    ) -> None:
        filename = f"{SLOT_FILE}{secrets.token_hex(8)}.bin"
        self._swept.discard(model.id)  # the file may outlive a save given up
        status, answer = await self._call(
            process, b"POST", f"/slots/{slot_id}?action=save", {"filename": filename}
        )
        counts = self._counts(model.id)
        if status != 200 or not isinstance(answer, dict):
            self._refused(model.id, f"saving slot {slot_id} failed", status, answer)
            self._delete([SavedState(model.id, directory, filename, "", 0, 0, 0, 0)])
            return
        now = self._clock.seconds()
        state = SavedState(
            model=model.id,
            directory=directory,
            filename=filename,
            fingerprint=fingerprint,
            tokens=_int(answer.get("n_saved")),
            bytes=_int(answer.get("n_written")),
            saved_at=now,
            used_at=now,
            key=conversation.key if conversation is not None else None,
        )
        if conversation is not None:
            # the conversation grew: its shorter saved states are of no more use
            older = set(conversation.prefixes)
            self._delete([s for s in self.states if s.model == model.id and s.key in older])
        self.states.append(state)
        counts.saves += 1
        counts.saved_bytes += state.bytes
        self.log.info(
            "model {model}: saved slot {slot} ({tokens} tokens, {size}) in {ms:.0f} ms",
            model=model.id,
            slot=slot_id,
            tokens=state.tokens,
            size=human(state.bytes),
            ms=_server_ms(answer, "save_ms"),
        )

    async def _enforce_budget(self) -> None:
        """Least recently used states go until each model and the whole fit."""
        doomed: list[SavedState] = []
        keep = sorted(self.states, key=lambda s: s.used_at, reverse=True)
        per_model: dict[str, int] = {}
        total = 0
        for state in keep:
            used = per_model.get(state.model, 0)
            if (
                used + state.bytes > self.settings.max_bytes_per_model
                or total + state.bytes > self.settings.max_bytes
            ):
                doomed.append(state)
                continue
            per_model[state.model] = used + state.bytes
            total += state.bytes
        self._delete(doomed)
        await self._save_index()

    async def _sweep(self, model_id: str, directory: str) -> None:
        """Slot files of ours that no state names: a save given up at the time bound
        that the server finished anyway, or an index lost in a crash."""
        known = {s.filename for s in self.states if s.model == model_id}
        self._swept.add(model_id)

        def remove() -> int:
            removed = 0
            for name in os.listdir(directory):
                if name.startswith(SLOT_FILE) and name not in known:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
                        removed += 1
            return removed

        try:
            removed = await self._disk(remove)
        except OSError as e:
            self._swept.discard(model_id)
            self.log.warn("cannot tidy {path}: {error}", path=directory, error=e)
            return
        if removed:
            self.log.info("model {model}: removed {n} stray slot files", model=model_id, n=removed)

    # --- restoring ----------------------------------------------------------------------

    async def _restore_all(self, process: ModelView, model: ModelConfig) -> None:
        mine = [s for s in self.states if s.model == model.id]
        if model.id in self._plain_next:
            self._plain_next.discard(model.id)
            if mine:
                self.log.info(
                    "model {model}: its last server died restoring a saved slot; this one "
                    "starts without restoring any ({count} kept for later starts)",
                    model=model.id,
                    count=len(mine),
                )
            return
        if not mine:
            return
        fingerprint = await self._fingerprint(process, model)
        stale = [s for s in mine if s.fingerprint != fingerprint]
        if stale:
            self.log.info(
                "model {model}: {count} saved slots were made by another command, model "
                "file or server build; discarded",
                model=model.id,
                count=len(stale),
            )
            self._delete(stale)
            mine = [s for s in mine if s.fingerprint == fingerprint]
        status, slots = await self._call(process, b"GET", "/slots")
        if status != 200 or not isinstance(slots, list):
            raise SlotError(f"GET /slots answered {status}")
        idle = [s["id"] for s in slots if isinstance(s, dict) and not s.get("is_processing")]
        chosen = _choose(mine, list(self._recent.get(model.id, ())), len(idle))
        restored = 0
        for slot_id, state in zip(idle, chosen, strict=False):
            restored += await self._restore(process, slot_id, state)
        if restored:
            self._pending_cache[model.id] = restored
        await self._save_index()

    async def _restore(self, process: ModelView, slot_id: object, state: SavedState) -> int:
        try:
            status, answer = await self._call(
                process, b"POST", f"/slots/{slot_id}?action=restore", {"filename": state.filename}
            )
        except defer.CancelledError:
            raise  # the time bound: the file may be good, only big
        except Exception as e:
            # the child went away reading it: llama-server aborts on a damaged slot
            # file, and restoring it again at each start would crash-loop the model;
            # the request waiting for it is served by a plain start of a new one
            self._delete([state])
            self._plain_next.add(state.model)
            raise ChildLost(f"the server went away restoring a saved slot ({e})") from e
        counts = self._counts(state.model)
        if status != 200 or not isinstance(answer, dict):
            # refused (a full context, a damaged file): the slot starts empty, as it
            # would have anyway; the state is of no use any more
            self._refused(state.model, "restoring a saved slot was refused", status, answer)
            self._delete([state])
            return 0
        state.used_at = self._clock.seconds()
        counts.restores += 1
        counts.restored_bytes += _int(answer.get("n_read"))
        self.log.info(
            "model {model}: restored {tokens} tokens into slot {slot} in {ms:.0f} ms",
            model=state.model,
            tokens=_int(answer.get("n_restored")),
            slot=slot_id,
            ms=_server_ms(answer, "restore_ms"),
        )
        return 1

    def _refused(self, model_id: str, what: str, status: int, answer: object) -> None:
        self._counts(model_id).failures += 1
        self.log.warn(
            "model {model}: {what} ({status}: {answer}); discarded",
            model=model_id,
            what=what,
            status=status,
            answer=answer,
        )

    # --- validity -------------------------------------------------------------------------

    async def _fingerprint(self, process: ModelView, model: ModelConfig) -> str:
        """Same command, same model file (size, mtime), same server build."""
        child = _child(process)
        known = self._fingerprints.get(child)
        if known is not None:
            return known
        status, props = await self._call(process, b"GET", "/props")
        if status != 200 or not isinstance(props, dict):
            raise SlotError(f"GET /props answered {status}")
        model_path = props.get("model_path")
        stat: list[int] = []
        if isinstance(model_path, str) and model_path:
            stat = await self._disk(lambda: _stat(model_path))
        parts = [list(model.cmd.argv), props.get("build_info"), model_path, stat]
        fingerprint = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]
        self._fingerprints = {c: f for c, f in self._fingerprints.items() if c[0] != process.id}
        self._fingerprints[child] = fingerprint
        return fingerprint

    # --- the child's HTTP API ---------------------------------------------------------------

    async def _call(
        self, process: ModelView, method: bytes, path: str, body: object = None
    ) -> tuple[int, Any]:
        headers = Headers({b"content-type": [b"application/json"]})
        if self._hop is not None:
            self._hop.mark(headers)
        key = process.config.upstream_api_key
        if key is not None:
            headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode()])
        producer = BytesProducer(json.dumps(body).encode()) if body is not None else None
        url = (process.base_url + path).encode("ascii")
        response = await self._agent.request(method, url, headers, producer)
        raw = await webclient.readBody(response)
        try:
            return response.code, json.loads(raw)
        except ValueError:
            return response.code, raw[:200].decode("utf-8", errors="replace")

    # --- bookkeeping -----------------------------------------------------------------------

    def _model(self, model_id: str) -> ModelConfig | None:
        model = self.config.models.get(model_id)
        return model if model is not None and model.slot_save_path is not None else None

    def _counts(self, model_id: str) -> _Counts:
        return self.counts.setdefault(model_id, _Counts())

    def _delete(self, states: list[SavedState]) -> None:
        if not states:
            return
        gone = {id(s) for s in states}
        self.states = [s for s in self.states if id(s) not in gone]
        paths = [s.path for s in states]

        def unlink() -> None:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

        self._disk(unlink).addErrback(lambda f: self.log.failure("deleting saved slots", f))

    def _index_path(self) -> Path:
        return Path(self.settings.path) / INDEX

    def _load_index(self) -> None:
        """At startup (before the reactor runs): what earlier runs saved and is still there."""
        path = self._index_path()
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError("not a list")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            self.log.warn("ignoring the saved slot index {path}: {error}", path=path, error=e)
            return
        states = [state for state in map(_indexed, rows) if state is not None]
        if len(states) < len(rows):
            self.log.warn(
                "ignoring {n} damaged entries of the saved slot index {path}",
                n=len(rows) - len(states),
                path=path,
            )
        self.states = [s for s in states if os.path.exists(s.path)]

    async def _save_index(self) -> None:
        """Write what is saved now (models may be stopped, so saved, concurrently);
        nothing when the file already says it (most stops save nothing)."""
        path = self._index_path()
        text = json.dumps([attrs.asdict(s) for s in self.states])

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)

        try:
            async with self._index_lock:
                if text == self._index_written:
                    return
                self._index_written = None  # unknown while it is being replaced
                await self._disk(write)
                self._index_written = text
        except OSError as e:
            self.log.warn("cannot write the saved slot index {path}: {error}", path=path, error=e)

    # --- what others may look at -----------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Saved states for ``/running``: newest first."""
        now = self._clock.seconds()
        return [
            {
                "model": s.model,
                "tokens": s.tokens,
                "bytes": s.bytes,
                "age": round(now - s.saved_at, 3),
                "last_used": s.used_at,
                "conversation": s.key is not None,
            }
            for s in sorted(self.states, key=lambda s: s.saved_at, reverse=True)
        ]

    def collector(self) -> Collector:
        return _KvMetrics(self)


_Child = tuple[str, int | None, float | None]

_INDEX_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("model", "directory", "filename", "fingerprint"), str),
    **dict.fromkeys(("tokens", "bytes"), int),
    **dict.fromkeys(("saved_at", "used_at"), (int, float)),
    "key": (str, type(None)),
}


def _indexed(row: object) -> SavedState | None:
    """A row of the index as a state, unless damaged (a hand edit, another version):
    a wrong type would break the disk budget at every save, and a file name that is
    not one of llamaswap's slot files could make it delete another file."""
    if not isinstance(row, dict) or set(row) - {"key"} != set(_INDEX_TYPES) - {"key"}:
        return None
    if not all(isinstance(row.get(name), kind) for name, kind in _INDEX_TYPES.items()):
        return None
    filename = row["filename"]
    if os.path.basename(filename) != filename or not filename.startswith(SLOT_FILE):
        return None
    return SavedState(**row)


def _child(process: ModelView) -> _Child:
    """One spawned child of a model (a pid is not reused within one start time)."""
    return (process.id, process.pid, process.started_at)


def _served(prompt: object, recent: list[Conversation]) -> Conversation | None:
    """The most recent conversation whose last message the slot's prompt holds."""
    if not isinstance(prompt, str):
        return None
    return next((c for c in recent if c.tail and c.tail in prompt), None)


def _choose(states: list[SavedState], recent: list[Conversation], room: int) -> list[SavedState]:
    """Up to ``room`` states: those continued by the latest requests first (the
    longest matching prefix), then the most recently used."""
    chosen: list[SavedState] = []
    for conversation in recent:
        position = {key: i for i, key in enumerate(conversation.prefixes)}
        matching = [s for s in states if s.key in position and s not in chosen]
        if matching:
            chosen.append(max(matching, key=lambda s: position[s.key or ""]))
    rest = sorted((s for s in states if s not in chosen), key=lambda s: s.used_at, reverse=True)
    return (chosen + rest)[:room]


def _stat(path: str) -> list[int]:
    try:
        info = os.stat(path)
    except OSError:
        return []
    return [info.st_size, info.st_mtime_ns]


def _server_ms(answer: Mapping[str, Any], key: str) -> float:
    """What llama-server says the save or restore took."""
    timings = answer.get("timings")
    value = timings.get(key) if isinstance(timings, dict) else None
    return float(value) if isinstance(value, int | float) else 0.0


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_COUNTERS = (
    ("saves", "llamaswap_kv_saves", "Slots saved before a stop"),
    ("restores", "llamaswap_kv_restores", "Slots restored after a start"),
    ("failures", "llamaswap_kv_failures", "Saves or restores that did not work"),
    ("skipped", "llamaswap_kv_timeouts", "Saves or restores given up at kvCache.timeout"),
    ("saved_bytes", "llamaswap_kv_saved_bytes", "Bytes of slots written"),
    ("restored_bytes", "llamaswap_kv_restored_bytes", "Bytes of slots read back"),
    (
        "cached_tokens",
        "llamaswap_kv_restored_prompt_tokens",
        "Prompt tokens not evaluated again thanks to a restore (timings.cache_n)",
    ),
)


class _KvMetrics(Collector):
    """Saves, restores, bytes and spared prompt tokens, per model, at scrape time."""

    def __init__(self, store: KvStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        families = {
            field: CounterMetricFamily(name, text, labels=["model"])
            for field, name, text in _COUNTERS
        }
        for model, counts in sorted(self.store.counts.items()):
            for name, family in families.items():
                family.add_metric([model], getattr(counts, name))
        stored = GaugeMetricFamily(
            "llamaswap_kv_stored_bytes", "Bytes of saved slots on disk", labels=["model"]
        )
        totals: dict[str, int] = {}
        for state in self.store.states:
            totals[state.model] = totals.get(state.model, 0) + state.bytes
        for model, total in sorted(totals.items()):
            stored.add_metric([model], total)
        yield from families.values()
        yield stored
