"""The activity log: one row per proxied request, kept in SQLite.

Rows are numbered and buffered in memory on the request path, then written in
batches by one worker thread that alone touches the database, so the reactor
never waits for disk.  Reads go through the same thread after the pending writes.
Retention is bounded by row count and age.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from .logs import logger

T = TypeVar("T")

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
    max_rows: int = 100_000
    max_age_days: float = 30.0


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

    # --- lifetime -----------------------------------------------------------------

    def start(self) -> None:
        """Open the database (once, at startup: the ids of new rows follow its last)."""
        self._open()
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

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(SCHEMA)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
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
        if not self._pending:
            return succeed(None)
        batch, self._pending = self._pending, []
        return self._in_thread(self._write, batch, self.reactor.seconds())

    def _flush_logged(self) -> Deferred[None]:
        # a failing write must not stop the loop for good
        return self.flush().addErrback(lambda f: self.log.failure("activity write failed", f))

    def _write(self, batch: list[dict[str, Any]], now: float) -> None:
        assert self._db is not None
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._db:
            self._db.executemany(
                f"INSERT INTO activity ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                [tuple(row.get(c) for c in COLUMNS) for row in batch],
            )
            self._db.execute(
                "DELETE FROM activity WHERE time < ?",
                (now - self.retention.max_age_days * 86400,),
            )
            self._db.execute(
                "DELETE FROM activity WHERE id <= (SELECT MAX(id) FROM activity) - ?",
                (self.retention.max_rows,),
            )

    # --- reading ----------------------------------------------------------------------

    def query(
        self,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Deferred[dict[str, Any]]:
        """Newest first, filtered by model and time range; with the total count."""
        return self.flush().addCallback(
            lambda _: self._in_thread(self._query, model, since, until, limit, offset)
        )

    def _where(
        self, model: str | None, since: float | None, until: float | None
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        if model is not None:
            clauses.append("model = ?")
            args.append(model)
        if since is not None:
            clauses.append("time >= ?")
            args.append(since)
        if until is not None:
            clauses.append("time <= ?")
            args.append(until)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), args

    def _query(
        self, model: str | None, since: float | None, until: float | None, limit: int, offset: int
    ) -> dict[str, Any]:
        assert self._db is not None
        where, args = self._where(model, since, until)
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
        """Per model: totals and p50/p95/p99 of latency and speeds."""
        return self.flush().addCallback(lambda _: self._in_thread(self._stats, since, until))

    def _stats(self, since: float | None, until: float | None) -> dict[str, Any]:
        assert self._db is not None
        where, args = self._where(None, since, until)
        rows = self._db.execute(
            f"SELECT model, duration_ms, tokens_in, tokens_out, prompt_tps, gen_tps, status"
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
        return {"models": models}


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p95/p99 (None when there is nothing to rank)."""
    ordered = sorted(values)

    def rank(p: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99)}
