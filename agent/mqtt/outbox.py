"""The durable outbox: a message is committed to SQLite (WAL) before it is handed to the MQTT client and
deleted only when the broker acknowledged it (PUBACK), so a broker outage, a network blink or a crash of
the agent loses nothing: what is left goes out, in order, once the broker is back or the agent restarts.

Bounded by message count, payload bytes and age. An eviction deletes the oldest messages, is counted
(persisted in the file, so a restart does not forget it) and is reported by the link as an event: never
silent. One connection, guarded by a lock: the dispatch thread puts, the link's pump thread reads and
deletes.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message; `seq` orders them (oldest first)."""

    seq: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """SQLite-backed FIFO of messages awaiting a broker acknowledgement; thread-safe."""

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 100_000,
        max_bytes: int = 512 * 1024 * 1024,
        max_age_s: float = 0.0,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Autocommit mode; transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
        self._closed = False
        self.unreported_evictions = 0  # evictions not yet reported as an event (the link reports them)
        if self._count:
            logger.info("outbox %s holds %d messages from before; they go out first", self.path, self._count)

    # -- writing ---------------------------------------------------------------------------------

    def put(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False, key: str | None = None, evict: bool = True
    ) -> bool:
        """Commit one message (durably, before returning). False when a message with `key` is still waiting
        (a result re-inspected after a crash: the stored one keeps its place in the order).

        `evict=False` (the report of an eviction) may go beyond the bounds rather than evict: a report
        that evicted would itself need reporting, a loop that would fill the outbox with reports."""
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO messages (key, topic, payload, qos, retain, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (key, topic, payload, qos, int(retain), time.time()),
                )
                added = cursor.rowcount == 1
                if added:
                    self._count += 1
                    self._bytes += len(payload)
                    if evict:
                        self._evict()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._reload_totals()
                raise
            return added

    def _evict(self) -> None:
        # Inside put's transaction, under the lock.
        evicted = 0
        if self.max_age_s > 0:
            evicted += self._delete_where("created < ?", (time.time() - self.max_age_s,))
        while self._count > self.max_messages or self._bytes > self.max_bytes:
            excess = max(1, self._count - self.max_messages)
            evicted += self._delete_where("seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?)", (excess,))
        if evicted:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('evicted', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (evicted,),
            )
            self.unreported_evictions += evicted
            logger.warning("outbox %s full: evicted the %d oldest message(s)", self.path, evicted)

    def _delete_where(self, where: str, args: tuple[object, ...]) -> int:
        count, size = self._db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages WHERE {where}", args
        ).fetchone()
        if count:
            self._db.execute(f"DELETE FROM messages WHERE {where}", args)
            self._count -= count
            self._bytes -= size
        return int(count)

    def delete(self, seqs: list[int]) -> int:
        """Delete acknowledged messages; returns how many were still there."""
        if not seqs:
            return 0
        with self._lock:
            self._check_open()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for start in range(0, len(seqs), 500):
                    chunk = seqs[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    removed += self._delete_where(f"seq IN ({marks})", tuple(chunk))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._reload_totals()
                raise
            return removed

    def add_counter(self, name: str, n: int = 1) -> None:
        """Add to a persisted counter (e.g. 'rejected')."""
        with self._lock:
            self._check_open()
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )

    # -- reading ---------------------------------------------------------------------------------

    def after(self, seq: int, limit: int) -> list[OutboxMessage]:
        """Up to `limit` messages with a sequence number above `seq`, oldest first."""
        with self._lock:
            self._check_open()
            rows = self._db.execute(
                "SELECT seq, topic, payload, qos, retain FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), int(r[3]), bool(r[4])) for r in rows]

    def take_unreported_evictions(self) -> int:
        """Evictions since the last call (to report them once)."""
        with self._lock:
            n, self.unreported_evictions = self.unreported_evictions, 0
        return n

    def stats(self) -> dict[str, int]:
        """Depth, bytes and the persisted counters (evicted, rejected)."""
        with self._lock:
            if self._closed:
                return {"depth": self._count, "bytes": self._bytes}
            counters = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {
            "depth": self._count,
            "bytes": self._bytes,
            "evicted": int(counters.get("evicted", 0)),
            "rejected": int(counters.get("rejected", 0)),
        }

    def depth(self) -> int:
        with self._lock:
            return self._count

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file. Safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"outbox {self.path} is closed")

    def _reload_totals(self) -> None:
        self._count, self._bytes = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM messages"
        ).fetchone()
