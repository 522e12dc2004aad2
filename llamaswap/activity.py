"""The activity log: one row per proxied request, kept in SQLite.

Rows are numbered and buffered in memory on the request path, then written in
batches by one worker thread that alone touches the database, so the reactor
never waits for disk.  Reads go through the same thread after the pending writes.
Retention is bounded by row count and age.

The log is never needed to serve: a database that cannot be opened is replaced by
one in memory (with one warning naming the path), and a write that fails (disk
full, read-only file) drops its rows, counted, with one warning and one line when
writing works again; reads answer :class:`StoreUnavailable` meanwhile.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .config.settings import StoreSettings, default
from .logs import logger

if TYPE_CHECKING:
    from .config import Config

T = TypeVar("T")

# Columns added after SCHEMA was first released: each is added to a database that
# lacks it when the store opens (``ALTER TABLE ADD COLUMN``, so rows written before
# have NULL there).  Append only: an old database gets whatever it misses, in any
# order, whatever other columns it has.
ADDED_COLUMNS = (
    ("key", "TEXT"),  # the name of the key that made the request (never the key)
    ("cache_n", "INTEGER"),  # prompt tokens the server found in its cache (timings.cache_n)
)
COLUMNS = (
    "id",
    "time",
    "model",
    "path",
    "status",
    "duration_ms",
    "queue_ms",
    "load_ms",
    "tokens_in",
    "tokens_out",
    "prompt_tps",
    "gen_tps",
    "error",
    *(name for name, _ in ADDED_COLUMNS),
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    queue_ms REAL NOT NULL,
    load_ms REAL NOT NULL,
    tokens_in INTEGER,
    tokens_out INTEGER,
    prompt_tps REAL,
    gen_tps REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS activity_model_time ON activity (model, time);
CREATE INDEX IF NOT EXISTS activity_time ON activity (time);
"""


@attrs.frozen
class Retention:
    max_rows: int = default(StoreSettings, "max_rows")
    max_age_days: float = default(StoreSettings, "max_age_days")


def connect(path: str) -> sqlite3.Connection:
    """A connection for the worker thread (the only thread that uses it)."""
    return sqlite3.connect(path, check_same_thread=False)


class StoreUnavailable(Exception):
    """The activity log cannot be written now; its routes answer 503 meanwhile."""


class Outage:
    """A periodic task that may fail: says so once, and once when it works again.

    A task that flaps (a nearly full disk takes a small batch, not a big one) is
    said to fail again only ``quiet`` seconds after it last recovered."""

    def __init__(self, log: Logger, clock: IReactorTime, what: str, quiet: float = 600) -> None:
        self.log = log
        self.clock = clock
        self.what = what
        self.quiet = quiet
        self.error: str | None = None  # while failing: what went wrong last
        self._said = False
        self._quiet_until = 0.0

    def failed(self, error: str, consequence: str) -> None:
        if self.error is None and self.clock.seconds() >= self._quiet_until:
            self.log.warn(
                "{what} failed ({error}): {consequence}; serving goes on",
                what=self.what,
                error=error,
                consequence=consequence,
            )
            self._said = True
        self.error = error

    def worked(self, detail: str = "") -> None:
        if self.error is not None and self._said:
            self.log.warn("{what} works again{detail}", what=self.what, detail=detail)
            self._said = False
            self._quiet_until = self.clock.seconds() + self.quiet
        self.error = None


def _attempt(work: Callable[..., object], *args: Any) -> str | None:
    """Run ``work``; None if it succeeded, else what went wrong (for one log line)."""
    try:
        work(*args)
    except sqlite3.Error as e:
        return str(e)
    except Exception as e:  # any error: the writer must outlive it
        return f"{type(e).__name__}: {e}"
    return None


class ActivityStore:
    """Owner of the activity database and its writer thread."""

    log = logger()

    def __init__(
        self,
        path: str,
        reactor: Any,
        retention: Retention = Retention(),
        flush_interval: float = 1.0,
    ) -> None:
        self.path = path
        self.reactor = reactor
        self.retention = retention
        self._pending: list[dict[str, Any]] = []
        self._next_id = 1
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="llamaswap-activity")
        self._db: sqlite3.Connection | None = None
        self._flusher = LoopingCall(self._flush_logged)
        self._flusher.clock = reactor
        self._flush_interval = flush_interval
        self.persistent = path != ":memory:"  # False also after falling back to memory
        self.dropped = 0  # rows that could not be written
        self.writes = Outage(self.log, reactor, f"activity log: writing to {path}")
        self.pruning = Outage(self.log, reactor, f"activity log: pruning old rows in {path}")

    def follow(self, config: Config) -> None:
        """A reload: the retention from now on; the database stays where it is."""
        self.retention = Retention(config.store_max_rows, config.store_max_age_days)
        if config.store_path != self.path:
            self.log.warn("store.path changed: takes effect at the next restart")

    # --- lifetime -----------------------------------------------------------------

    def start(self) -> None:
        """Open the database (once, at startup: the ids of new rows follow its last).

        If it cannot be opened, the log is kept in memory until the next start."""
        try:
            self._open(self.path)
        except (sqlite3.Error, OSError) as e:
            self._close()
            self.log.warn(
                "activity log: cannot open {path} ({error}); it is kept in memory until "
                "a restart. Make {directory} writable, or set store.path (':memory:' for "
                "no file), and restart.",
                path=self.path,
                error=e,
                directory=str(Path(self.path).parent),
            )
            self.persistent = False
            self._open(":memory:")
        self._pool.start()
        self._flusher.start(self._flush_interval, now=False).addErrback(
            lambda f: self.log.failure("activity writer stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Write what is pending, close the database; safe to call twice."""
        if not self._pool.started:
            return succeed(None)
        if self._flusher.running:
            self._flusher.stop()
        done = self.flush().addCallback(lambda _: self._in_thread(self._close))

        def stop_pool(result: object) -> object:
            self._pool.stop()
            return result

        return done.addBoth(stop_pool)

    def _open(self, path: str) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = connect(path)
        self._db.executescript(SCHEMA)
        if path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        add_missing_columns(self._db)
        row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM activity").fetchone()
        self._next_id = max(self._next_id, int(row[0]) + 1)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _in_thread(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self._pool, work, *args)

    # --- writing --------------------------------------------------------------------

    def add(self, row: dict[str, Any]) -> dict[str, Any]:
        """Number a row and queue it for writing; returns the row with its id."""
        numbered = {**row, "id": self._next_id}
        self._next_id += 1
        self._pending.append(numbered)
        return numbered

    def flush(self) -> Deferred[None]:
        """Write the pending rows; never fails (a failed write is counted and logged)."""
        if not self._pending:
            return succeed(None)
        batch, self._pending = self._pending, []
        return self._in_thread(self._write, batch, self.reactor.seconds()).addCallback(
            self._written, len(batch)
        )

    def _flush_logged(self) -> Deferred[None]:
        # flush() reports its own errors; this is for the unforeseen, so the loop goes on
        return self.flush().addErrback(lambda f: self.log.failure("activity write failed", f))

    def _write(self, batch: list[dict[str, Any]], now: float) -> tuple[str | None, str | None]:
        """In the worker thread: insert, then prune; what went wrong with each."""
        return _attempt(self._insert, batch), _attempt(self._prune, now)

    def _written(self, errors: tuple[str | None, str | None], count: int) -> None:
        insert_error, prune_error = errors
        if insert_error is None:
            self.writes.worked(f"; {self.dropped} rows were dropped in all")
        else:
            self.dropped += count
            self.writes.failed(
                insert_error,
                "new rows are dropped (counted in llamaswap_activity_rows_dropped_total, "
                "and in /api/activity/stats once it works again) until a write succeeds; "
                "free disk space or fix the file's permissions",
            )
        if prune_error is None:
            self.pruning.worked()
        else:
            self.pruning.failed(prune_error, "old rows stay for now")

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        assert self._db is not None
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._db:
            self._db.executemany(
                f"INSERT INTO activity ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                [tuple(row.get(c) for c in COLUMNS) for row in batch],
            )

    def _prune(self, now: float) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute(
                "DELETE FROM activity WHERE time < ?",
                (now - self.retention.max_age_days * 86400,),
            )
            self._db.execute(
                "DELETE FROM activity WHERE id <= (SELECT MAX(id) FROM activity) - ?",
                (self.retention.max_rows,),
            )

    def health(self) -> dict[str, Any]:
        """Where the log is kept and whether it is being written."""
        return {
            "path": self.path,
            "persistent": self.persistent,
            "available": self.writes.error is None,
            "dropped": self.dropped,
        }

    # --- reading ----------------------------------------------------------------------

    def query(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        offset: int = 0,
        key: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Newest first, filtered by model, key name and time range; with the total count."""
        return self._read(self._query, model, since, until, limit, offset, key)

    def _read(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        """After the pending writes: ``work`` in the worker thread, or StoreUnavailable."""

        def read(_: object) -> Deferred[T]:
            if self.writes.error is not None:
                raise StoreUnavailable(
                    f"the activity log cannot be written ({self.writes.error}); "
                    f"{self.dropped} rows dropped so far. Serving goes on; this answer "
                    "comes back with the first row written again."
                )
            return self._in_thread(_reading, work, *args)

        return self.flush().addCallback(read)

    def _where(
        self, model: str | None, since: float | None, until: float | None, key: str | None = None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if model is not None:
            clauses.append("model = ?")
            args.append(model)
        if key is not None:
            clauses.append("key = ?")
            args.append(key)
        if since is not None:
            clauses.append("time >= ?")
            args.append(since)
        if until is not None:
            clauses.append("time <= ?")
            args.append(until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def _query(
        self,
        model: str | None,
        since: float | None,
        until: float | None,
        limit: int,
        offset: int,
        key: str | None,
    ) -> dict[str, Any]:
        assert self._db is not None
        where, args = self._where(model, since, until, key)
        total = self._db.execute(f"SELECT COUNT(*) FROM activity{where}", args).fetchone()[0]
        rows = self._db.execute(
            f"SELECT {', '.join(COLUMNS)} FROM activity{where} ORDER BY id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        data = [dict(zip(COLUMNS, row, strict=True)) for row in rows]
        return {"data": data, "total": total, "limit": limit, "offset": offset}

    def stats(
        self, since: float | None = None, until: float | None = None
    ) -> Deferred[dict[str, Any]]:
        """Per model: totals and p50/p95/p99 of latency and speeds; the store's health."""
        return self._read(self._stats, since, until).addCallback(
            lambda result: {**result, "store": self.health()}
        )

    def _stats(self, since: float | None, until: float | None) -> dict[str, Any]:
        assert self._db is not None
        where, args = self._where(None, since, until)
        rows = self._db.execute(
            f"SELECT model, duration_ms, tokens_in, tokens_out, prompt_tps, gen_tps, status, key"
            f" FROM activity{where}",
            args,
        ).fetchall()
        grouped: dict[str, list[tuple[Any, ...]]] = {}
        for row in rows:
            grouped.setdefault(row[0], []).append(row)
        models = {}
        for model, entries in sorted(grouped.items()):
            models[model] = {
                "requests": len(entries),
                "errors": sum(1 for e in entries if e[6] >= 400),
                "tokens_in": sum(e[2] or 0 for e in entries),
                "tokens_out": sum(e[3] or 0 for e in entries),
                "latency_ms": percentiles([e[1] for e in entries]),
                "prompt_tps": percentiles([e[4] for e in entries if e[4] is not None]),
                "gen_tps": percentiles([e[5] for e in entries if e[5] is not None]),
            }
        # per key name: who used which model how much (rows without a key: keys were off)
        keys: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row[7] is None:
                continue
            usage = keys.setdefault(row[7], {"requests": 0, "errors": 0, "models": {}})
            per_model = usage["models"].setdefault(
                row[0], {"requests": 0, "tokens_in": 0, "tokens_out": 0}
            )
            for totals in (usage, per_model):
                totals["requests"] += 1
            usage["errors"] += 1 if row[6] >= 400 else 0
            per_model["tokens_in"] += row[2] or 0
            per_model["tokens_out"] += row[3] or 0
        for usage in keys.values():
            usage["tokens_in"] = sum(m["tokens_in"] for m in usage["models"].values())
            usage["tokens_out"] = sum(m["tokens_out"] for m in usage["models"].values())
        return {"models": models, "keys": dict(sorted(keys.items()))}


def add_missing_columns(db: sqlite3.Connection) -> None:
    """The additive migration: every column of ADDED_COLUMNS the table lacks."""
    for name, kind in ADDED_COLUMNS:
        present = {row[1] for row in db.execute("PRAGMA table_info(activity)")}
        if name in present:
            continue
        try:
            db.execute(f"ALTER TABLE activity ADD COLUMN {name} {kind}")
        except sqlite3.OperationalError:
            # another llamaswap sharing the file added it just now: fine if it is there
            if name not in {row[1] for row in db.execute("PRAGMA table_info(activity)")}:
                raise


def _reading(work: Callable[..., T], *args: Any) -> T:
    try:
        return work(*args)
    except sqlite3.Error as e:
        raise StoreUnavailable(f"the activity log cannot be read: {e}") from e


class StoreMetrics(Collector):
    """Whether the activity log is written, and how many rows it dropped."""

    def __init__(self, store: ActivityStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "llamaswap_activity_rows_dropped",
            "Activity rows that could not be written (disk full, read-only database)",
            value=self.store.dropped,
        )
        yield GaugeMetricFamily(
            "llamaswap_activity_store_up",
            "1 while the activity log is being written, 0 while its writes fail",
            value=1 if self.store.writes.error is None else 0,
        )


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99 (None when there is nothing to rank)."""
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99)}
