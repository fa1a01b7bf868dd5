"""The uploads spool: flagged frames wait on local disk until the uploader has put them in S3.

One file per item (`<seq>-<result_id>.item`): a JSON header line naming its parts (S3 key, content
type, size, sha256), then the parts' bytes back to back. It is written under a temporary name, fsync'd,
renamed into place and the folder fsync'd, so after a crash or a power cut an item is whole or absent.
It is deleted only after its last part (the manifest line) is in S3.

Bounded by bytes on disk: adding beyond the bound evicts the oldest items (never the one being
uploaded); evictions are counted and kept until the owner reports them. Thread-safe: the pipeline's
dispatch thread adds, the uploader thread reads and removes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lineside.agent.storage import fsync_dir

logger = logging.getLogger(__name__)

ITEM_SUFFIX = ".item"
_NAME = re.compile(r"^(?P<seq>\d{12})-(?P<rid>[A-Za-z0-9_.-]+)\.item$")
_FORMAT = 1


class SpoolCorrupt(Exception):
    """An item file that cannot be read back as written (a disk fault; a crash cannot cause it)."""


@dataclass(frozen=True)
class Part:
    """One object to upload: its key (under the bucket), content type and bytes."""

    key: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class SpoolItem:
    """One queued frame: its file, its size on disk and the result it came from."""

    name: str
    path: Path
    size: int
    result_id: str


class Spool:
    """A durable FIFO of upload items in a folder; see the module docstring."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.tmp = self.folder / "tmp"
        self.bad = self.folder / "bad"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._items: OrderedDict[str, SpoolItem] = OrderedDict()  # by name, oldest first
        self._by_result: dict[str, str] = {}
        self._bytes = 0
        self._inflight: str | None = None
        self.evicted = 0
        self._unreported_evictions = 0
        for stale in self.tmp.iterdir():  # half-written items of a crash: their frames were never acknowledged
            stale.unlink(missing_ok=True)
        found = sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))
        for path in found:
            self._index(path.name, path.stat().st_size)
        self._seq = int(_NAME.match(found[-1].name)["seq"]) + 1 if found else 0  # type: ignore[index]

    def _index(self, name: str, size: int) -> None:
        match = _NAME.match(name)
        assert match is not None
        item = SpoolItem(name, self.folder / name, size, match["rid"])
        self._items[name] = item
        self._by_result[item.result_id] = name
        self._bytes += size

    def _forget(self, name: str) -> SpoolItem | None:
        item = self._items.pop(name, None)
        if item is not None:
            self._by_result.pop(item.result_id, None)
            self._bytes -= item.size
        return item

    # -- adding ----------------------------------------------------------------------------------

    def put(self, result_id: str, parts: list[Part]) -> bool:
        """Store one item durably before returning. False when `result_id` is already queued, or when the
        item alone is larger than the bound (then it counts as evicted). OSError (disk full, read-only
        folder) propagates: the caller counts and reports it."""
        header = {
            "format": _FORMAT,
            "result_id": result_id,
            "parts": [
                {
                    "key": p.key,
                    "content_type": p.content_type,
                    "size": len(p.data),
                    "sha256": hashlib.sha256(p.data).hexdigest(),
                }
                for p in parts
            ],
        }
        head = json.dumps(header, separators=(",", ":")).encode() + b"\n"
        size = len(head) + sum(len(p.data) for p in parts)
        with self._lock:
            if result_id in self._by_result:
                return False
            if size > self.max_bytes:
                self._count_evictions(1)
                logger.warning("uploads: item %s (%d bytes) alone exceeds the queue bound; dropped", result_id, size)
                return False
            self._make_room(size)
            name = f"{self._seq:012d}-{result_id}{ITEM_SUFFIX}"
            self._seq += 1
        tmp = self.tmp / name
        try:
            with tmp.open("wb") as f:
                f.write(head)
                for part in parts:
                    f.write(part.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / name)
            fsync_dir(self.folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            self._index(name, size)
        return True

    def _make_room(self, size: int) -> None:
        # Under the lock. The item being uploaded stays: its upload may already be half done.
        evicted = 0
        for name in list(self._items):
            if self._bytes + size <= self.max_bytes:
                break
            if name == self._inflight:
                continue
            item = self._forget(name)
            if item is not None:
                item.path.unlink(missing_ok=True)
                evicted += 1
        if evicted:
            self._count_evictions(evicted)

    def _count_evictions(self, n: int) -> None:
        self.evicted += n
        self._unreported_evictions += n

    # -- taking ----------------------------------------------------------------------------------

    def oldest(self) -> SpoolItem | None:
        """The oldest item, now marked as being uploaded (eviction spares it) until `done` or `release`."""
        with self._lock:
            for item in self._items.values():
                self._inflight = item.name
                return item
            return None

    def read(self, item: SpoolItem) -> list[Part]:
        """The item's parts; SpoolCorrupt when the file does not hold what its header promises.
        FileNotFoundError when it is gone (removed by `quarantine` or by hand)."""
        data = item.path.read_bytes()
        head, sep, body = data.partition(b"\n")
        try:
            header = json.loads(head) if sep else None
            specs = header["parts"] if isinstance(header, dict) else None
            if not isinstance(specs, list):
                raise ValueError("no header line")
            parts, offset = [], 0
            for spec in specs:
                chunk = body[offset : offset + int(spec["size"])]
                offset += int(spec["size"])
                if len(chunk) != int(spec["size"]) or hashlib.sha256(chunk).hexdigest() != spec["sha256"]:
                    raise ValueError(f"part {spec['key']} is truncated or altered")
                parts.append(Part(str(spec["key"]), str(spec["content_type"]), chunk))
            if offset != len(body):
                raise ValueError(f"{len(body) - offset} bytes beyond the last part")
        except (ValueError, KeyError, TypeError) as err:
            raise SpoolCorrupt(f"{item.path}: {err}") from err
        return parts

    def done(self, item: SpoolItem) -> None:
        """Delete an uploaded item."""
        with self._lock:
            self._forget(item.name)
            if self._inflight == item.name:
                self._inflight = None
        item.path.unlink(missing_ok=True)
        fsync_dir(self.folder)

    def release(self, item: SpoolItem) -> None:
        """The upload of `item` stopped (it stays queued, first in line)."""
        with self._lock:
            if self._inflight == item.name:
                self._inflight = None

    def quarantine(self, item: SpoolItem) -> Path:
        """Move an unreadable item to `bad/` (kept for a person to look at, out of the queue)."""
        self.bad.mkdir(exist_ok=True)
        target = self.bad / item.name
        with self._lock:
            self._forget(item.name)
            if self._inflight == item.name:
                self._inflight = None
        os.replace(item.path, target)
        return target

    # -- reporting -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The queued items' names, oldest first."""
        with self._lock:
            return list(self._items)

    def depth(self) -> int:
        with self._lock:
            return len(self._items)

    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def take_unreported_evictions(self) -> int:
        """Evictions since the last call (to report each once)."""
        with self._lock:
            n, self._unreported_evictions = self._unreported_evictions, 0
        return n
