"""Model folders: every GGUF file in a folder becomes a model, no YAML entry needed.

A scan (``modelsDir`` in the config, ``--models-dir`` on the command line) finds

- ``NAME.gguf``: the model ``NAME``;
- ``NAME-00001-of-0000N.gguf`` … (beside each other): one model ``NAME``;
- a sub-folder ``NAME/`` holding one model (a file, or its shards) and/or a vision
  projector ``mmproj*.gguf``: the model ``NAME``, started with ``--mmproj``.

Each found model becomes an ordinary model entry (the ``modelDefaults`` command
template with ``${MODEL_PATH}`` and ``${MMPROJ}`` filled in), validated by
:mod:`llamaswap.config` exactly like a YAML entry; its header facts (see
:mod:`llamaswap.gguf_models`) size its memory and mark its capabilities.  A file
that cannot be read is skipped with one clear notice; the rest is served.  The
folders are listed, and the headers read, in daemon threads with a deadline (see
:class:`Listings`, :class:`HeaderReads`): a hung network mount costs a load seconds,
never the whole of it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, Generic, TypeVar

import attrs

from .gguf_models import (
    Estimate,
    GgufError,
    GgufFacts,
    cached_paths,
    estimate,
    forget,
    read_facts,
)

#: the command when ``modelDefaults.cmd`` is not given; ``{server}`` is the llama-server found
DEFAULT_TEMPLATE = (
    "{server} --host 127.0.0.1 --port ${{PORT}} --alias ${{MODEL_ID}}"
    " -m ${{MODEL_PATH}} ${{MMPROJ}}"
)
#: seconds loading a configuration waits for the header of a model file named in a
#: command; then the model is served with its facts unknown
HEADER_WAIT = 10.0
#: seconds one scan of the models folders (or one look of the folder watch) waits for
#: the listings of all of them together; then it goes on without those not listed
LIST_WAIT = 10.0
_reading: dict[str, Future[GgufFacts | None]] = {}  # reads not over yet, hung ones too
_listing: dict[str, Future[Walk]] = {}  # listings not over yet, hung ones too
_pending_lock = threading.Lock()  # over both
T = TypeVar("T")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_EMBEDDING_FLAGS = ("--embedding", "--embeddings")
_RERANK_FLAGS = ("--rerank", "--reranking")


@attrs.frozen
class ModelDefaults:
    """``modelDefaults``: how a found model is run."""

    cmd: str | None = None  # a template; None: the built-in one
    args: tuple[tuple[str, str], ...] = ()  # (glob on the model id, extra arguments)
    entry: Mapping[str, Any] = attrs.field(factory=dict)  # other model keys (ttl, env)


#: a folder's visible ``*.gguf`` files and its sub-folders, sorted, as full paths
FolderListing = tuple[list[str], list[str]]
#: a file's version: (path, mtime in ns, size, inode)
Stamp = tuple[str, int, int, int]


@attrs.frozen
class Walk:
    """What a models folder holds: its own ``*.gguf`` files, and those of each sub-folder."""

    files: list[str]
    subfolders: dict[str, list[str]]  # sorted
    stamps: tuple[Stamp, ...] = ()  # of each of its files still there to ``stat``

    @property
    def all_files(self) -> list[str]:
        return self.files + [f for inner in self.subfolders.values() for f in inner]


@attrs.frozen
class FoundModel:
    """One model found in a folder, with what its files say."""

    id: str
    path: str  # the file or folder it came from (for notices)
    weights: tuple[str, ...]  # the file, or its shards in order
    facts: GgufFacts | None  # None: its header did not arrive in time
    mmproj: str | None = None
    mmproj_bytes: int = 0


@attrs.frozen
class _Candidate:
    """A model-looking thing in a folder, before its header is read."""

    id: str
    path: str
    weights: tuple[str, ...]
    mmproj: str | None


@attrs.frozen
class Scan:
    models: tuple[FoundModel, ...]
    notices: tuple[str, ...]


def llama_server(environ: Mapping[str, str]) -> str:
    """The llama-server to run: ``$LLAMA_SERVER``, else the one on PATH."""
    return (
        environ.get("LLAMA_SERVER")
        or shutil.which("llama-server", path=environ.get("PATH"))
        or "llama-server"
    )


def scan(folders: Sequence[str]) -> Scan:
    """Find the models in ``folders`` (lists them and reads each new file's header
    in threads of their own, waiting for them: call off the reactor)."""
    models: dict[str, FoundModel] = {}
    notices: list[str] = []
    listings = Listings(folders)
    found_in = partial(_candidates, listings=listings, notices=notices)
    candidates = [c for f in folders for c in found_in(f) if _well_named(c, notices)]
    headers = HeaderReads(
        path for c in candidates for path in (c.weights[0], c.mmproj) if path is not None
    )
    for candidate in candidates:
        if candidate.id in models:
            notices.append(
                f"{candidate.path}: skipped: the id {candidate.id!r} is already "
                f"{models[candidate.id].path}"
            )
            continue
        found = _read(candidate, headers, notices)
        if found is not None:
            models[candidate.id] = found
    seen = {p for m in models.values() for p in (*m.weights, m.mmproj) if p}
    # gone: not in its folder's listing (an exists() would hang on a mount dead since)
    listed = tuple(os.path.join(f, "") for f in folders if f not in listings.unlisted)
    forget(
        [
            p
            for p in cached_paths()
            if p.startswith(listed) and p not in seen and p not in listings.files
        ]
    )
    return Scan(tuple(models.values()), tuple(notices))


def entry(found: FoundModel, defaults: ModelDefaults, environ: Mapping[str, str]) -> dict[str, Any]:
    """The model entry for ``found``, as if written under ``models`` in the file."""
    template = defaults.cmd or DEFAULT_TEMPLATE.format(server=shlex.quote(llama_server(environ)))
    mmproj = f"--mmproj {shlex.quote(found.mmproj)}" if found.mmproj else ""
    lines = [
        template.replace("${MODEL_PATH}", shlex.quote(found.weights[0])).replace(
            "${MMPROJ}", mmproj
        )
    ]
    lines += [extra for pattern, extra in defaults.args if fnmatch.fnmatchcase(found.id, pattern)]
    written = " ".join(lines).split()
    wanted = {"embeddings": _EMBEDDING_FLAGS, "rerank": _RERANK_FLAGS}
    for capability in found.facts.capabilities if found.facts else ():
        flags = wanted.get(capability)
        if flags and not any(flag in written for flag in flags):
            lines.append(flags[0])
    # one argument group per line: a template ending in a comment line stays harmless
    return {**defaults.entry, "cmd": "\n".join(lines)}


def capabilities(facts: GgufFacts, argv: Sequence[str]) -> tuple[str, ...]:
    """What a client can ask of a model: the file's kind, unless the command says otherwise."""
    if any(flag in argv for flag in _RERANK_FLAGS):
        return ("rerank",)
    if any(flag in argv for flag in _EMBEDDING_FLAGS):
        return ("embeddings",)
    return facts.capabilities


def described(
    facts: GgufFacts | None, argv: Sequence[str], found: FoundModel | None
) -> dict[str, Any]:
    """What ``/v1/models`` shows of a model's file: facts, files, capabilities, the
    estimate (the files alone when its facts are unknown)."""
    info: dict[str, Any] = {}
    if facts is not None:
        sizing: Estimate = estimate(facts, argv, found.mmproj_bytes if found else 0)
        info = {
            **facts.describe(),
            "capabilities": list(capabilities(facts, argv)),
            "estimate": sizing.describe(),
        }
    if found is not None:
        info["files"] = list(found.weights)
        if found.mmproj:
            info["mmproj"] = found.mmproj
    return info


def weights_in(argv: Sequence[str]) -> str | None:
    """The local ``.gguf`` a hand-written command loads (``-m PATH``), if any."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-m", "--model") and argv[i + 1].lower().endswith(".gguf"):
            return argv[i + 1]
    for arg in argv:
        name, _, value = arg.partition("=")
        if name == "--model" and value.lower().endswith(".gguf"):
            return value
    return None


class _Together(Generic[T]):
    """Work begun at once (each in a thread of its own) and waited for with one
    deadline for all of it: ``wait`` seconds from now."""

    def __init__(self, wait: float, outcomes: dict[str, Future[T]]) -> None:
        self._deadline = time.monotonic() + wait
        self._outcomes = outcomes

    def result(self, key: str) -> T:
        """``key``'s outcome; TimeoutError once the deadline has passed without it."""
        timeout = max(0.0, self._deadline - time.monotonic())
        return self._outcomes[key].result(timeout=timeout)


class HeaderReads:
    """The header reads of the model files found in the folders by one scan, or
    named in commands by one load of a configuration (at start; in the reactor's
    threads on a reload).

    All are begun at once, each in a thread of its own, and the load waits at most
    ``HEADER_WAIT`` seconds for all of them together: files on a hung network mount
    leave their threads stuck, not the load (once per model, ten models would hold
    it 100 s) nor the reactor's thread pool; later loads do not wait for a file
    whose read is still stuck.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        self._reads = _Together(HEADER_WAIT, {path: _begin(path) for path in dict.fromkeys(paths)})

    def facts_of(self, path: str) -> GgufFacts | None:
        """Facts of ``path`` (its shards too; begun by this load); None when there is
        no such file; raises GgufError."""
        try:
            return self._reads.result(path)
        except TimeoutError:
            raise HeaderLate(
                f"its header did not arrive within {HEADER_WAIT:g}s (a hung network mount?)"
            ) from None


class HeaderLate(GgufError):
    """A header not read in time: the file may be fine, its mount is not answering."""


def _begin(path: str) -> Future[GgufFacts | None]:
    """A read of ``path``'s facts, begun in a thread of its own (or failed at once
    when an earlier load's read of it is not over)."""
    busy = HeaderLate("its header is still being read since an earlier load (a hung mount?)")
    return _in_own_thread(_reading, path, lambda: _facts_of(path), busy)


def _in_own_thread(
    pending: dict[str, Future[T]], key: str, work: Callable[[], T], busy: Exception
) -> Future[T]:
    """``work`` run in a daemon thread of its own, its outcome in the future returned;
    failed at once with ``busy`` while the earlier work for ``key`` (in ``pending``)
    is not over: a file or folder on a hung mount holds one thread, not one per load."""
    outcome: Future[T] = Future()
    with _pending_lock:
        if key in pending:
            outcome.set_exception(busy)
            return outcome
        pending[key] = outcome

    def run() -> None:
        try:
            result = work()
        except BaseException as e:  # handed to the waiter
            with _pending_lock:  # before the waiter wakes: the next load may begin it again
                del pending[key]
            outcome.set_exception(e)
            return
        with _pending_lock:
            del pending[key]
        outcome.set_result(result)

    # a daemon thread: work that never returns must not keep the process alive
    threading.Thread(target=run, name=f"llamaswap {key}", daemon=True).start()
    return outcome


def _facts_of(path: str) -> GgufFacts | None:
    if not os.path.exists(path):
        return None
    match = _SHARD.match(os.path.basename(path))
    if match is None:
        return read_facts([path])
    folder = os.path.dirname(path)
    stem, count = match["stem"], int(match["count"])
    return read_facts(
        [os.path.join(folder, f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    )


# --- the folder -------------------------------------------------------------------


def _candidates(folder: str, listings: Listings, notices: list[str]) -> list[_Candidate]:
    """Each model-looking thing in ``folder``."""
    found: list[_Candidate] = []
    files, subfolders = (walk := listings.of(folder, notices)).files, walk.subfolders
    projectors = [f for f in files if _is_projector(f)]
    if projectors:
        notices.append(
            f"{folder}: projector files beside many models are ignored "
            f"({', '.join(os.path.basename(p) for p in projectors)}); put each vision "
            "model and its mmproj file in a folder of their own"
        )
    for model_id, weights in _models_among([f for f in files if not _is_projector(f)], notices):
        found.append(_Candidate(model_id, weights[0], weights, None))
    for sub, inner in subfolders.items():
        models = _models_among([f for f in inner if not _is_projector(f)], notices)
        mmprojs = [f for f in inner if _is_projector(f)]
        if not models:
            continue
        if len(models) > 1:
            notices.append(
                f"{sub}: skipped: it holds several models "
                f"({', '.join(m for m, _ in models)}); give each a folder of its own, or "
                "put them in the models folder itself"
            )
            continue
        if len(mmprojs) > 1:
            notices.append(f"{sub}: several projector files; using {mmprojs[0]}")
        found.append(
            _Candidate(os.path.basename(sub), sub, models[0][1], mmprojs[0] if mmprojs else None)
        )
    return found


class Listings:
    """The listings of models folders for one scan (or one look of the folder watch).

    Each folder is walked (listed, then its sub-folders) in a daemon thread of its
    own, all begun at once, and all of them together are waited for at most
    ``LIST_WAIT`` seconds: a folder on a hung network mount (its ``scandir`` never
    returns) costs the load that long once, then the load goes on without it; while
    that walk is stuck, later loads do not wait for it again nor begin another.
    """

    def __init__(self, folders: Iterable[str]) -> None:
        busy = _Unlisted("it is still being listed since an earlier load")
        self._walks = _Together(
            LIST_WAIT,
            {
                folder: _in_own_thread(_listing, folder, partial(_walk, folder), busy)
                for folder in dict.fromkeys(folders)
            },
        )
        self.unlisted: list[str] = []  # the folders left out, in the order asked for
        self.files: set[str] = set()  # the files of the folders listed so far

    def of(self, folder: str, notices: list[str]) -> Walk:
        """What ``folder`` holds; nothing (said in ``notices``) if not listed in time."""
        try:
            walk = self._walks.result(folder)
            self.files.update(walk.all_files)
            return walk
        except TimeoutError:
            why = f"it was not listed within {LIST_WAIT:g}s"
        except _Unlisted as e:
            why = str(e)
        self.unlisted.append(folder)
        notices.append(
            f"{folder}: left out: {why} (a hung network mount?); its models are not "
            "served until a reload can list it"
        )
        return Walk([], {})


def _walk(folder: str) -> Walk:
    files, subfolders = listing(folder)
    walk = Walk(files, {sub: listing(sub)[0] for sub in subfolders})
    # stamped here, in the walk's own thread: the folder watch compares them
    stamps = (stamp for path in walk.all_files if (stamp := stamp_of(path)) is not None)
    return attrs.evolve(walk, stamps=tuple(stamps))


def stamp_of(path: str) -> Stamp | None:
    """``path``'s version; None once it is gone (may hang on a dead mount, like
    :func:`listing`)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (path, info.st_mtime_ns, info.st_size, info.st_ino)


class _Unlisted(Exception):
    """A folder whose listing by an earlier load is not over."""


def listing(folder: str) -> FolderListing:
    """Visible ``*.gguf`` files and sub-folders of ``folder``, sorted, as full paths
    (may hang on a dead mount: see :class:`Listings`)."""
    files, folders = [], []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return [], []
    for item in entries:
        if item.name.startswith("."):  # hidden: rsync's and editors' temporary files
            continue
        try:
            if item.is_dir():
                folders.append(item.path)
            elif item.is_file() and item.name.lower().endswith(".gguf"):
                files.append(item.path)
        except OSError:
            continue
    return files, folders


def _is_projector(path: str) -> bool:
    return os.path.basename(path).lower().startswith("mmproj")


def _models_among(files: list[str], notices: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Group files into models: a plain file is one, a complete set of shards is one."""
    models: list[tuple[str, tuple[str, ...]]] = []
    shard_sets: dict[tuple[str, int], dict[int, str]] = {}
    for path in files:
        name = os.path.basename(path)
        match = _SHARD.match(name)
        if match is None:
            models.append((name[: -len(".gguf")], (path,)))
            continue
        key = (os.path.join(os.path.dirname(path), match["stem"]), int(match["count"]))
        shard_sets.setdefault(key, {})[int(match["index"])] = path
    for (stem, count), shards in shard_sets.items():
        missing = [i for i in range(1, count + 1) if i not in shards]
        if missing:
            notices.append(
                f"{stem}-*-of-{count:05d}.gguf: skipped: shard(s) "
                f"{', '.join(str(i) for i in missing)} of {count} missing"
            )
            continue
        models.append((os.path.basename(stem), tuple(shards[i] for i in range(1, count + 1))))
    return sorted(models)


def _usable_id(model_id: str) -> bool:
    return (
        bool(model_id.strip())
        and model_id == model_id.strip()
        and ":" not in model_id
        and "/" not in model_id
        and "${" not in model_id
    )


def _well_named(found: _Candidate, notices: list[str]) -> bool:
    """Whether its id and its paths can be written in a model entry (else said)."""
    if not _usable_id(found.id):
        notices.append(
            f"{found.path}: skipped: {found.id!r} cannot be a model id "
            "(no ':', '${', '/' or spaces at the ends); rename it"
        )
        return False
    if any("${" in p or "\n" in p or "\r" in p for p in (*found.weights, found.mmproj or "")):
        notices.append(f"{found.path!r}: skipped: its path holds '${{' or a line break; rename it")
        return False
    return True


def _read(found: _Candidate, headers: HeaderReads, notices: list[str]) -> FoundModel | None:
    """``found`` with its header's facts: unknown when they do not arrive in time
    (served all the same, as a model named in a command); None (said) when broken."""
    try:
        facts = headers.facts_of(found.weights[0])
    except HeaderLate as e:
        notices.append(f"{found.path}: served with its facts unknown: {e}")
        facts = None
    except GgufError as e:
        notices.append(f"{found.path}: skipped: {e}")
        return None
    else:
        if facts is None:
            notices.append(f"{found.path}: skipped: it is gone since the folder was listed")
            return None
    mmproj, mmproj_bytes = found.mmproj, 0
    if mmproj is not None:
        try:
            projector = headers.facts_of(mmproj)
        except HeaderLate as e:  # its file is there: used, its size unknown
            notices.append(f"{mmproj}: its size is unknown: {e}")
        except GgufError as e:
            notices.append(f"{mmproj}: not used: {e}; {found.id} is served without it")
            mmproj = None
        else:
            if projector is None:
                notices.append(f"{mmproj}: not used: it is gone; {found.id} is served without it")
                mmproj = None
            else:
                mmproj_bytes = projector.weights_bytes
    return FoundModel(found.id, found.path, found.weights, facts, mmproj, mmproj_bytes)
