"""Part-level verdicts: the results of one part id's views gathered into one `part` message.

A part is closed when every expected view is in (`all_views`), when its views stop arriving for
`timeout_s` (`timeout`: it names the views it lacks), when too many parts are open at once (`overflow`,
the oldest goes), or when the agent stops (`shutdown`): open parts live in memory only, so a stop reports
them rather than forgetting them. Results without a part id are not parts. A redelivered result (same
result id) counts once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lineside.agent.mqtt.config import PartsConfig
from lineside.agent.mqtt.payloads import PartPayload, PartView
from lineside.agent.results import InspectionResult


@dataclass
class _OpenPart:
    part_id: str
    opened_at: datetime
    last_mono: float
    views: dict[int, PartView] = field(default_factory=dict)
    result_ids: set[str] = field(default_factory=set)


class PartTracker:
    """Thread-safe: `add` runs on the dispatch thread, `expire` on the service's timer thread."""

    def __init__(self, config: PartsConfig, station: str) -> None:
        self.config = config
        self.station = station
        self.expected = list(range(config.first_view, config.first_view + config.views))
        self._open: dict[str, _OpenPart] = {}  # insertion order = opening order
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"all_views": 0, "timeout": 0, "overflow": 0, "shutdown": 0, "ignored": 0}

    def add(self, result: InspectionResult, now: float | None = None) -> list[PartPayload]:
        """Record one result; the parts it closes (its own when complete, the oldest on overflow)."""
        if result.part_id is None:
            return []
        now = time.monotonic() if now is None else now
        closed: list[PartPayload] = []
        with self._lock:
            part = self._open.get(result.part_id)
            if part is None:
                if len(self._open) >= self.config.max_open:
                    oldest = next(iter(self._open))
                    closed.append(self._close(self._open.pop(oldest), "overflow"))
                part = self._open[result.part_id] = _OpenPart(result.part_id, datetime.now(UTC), now)
            if result.result_id in part.result_ids:
                return closed  # a redelivery: counted once
            view = result.view if result.view is not None else self._next_free(part)
            if view not in self.expected:
                # Not one of the configured views: kept out of the verdict, but never silently.
                self.counters["ignored"] += 1
                part.last_mono = now
                return closed
            part.result_ids.add(result.result_id)
            part.views[view] = PartView(
                view=view,
                result_id=result.result_id,
                is_defective=result.is_defective,
                score=result.score,
                error=None if result.error is None else result.error.code,
            )
            part.last_mono = now
            if all(v in part.views for v in self.expected):
                closed.append(self._close(self._open.pop(result.part_id), "all_views"))
        return closed

    def expire(self, now: float | None = None) -> list[PartPayload]:
        """Close the parts whose last view is older than `timeout_s`."""
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [p for p in self._open.values() if now - p.last_mono >= self.config.timeout_s]
            return [self._close(self._open.pop(p.part_id), "timeout") for p in stale]

    def close_all(self) -> list[PartPayload]:
        """Close every open part (the agent stops)."""
        with self._lock:
            parts, self._open = list(self._open.values()), {}
            return [self._close(p, "shutdown") for p in parts]

    def open_parts(self) -> int:
        with self._lock:
            return len(self._open)

    def _next_free(self, part: _OpenPart) -> int:
        # A result with a part id but no view fills the first view not yet seen.
        return next((v for v in self.expected if v not in part.views), self.expected[-1] + 1)

    def _close(self, part: _OpenPart, why: str) -> PartPayload:
        self.counters[why] += 1
        views = [part.views[v] for v in sorted(part.views)]
        missing = [v for v in self.expected if v not in part.views]
        if any(v.is_defective for v in views):
            verdict = "defective"  # one defective view is enough, complete or not: kick it out
        elif not missing and all(v.is_defective is False for v in views):
            verdict = "good"
        else:
            verdict = "unknown"  # a view is missing or could not be inspected: not proven good
        scores = [v.score for v in views if v.score is not None]
        return PartPayload(
            part_id=part.part_id,
            station=self.station,
            verdict=verdict,
            complete=not missing,
            closed_by=why,  # type: ignore[arg-type]
            score=max(scores) if scores else None,
            views_expected=self.expected,
            views_seen=[v.view for v in views],
            views_missing=missing,
            views=views,
            opened_at=part.opened_at,
            closed_at=datetime.now(UTC),
        )
