"""The hot-folder source: images the X-ray system writes into a folder, inspected exactly once.

A file is picked up once complete (size and mtime unchanged for `settle_seconds`; dotfiles and
*.tmp/*.part/*.partial ignored), oldest first. Its key is its name plus the sha256 of its bytes, so its
result id is stable. On ack it goes to done/ or failed/ (with NAME.error.json). Exactly-once across
crashes comes from an append-only, fsynced ledger written *before* the move: after a crash a file
found in the ledger is only moved, one not in the ledger is inspected again (same result id, which the
jsonl sink de-duplicates).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lineside.agent.errors import SourceError
from lineside.agent.plugins import path_problems
from lineside.agent.results import Frame, FrameError
from lineside.agent.sources.base import (
    DEFAULT_PATTERNS,
    FrameSource,
    SourceConfigBase,
    error_frame,
    frame_from_bytes,
)
from lineside.agent.storage import fsync_dir

logger = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
LEDGER_KEEP = 100_000  # entries kept when compacting at start; only recent keys matter for recovery
_PARTIAL_SUFFIXES = (".tmp", ".part", ".partial")


@dataclass(frozen=True)
class LedgerEntry:
    """What was decided about one file, recorded before it is moved."""

    key: str
    result_id: str
    ok: bool
    code: str | None = None
    message: str | None = None


class Ledger:
    """Append-only JSON-lines record of acknowledged files, fsynced per entry."""

    def __init__(self, path: Path, keep: int = LEDGER_KEEP) -> None:
        self.path = path
        self.entries: dict[str, LedgerEntry] = {}
        self._load(keep)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the source's life

    def _load(self, keep: int) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        if raw and not raw.endswith(b"\n"):
            # A crash mid-append left a partial line: its move never happened, so drop it.
            logger.warning("%s: dropping a partial last line (%d bytes)", self.path, len(lines[-1]))
        for line in lines[:-1]:
            try:
                item = json.loads(line)
                self.entries[item["key"]] = LedgerEntry(
                    item["key"], item["result_id"], bool(item["ok"]), item.get("code"), item.get("message")
                )
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: skipping an unreadable line", self.path)
        if len(self.entries) > keep or (raw and not raw.endswith(b"\n")):
            self.entries = dict(list(self.entries.items())[-keep:])
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name("." + self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for entry in self.entries.values():
                fh.write(self._line(entry))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)

    @staticmethod
    def _line(entry: LedgerEntry) -> str:
        item = {
            "key": entry.key,
            "result_id": entry.result_id,
            "ok": entry.ok,
            "code": entry.code,
            "message": entry.message,
            "at": datetime.now(UTC).isoformat(),
        }
        return json.dumps(item, ensure_ascii=False) + "\n"

    def get(self, key: str) -> LedgerEntry | None:
        return self.entries.get(key)

    def append(self, entry: LedgerEntry) -> None:
        """Record an entry durably (write + flush + fsync) before anything acts on it."""
        self._file.write(self._line(entry))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[entry.key] = entry

    def close(self) -> None:
        self._file.close()


class FolderSourceConfig(SourceConfigBase):
    """A hot folder the X-ray system writes finished images into."""

    kind: Literal["folder"] = Field(description="Selects the hot-folder source.")
    path: Path = Field(description="The hot folder watched for new images (top level only).")
    done_dir: Path | None = Field(default=None, description="Where inspected images go; default PATH/done.")
    failed_dir: Path | None = Field(
        default=None,
        description="Where undecodable or failed images go, with NAME.error.json; default PATH/failed.",
    )
    state_dir: Path | None = Field(
        default=None, description="Where the exactly-once ledger is kept; default PATH/.lineside."
    )
    settle_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A file is complete once its size and mtime stayed unchanged this long.",
    )
    poll_interval: float = Field(default=0.5, gt=0, description="Seconds between scans of the hot folder.")
    retry_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Delay before a file whose result could not be stored is offered again.",
    )
    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PATTERNS),
        min_length=1,
        description="Glob patterns (case-insensitive) of image file names to pick up.",
    )
    part_id_regex: str | None = Field(
        default=None,
        description="Regex searched in the file name; named groups `part` and `view` give part id and view.",
    )
    sidecar: bool = Field(
        default=True,
        description="Read NAME.json next to an image ({'part_id': ..., 'view': ...}) when present.",
    )
    sidecar_required: bool = Field(
        default=False, description="Wait for the NAME.json sidecar before picking an image up."
    )

    @field_validator("part_id_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            pattern = re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from err
        unknown = set(pattern.groupindex) - {"part", "view"}
        if not pattern.groupindex or unknown:
            raise ValueError(f"expected named groups 'part' and/or 'view', found {sorted(pattern.groupindex)}")
        return value

    def problems(self, key: str) -> list[str]:
        # The hot folder must exist (the X-ray system writes there); the others are made at start.
        return [
            *path_problems(self.path, f"{key}.path", write=True),
            *path_problems(self.done_dir, f"{key}.done_dir", write=True, create=True),
            *path_problems(self.failed_dir, f"{key}.failed_dir", write=True, create=True),
            *path_problems(self.state_dir, f"{key}.state_dir", write=True, create=True),
        ]

    @model_validator(mode="after")
    def _default_dirs(self) -> FolderSourceConfig:
        self.done_dir = self.done_dir or self.path / "done"
        self.failed_dir = self.failed_dir or self.path / "failed"
        self.state_dir = self.state_dir or self.path / ".lineside"
        return self


class FolderSource(FrameSource):
    """Watches a hot folder and delivers each complete image once; see the module docstring."""

    config_class = FolderSourceConfig
    config: FolderSourceConfig

    def __init__(self, config: FolderSourceConfig, station: str = "") -> None:
        super().__init__(config, station)
        self.path = config.path
        assert config.done_dir and config.failed_dir and config.state_dir  # filled in by the config
        self.done_dir: Path = config.done_dir
        self.failed_dir: Path = config.failed_dir
        self.state_dir: Path = config.state_dir
        self._regex = re.compile(config.part_id_regex) if config.part_id_regex else None
        self._patterns = [p.lower() for p in config.patterns]
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[tuple[int, ...], float]] = {}  # name -> (signature, stable since)
        self._scan_failing: str | None = None  # why the last scan failed (written by the capture thread only)
        self._inflight: dict[str, str] = {}  # name -> key, handed out and not yet acked
        self._retry_at: dict[str, float] = {}  # name -> monotonic time it may be offered again
        self._ledger: Ledger | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        super().start(stop)
        if not self.path.is_dir():
            raise SourceError(f"hot folder {self.path} does not exist or is not a folder")
        try:
            for folder in (self.done_dir, self.failed_dir, self.state_dir):
                folder.mkdir(parents=True, exist_ok=True)
            self._ledger = Ledger(self.state_dir / LEDGER_NAME)
        except OSError as err:
            raise SourceError(f"cannot prepare folders of hot folder {self.path}: {err}") from err
        logger.info(
            "watching %s (done=%s failed=%s, %d ledger entries)",
            self.path,
            self.done_dir,
            self.failed_dir,
            len(self._ledger.entries),
        )

    def problem(self) -> str | None:
        """The last scan failed (the folder vanished, a share went away): not ready until one succeeds.

        Read from the capture thread's last scan, never a stat of its own: a hung share must not hang
        the readers of `Agent.status()` (health, the watchdog).
        """
        return self._scan_failing

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    # -- scanning --------------------------------------------------------------------------------

    def _wanted(self, name: str) -> bool:
        lower = name.lower()
        if name.startswith(".") or lower.endswith(_PARTIAL_SUFFIXES):
            return False
        return any(fnmatch.fnmatchcase(lower, pattern) for pattern in self._patterns)

    def _sidecar_path(self, name: str) -> Path | None:
        for candidate in (self.path / f"{name}.json", self.path / f"{Path(name).stem}.json"):
            if candidate.is_file():
                return candidate
        return None

    def _ready(self) -> list[str]:
        """Names of complete images not handed out yet, oldest first."""
        now = time.monotonic()
        found: dict[str, tuple[int, ...]] = {}
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    # Symlinks are picked up too, to be refused with an error result (see _take).
                    if not self._wanted(entry.name) or not (entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    signature: tuple[int, ...] = (st.st_size, st.st_mtime_ns)
                    if self.config.sidecar:
                        sidecar = self._sidecar_path(entry.name)
                        if sidecar is None and self.config.sidecar_required:
                            continue
                        if sidecar is not None:
                            side = sidecar.stat()
                            signature += (side.st_size, side.st_mtime_ns)
                    found[entry.name] = signature
        except OSError as err:
            # The folder may be a network share that comes back; keep polling instead of dying. Logged
            # once per outage (a poll every fraction of a second would flood the journal), counted each time.
            self.count("scan_errors")
            if self._scan_failing is None:
                logger.warning("cannot scan hot folder %s: %s; not ready until it is back", self.path, err)
            missing = isinstance(err, FileNotFoundError | NotADirectoryError)
            self._scan_failing = (
                f"hot folder {self.path} is missing"
                if missing
                else f"cannot scan hot folder {self.path}: {err.strerror or err}"
            )
            return []
        if self._scan_failing is not None:
            logger.info("hot folder %s is back", self.path)
            self._scan_failing = None
        ready = []
        with self._lock:
            self._seen = {
                name: prev if (prev := self._seen.get(name)) and prev[0] == sig else (sig, now)
                for name, sig in found.items()
            }
            for name, (sig, since) in self._seen.items():
                if name in self._inflight or self._retry_at.get(name, 0.0) > now:
                    continue
                if now - since >= self.config.settle_seconds:
                    ready.append((sig[1], name))
        return [name for _, name in sorted(ready)]

    def frames(self) -> Iterator[Frame]:
        """Yield complete images oldest-first until stopped; polls every `poll_interval` seconds."""
        while not self._stop.is_set():
            self.beat()
            for name in self._ready():
                if self._stop.is_set():
                    return
                frame = self._take(name)
                self.beat()
                if frame is not None:
                    yield frame
            self.wait(self.config.poll_interval)

    # -- reading ---------------------------------------------------------------------------------

    def _names_from_file_name(self, name: str) -> tuple[str | None, int | None]:
        if self._regex is None:
            return None, None
        match = self._regex.search(name)
        if match is None:
            self.count("name_unmatched")
            return None, None
        groups = match.groupdict()
        view = groups.get("view")
        return groups.get("part"), int(view) if view is not None and view.isdigit() else None

    def _read_sidecar(self, name: str) -> tuple[dict[str, Any] | None, FrameError | None]:
        path = self._sidecar_path(name) if self.config.sidecar else None
        if path is None:
            return None, None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, found {type(data).__name__}")
            if data.get("view") is not None:
                data["view"] = int(data["view"])
            if data.get("part_id") is not None:
                data["part_id"] = str(data["part_id"])
            return data, None
        except (OSError, ValueError, TypeError) as err:
            return None, FrameError("bad_sidecar", f"{path.name}: not a valid sidecar ({err})")

    def _take(self, name: str) -> Frame | None:
        """Read one ready file into a Frame; None when it vanished or the ledger already has it."""
        path = self.path / name
        try:
            link = path.lstat()
            if path.is_symlink():
                # Policy: regular files only. A link could point anywhere on the box (and its content
                # would be uploaded for retraining), so it gets an error result and goes to failed/.
                key = f"{name}:symlink:{link.st_ino}:{link.st_mtime_ns}"
                self._mark_inflight(name, key)
                message = (
                    f"{path}: is a symbolic link (to {os.readlink(path)}); the hot folder takes regular files only"
                )
                return error_frame(
                    FrameError("symlink_refused", message),
                    name=name,
                    source=self.name,
                    key=key,
                    meta={"file": name},
                    station=self.station,
                )
            data = path.read_bytes()
            stat = path.stat()
        except FileNotFoundError:
            return None  # moved away by someone else between scan and read
        except OSError as err:
            # Keyed by this file's identity, not its name: a later unreadable file of the same name
            # is another failure with its own result id and its own place in failed/.
            identity = f"{link.st_ino}:{link.st_mtime_ns}:{link.st_size}" if "link" in locals() else uuid.uuid4().hex
            key = f"{name}:unreadable:{identity}"
            self._mark_inflight(name, key)
            return error_frame(
                FrameError("unreadable", f"{path}: cannot read file ({err.strerror})"),
                name=name,
                source=self.name,
                key=key,
                meta={"file": name},
                station=self.station,
            )
        sha = hashlib.sha256(data).hexdigest()
        key = f"{name}:{sha}"
        assert self._ledger is not None, "start() was not called"
        entry = self._ledger.get(key)
        if entry is not None:
            # Acknowledged before a crash, not moved yet: finish the move, do not inspect again.
            self._finish(name, entry)
            self.count("recovered")
            logger.info("%s was already inspected (result %s); moved without re-inspection", name, entry.result_id)
            return None
        meta: dict[str, Any] = {
            "file": name,
            "sha256": sha,
            "size": len(data),
            "mtime": datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
        }
        part_id, view = self._names_from_file_name(name)
        sidecar, sidecar_error = self._read_sidecar(name)
        self._mark_inflight(name, key)
        self.count("frames")
        if sidecar_error is not None:
            return error_frame(sidecar_error, name=name, source=self.name, key=key, meta=meta, station=self.station)
        if sidecar is not None:
            part_id = sidecar.pop("part_id", None) or part_id
            view = sidecar.pop("view", None) if sidecar.get("view") is not None else view
            if sidecar:
                meta["sidecar"] = sidecar
        return frame_from_bytes(
            data,
            name=name,
            source=self.name,
            station=self.station,
            key=key,
            max_pixels=self.config.max_pixels,
            bits_stored=self.config.bits_stored,
            part_id=part_id,
            view=view,
            meta=meta,
        )

    def _mark_inflight(self, name: str, key: str) -> None:
        with self._lock:
            self._inflight[name] = key
            self._retry_at.pop(name, None)

    # -- acknowledging ---------------------------------------------------------------------------

    def ack(self, frame: Frame, ok: bool, reason: FrameError | None = None) -> None:
        """Record the outcome in the ledger (fsynced), then move the file to done/ or failed/."""
        super().ack(frame, ok, reason)
        name = str(frame.meta.get("file", frame.frame_id))
        if not ok and reason is None:
            reason = frame.error or FrameError("failed", "no reason given")
        entry = LedgerEntry(
            key=frame.key,
            result_id=frame.result_id,
            ok=ok,
            code=None if ok or reason is None else reason.code,
            message=None if ok or reason is None else reason.message,
        )
        try:
            assert self._ledger is not None, "start() was not called"
            self._ledger.append(entry)
            self._finish(name, entry)
        finally:
            with self._lock:
                self._inflight.pop(name, None)

    def release(self, frame: Frame) -> None:
        """Offer the file again after `retry_seconds`; nothing is recorded."""
        super().release(frame)
        name = str(frame.meta.get("file", frame.frame_id))
        with self._lock:
            self._inflight.pop(name, None)
            self._retry_at[name] = time.monotonic() + self.config.retry_seconds

    def _target(self, folder: Path, name: str, key: str) -> Path:
        """Where the file goes: its own name, or a name derived from its key when that is taken.

        Never overwrites: a reused file name (other content, or another unreadable file) keeps both.
        """
        target = folder / name
        if not (target.exists() or target.is_symlink()):
            return target
        stem, suffix = Path(name).stem, Path(name).suffix
        tag = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
        for n in range(1000):
            candidate = folder / f"{stem}.{tag}{f'-{n}' if n else ''}{suffix}"
            if not (candidate.exists() or candidate.is_symlink()):
                return candidate
        raise SourceError(f"{folder}: no free name for {name} (1000 files of that name)")

    def _finish(self, name: str, entry: LedgerEntry) -> None:
        source = self.path / name
        folder = self.done_dir if entry.ok else self.failed_dir
        target = self._target(folder, name, entry.key)
        sidecar = self._sidecar_path(name) if self.config.sidecar else None
        if not entry.ok:
            report = {
                "code": entry.code,
                "message": entry.message,
                "result_id": entry.result_id,
                "key": entry.key,
                "at": datetime.now(UTC).isoformat(),
            }
            report_path = folder / f"{target.name}.error.json"
            tmp = folder / f".{target.name}.error.json.tmp"
            tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, report_path)
        with contextlib.suppress(FileNotFoundError):  # already moved by an earlier attempt
            shutil.move(source, target)
        if sidecar is not None:
            suffix = f"{target.name}.json" if sidecar.name == f"{name}.json" else f"{target.stem}.json"
            with contextlib.suppress(FileNotFoundError):
                shutil.move(sidecar, folder / suffix)
        fsync_dir(folder)
        fsync_dir(self.path)
        with self._lock:
            self._seen.pop(name, None)
