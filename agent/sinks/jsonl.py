"""Results as JSON lines, one object per line, to stdout or an append-only file."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import IO, Literal

from pydantic import Field

from lineside.agent.plugins import StrictConfig, path_problems
from lineside.agent.results import Frame, InspectionResult
from lineside.agent.sinks.base import Sink

logger = logging.getLogger(__name__)

# Only results written shortly before a crash can come back (those not yet in the source's ledger),
# so de-duplication looks at the file's tail and remembers a bounded number of ids.
DEDUPE_TAIL_BYTES = 16 * 1024 * 1024
DEDUPE_MAX_IDS = 200_000


class JsonlSinkConfig(StrictConfig):
    """Results as JSON lines, to a file or stdout."""

    kind: Literal["jsonl"] = Field(description="Selects the JSON-lines sink.")
    path: str = Field(description="File to append to, or '-' for stdout.")
    fsync: bool = Field(default=False, description="fsync after every line (survives power loss, costs I/O).")
    durable: bool = Field(
        default=True,
        description="A frame is acknowledged to its source only after this sink stored the result.",
    )

    def problems(self, key: str) -> list[str]:
        if self.path == "-":
            return []
        return path_problems(Path(self.path), f"{key}.path", kind="file", write=True, create=True)


class JsonlSink(Sink):
    """Appends `InspectionResult` JSON, one per line; flushes every line, fsyncs when asked.

    In file mode, result ids already in the file (its last DEDUPE_TAIL_BYTES) or written since opening
    are not written again: a frame re-inspected after a crash does not produce a duplicate line. A
    partial last line left by a crash is cut off on open.
    """

    config_class = JsonlSinkConfig

    def __init__(self, path: str | Path, *, fsync: bool = False, durable: bool = True) -> None:
        self.path = str(path)
        self.fsync = fsync
        self.durable = durable
        self.name = f"jsonl:{self.path}"
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.skipped_duplicates = 0
        self._stream: IO[str]
        self._owned = self.path != "-"
        if self._owned:
            file_path = Path(self.path)
            file_path.parent.mkdir(parents=True, exist_ok=True)
            self._load_existing(file_path)
            self._stream = open(file_path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the sink's life
        else:
            self._stream = sys.stdout

    @classmethod
    def from_config(cls, config: JsonlSinkConfig) -> JsonlSink:
        return cls(config.path, fsync=config.fsync, durable=config.durable)

    def _remember(self, result_id: str) -> None:
        self._seen[result_id] = None
        if len(self._seen) > DEDUPE_MAX_IDS:
            self._seen.popitem(last=False)

    def _load_existing(self, path: Path) -> None:
        if not path.exists():
            return
        size = path.stat().st_size
        with open(path, "rb+") as fh:
            start = max(0, size - DEDUPE_TAIL_BYTES)
            fh.seek(start)
            tail = fh.read()
            if tail and not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n") + 1
                logger.warning("%s: cutting a partial last line (%d bytes) left by a crash", path, len(tail) - cut)
                fh.truncate(start + cut)
                tail = tail[:cut]
        lines = tail.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first line of the tail window may be cut
        for line in lines:
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict) and isinstance(item.get("result_id"), str):
                self._remember(item["result_id"])

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        """Write one line unless this result id was written before."""
        if self._owned and result.result_id in self._seen:
            self.skipped_duplicates += 1
            logger.debug("result %s of frame %s already written; skipped", result.result_id, frame.frame_id)
            return
        self._stream.write(result.model_dump_json() + "\n")
        self._stream.flush()
        if self.fsync and self._owned:
            os.fsync(self._stream.fileno())
        if self._owned:
            self._remember(result.result_id)

    def close(self) -> None:
        if self._owned and not self._stream.closed:
            self._stream.close()
        elif not self._owned:
            self._stream.flush()
