"""Flagged uploads: images the line should learn from go to S3, with their result and a manifest line.

Which frames: defective ones, uncertain ones (score within `uncertain_band` of the 0.5 boundary) and a
share of normal ones (`normal_sample_rate`, decided from the result id, so a frame seen twice decides the
same way). Error results are never uploaded: there is no verdict to review.

The service brings a sink (`UploadSink`, not durable) whose `publish` only writes the item to the local
spool (`spool.py`: fsync'd, atomic rename) and returns: the pipeline never waits for the network. The
uploader thread puts each item's objects under `<prefix>/<station>/<yyyy>/<mm>/<dd>/<result_id>.<ext>`
(capture date, UTC): the image (its original PNG/TIFF bytes when the file is still there and unchanged,
else the decoded array as PNG at its bit depth), the result JSON, and last the Ground Truth manifest line,
so a manifest never names a missing image. Keys derive from the result id and an object already there is
not written again, so a retry never makes a second object (or version).

Failures: S3 unreachable or refusing (403, NoSuchBucket) -> the item stays queued, retried with
exponential backoff and jitter; logged and published (`upload_failed`) once per outage and error code,
`upload_resumed` when it works again. A full queue evicts the oldest items (`upload_evicted`, counted).
A spool write that fails (disk full, read-only) drops that frame's upload, counted and published
(`upload_spool_failed`), never raised into the pipeline.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from lineside.agent.errors import ConfigError
from lineside.agent.lfv_manifest import build_line, to_line
from lineside.agent.plugins import StrictConfig, path_problems
from lineside.agent.results import Frame, InspectionResult
from lineside.agent.s3.config import S3Config, client_error, client_for
from lineside.agent.s3.spool import Part, Spool, SpoolCorrupt, SpoolItem
from lineside.agent.sinks.base import Sink

if TYPE_CHECKING:
    from lineside.agent.runtime import Agent

logger = logging.getLogger(__name__)

FlagReason = Literal["defective", "uncertain", "sampled"]
JOB_NAME = "lineside-agent/anomaly-label"
BOX_JOB_NAME = "lineside-agent/defect-boxes"
# Error codes that will not go away by waiting; still retried (an operator may fix the bucket or policy).
PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "NoSuchBucket",
        "InvalidBucketName",
        "ExpiredToken",
        "InvalidToken",
        "NoCredentialsError",
        "403",
    }
)
_SPOOL_REPORT_EVERY_S = 60.0  # a disk that stays full is reported again at this pace, with the count
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class UploadsConfig(StrictConfig):
    """Flagged frames uploaded to the `s3:` bucket for review and retraining."""

    enabled: bool = Field(default=True, description="Upload flagged frames; needs the `s3:` section.")
    uncertain_band: float = Field(
        default=0.1,
        ge=0,
        le=0.5,
        description="Also flag normal frames whose score is within 0.5 +- this band (the model was unsure).",
    )
    normal_sample_rate: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Share of the remaining normal frames uploaded for balance, decided from the result id.",
    )
    queue_dir: Path = Field(
        default=Path("/var/lib/lineside/uploads"),
        description="Local folder where flagged frames wait for upload (survives restarts and outages).",
    )
    max_queue_mb: float = Field(
        default=2048,
        gt=0,
        description="Bound of the local queue in MiB; beyond it the oldest items are evicted (counted, reported).",
    )
    backoff_min_s: float = Field(default=1.0, gt=0, le=3600, description="First retry delay after a failed upload.")
    backoff_max_s: float = Field(
        default=300.0, gt=0, le=86400, description="Retry delay cap; delays double up to it, with jitter."
    )
    join_timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="How long a stop waits for an upload in progress; what is left stays."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> UploadsConfig:
        if self.backoff_min_s > self.backoff_max_s:
            raise ValueError(f"backoff_min_s ({self.backoff_min_s}) exceeds backoff_max_s ({self.backoff_max_s})")
        return self

    def problems(self, key: str) -> list[str]:
        return path_problems(self.queue_dir, f"{key}.queue_dir", write=True, create=True)


# -- which frames, and what goes up ---------------------------------------------------------------


def sample_unit(result_id: str) -> float:
    """A number in [0, 1) fixed by the result id: the same frame always samples the same way."""
    digest = hashlib.sha256(f"lineside-sample:{result_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def flag_reason(result: InspectionResult, *, uncertain_band: float, normal_sample_rate: float) -> FlagReason | None:
    """Why `result`'s frame is uploaded, or None. Error results never are."""
    if result.error is not None or result.is_defective is None or result.score is None:
        return None
    if result.is_defective:
        return "defective"
    if abs(result.score - 0.5) <= uncertain_band:
        return "uncertain"
    if normal_sample_rate > 0 and sample_unit(result.result_id) < normal_sample_rate:
        return "sampled"
    return None


def original_image(frame: Frame, source_root: Path | None) -> tuple[bytes, str] | None:
    """The frame's file as it was read (PNG or TIFF), when it is still there and unchanged; else None."""
    name, sha = frame.meta.get("file"), frame.meta.get("sha256")
    if not name or not sha:
        return None
    path = Path(str(name))
    if not path.is_absolute():
        if source_root is None:
            return None
        path = source_root / path
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != sha:
        return None  # replaced since it was inspected: the array is the truth
    if data.startswith(_PNG_MAGIC):
        return data, "png"
    if data[:4] in _TIFF_MAGIC:
        return data, "tif"
    return None  # JPEG: re-encoded losslessly below, as the model saw it


def encode_png(image: Any) -> bytes:
    """Lossless PNG of a 2-D uint8/uint16 array; 16-bit stays 16-bit."""
    import cv2  # the agent's decoder already depends on it

    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"cannot encode a {image.dtype} {image.shape} array as PNG")
    return bytes(encoded.tobytes())


def gt_date(when: datetime) -> str:
    """Ground Truth's creation-date form (UTC, milliseconds, no zone suffix)."""
    utc = when.astimezone(UTC) if when.tzinfo else when
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def object_stem(s3: S3Config, station: str, result: InspectionResult) -> str:
    """`<prefix>/<station>/<yyyy>/<mm>/<dd>/<result_id>` (capture date, UTC)."""
    captured = result.captured_at.astimezone(UTC) if result.captured_at.tzinfo else result.captured_at
    return s3.key(station, f"{captured:%Y}", f"{captured:%m}", f"{captured:%d}", result.result_id)


def build_parts(
    result: InspectionResult,
    frame: Frame,
    *,
    s3: S3Config,
    station: str,
    reason: FlagReason,
    source_root: Path | None,
) -> tuple[list[Part], bool]:
    """(image, result JSON, manifest line) in upload order, and whether the image is the original file."""
    original = original_image(frame, source_root)
    if original is not None:
        image_bytes, ext = original
    elif frame.image is not None:
        image_bytes, ext = encode_png(frame.image), "png"
    else:
        raise ValueError(f"frame {frame.frame_id} has no image to upload")
    stem = object_stem(s3, station, result)
    image_key = f"{stem}.{ext}"
    width = result.width or (int(frame.image.shape[1]) if frame.image is not None else None)
    height = result.height or (int(frame.image.shape[0]) if frame.image is not None else None)
    boxes: list[tuple[float, float, float, float]] = []
    confidences: list[float] = []
    if result.is_defective and width and height:
        for box in result.boxes:
            x1, y1 = max(0.0, box.x1), max(0.0, box.y1)
            x2, y2 = min(float(width), box.x2), min(float(height), box.y2)
            if x2 > x1 and y2 > y1:  # a labeller gets only boxes that can be drawn
                boxes.append((x1, y1, x2, y2))
                confidences.append(round(float(box.score), 6))
    score = float(result.score or 0.0)
    line = build_line(
        f"s3://{s3.bucket}/{image_key}",
        anomaly=bool(result.is_defective),
        # Always the box attribute (empty for normals), so a labelling job can add a missed defect.
        boxes=boxes if width and height else None,
        image_size=(width, height) if width and height else None,
        part_id=result.part_id,
        human_annotated=False,
        confidence=round(score if result.is_defective else 1.0 - score, 6),
        creation_date=gt_date(result.inspected_at),
        job_name=JOB_NAME,
        box_job_name=BOX_JOB_NAME,
        box_confidences=confidences if width and height else None,
        result_id=result.result_id,
        flag_reason=reason,
    )
    parts = [
        Part(image_key, "image/png" if ext == "png" else "image/tiff", image_bytes),
        Part(f"{stem}.json", "application/json", result.model_dump_json().encode()),
        Part(f"{stem}.manifest", "application/x-ndjson", (to_line(line) + "\n").encode()),
    ]
    return parts, original is not None


# -- the sink and the service ---------------------------------------------------------------------


class UploadSink(Sink):
    """Spools flagged frames for upload; not durable (a failed upload never holds a frame back)."""

    config_class = UploadsConfig
    durable = False

    def __init__(self, service: UploadsService) -> None:
        self.service = service
        self.name = "uploads"

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        self.service.spool_result(result, frame)

    def close(self) -> None:
        self.service.report()  # evictions of the last results, after the service closed


class UploadsService:
    """The upload queue, its uploader thread and the sink that feeds it; see the module docstring."""

    section: ClassVar[str] = "uploads"
    config_class: ClassVar[type[StrictConfig]] = UploadsConfig
    name = "uploads"

    def __init__(self, agent: Agent, config: UploadsConfig, s3: S3Config) -> None:
        self.agent = agent
        self.config = config
        self.s3 = s3
        self.station = agent.config.station
        root = getattr(agent.config.source, "path", None)
        self.source_root = Path(root) if root is not None else None
        try:
            self.spool = Spool(config.queue_dir, int(config.max_queue_mb * 1024 * 1024))
        except OSError as err:
            raise ConfigError(
                "uploads: the queue folder cannot be used",
                [f"uploads.queue_dir: {config.queue_dir}: {err.strerror or err}"],
            ) from err
        self.sink = UploadSink(self)
        self.client: Any = None
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "flagged_defective",
                "flagged_uncertain",
                "flagged_sampled",
                "spooled",
                "already_queued",
                "images_original",
                "images_encoded",
                "spool_failed",
                "uploaded",
                "already_uploaded",
                "upload_errors",
                "quarantined",
            ),
            0,
        )
        self._halt = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # Items found at start, or tried before: their objects may be partly in S3, so look before writing.
        self._careful: set[str] = set(self.spool.names())
        self._head_allowed = True
        self._failing: str | None = None  # error code of the ongoing outage
        self._failures = 0
        self._outage_started = 0.0
        self._spool_failing = False
        self._spool_unreported = 0
        self._spool_reported_at = 0.0
        if self._careful:
            logger.info(
                "uploads: %d flagged frame(s) from before wait in %s; they go first",
                len(self._careful),
                config.queue_dir,
            )

    @classmethod
    def from_agent(cls, agent: Agent) -> UploadsService | None:
        config: UploadsConfig | None = getattr(agent.config, "uploads", None)
        if config is None or not config.enabled:
            return None
        s3: S3Config | None = getattr(agent.config, "s3", None)
        if s3 is None:  # the config refuses this; an Agent built by hand might not have been checked
            raise ConfigError("uploads: no s3 section", ["uploads: enabled, but there is no `s3:` section"])
        return cls(agent, config, s3)

    def sinks(self) -> list[Sink]:
        return [self.sink]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        try:
            self.client = client_for(self.s3)
        except Exception as err:  # a named profile that does not exist, a bad region...
            raise ConfigError("s3: cannot make the S3 client", [f"s3: {client_error(err)[2]}"]) from err
        self._thread = threading.Thread(target=self._run, name="lineside-uploads", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the uploader within `join_timeout_s`; the queue stays on disk for the next start."""
        self._halt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.config.join_timeout_s)
            if self._thread.is_alive():
                logger.warning("uploads: an upload was still running at stop; its item stays queued")
            self._thread = None
        self.report()

    # -- what the pipeline calls (dispatch thread) -----------------------------------------------

    def spool_result(self, result: InspectionResult, frame: Frame) -> None:
        """Queue the frame's upload if it is flagged; quick, local disk only, never raises OSError."""
        reason = flag_reason(
            result, uncertain_band=self.config.uncertain_band, normal_sample_rate=self.config.normal_sample_rate
        )
        if reason is None:
            return
        self._bump(f"flagged_{reason}")
        parts, original = build_parts(
            result, frame, s3=self.s3, station=self.station, reason=reason, source_root=self.source_root
        )
        try:
            added = self.spool.put(result.result_id, parts)
        except OSError as err:
            self._spool_failed(result, err)
            return
        self._spool_ok()
        if added:
            self._bump("spooled")
            self._bump("images_original" if original else "images_encoded")
            self._wake.set()
        else:
            self._bump("already_queued")

    def _spool_failed(self, result: InspectionResult, err: OSError) -> None:
        with self._lock:
            self._counts["spool_failed"] += 1
            self._spool_unreported += 1
            first = not self._spool_failing
            due = first or time.monotonic() - self._spool_reported_at >= _SPOOL_REPORT_EVERY_S
            self._spool_failing = True
            count = self._spool_unreported if due else 0
            total = self._counts["spool_failed"]
            if due:
                self._spool_unreported = 0
                self._spool_reported_at = time.monotonic()
        if first:
            logger.error(
                "uploads: cannot queue flagged frames in %s (%s); their uploads are lost until it works again",
                self.config.queue_dir,
                err.strerror or err,
            )
        if due:
            self.agent.events.publish(
                "upload_spool_failed",
                f"{count} flagged frame(s) could not be queued for upload in {self.config.queue_dir}: "
                f"{err.strerror or err}",
                count=count,
                total=total,
                queue_dir=str(self.config.queue_dir),
                error=err.strerror or str(err),
                result_id=result.result_id,
            )

    def _spool_ok(self) -> None:
        if not self._spool_failing:
            return
        with self._lock:
            self._spool_failing = False
            count, self._spool_unreported = self._spool_unreported, 0
            total = self._counts["spool_failed"]
        logger.info(
            "uploads: queueing works again in %s (%d flagged frame(s) lost in all)", self.config.queue_dir, total
        )
        if count:
            self.agent.events.publish(
                "upload_spool_failed",
                f"{count} more flagged frame(s) could not be queued for upload in {self.config.queue_dir}",
                count=count,
                total=total,
                queue_dir=str(self.config.queue_dir),
            )

    # -- the uploader thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._halt.is_set():
            try:
                if not self._turn():
                    return
            except Exception:  # a bug must not end uploads silently: log, wait, go on
                logger.exception("uploads: the uploader failed; retrying")
                self._halt.wait(self.config.backoff_max_s)

    def _turn(self) -> bool:
        """One item (or one idle wait); False when halted in the middle of an item."""
        self.report()
        self._wake.clear()
        item = self.spool.oldest()
        if item is None:
            self._wake.wait(1.0)
            return True
        try:
            parts = self.spool.read(item)
        except FileNotFoundError:
            self.spool.done(item)  # removed by hand: nothing to upload
            return True
        except SpoolCorrupt as err:
            self._quarantine(item, err)
            return True
        try:
            finished = self._upload(item, parts)
        except Exception as err:
            self.spool.release(item)
            self._careful.add(item.name)
            self._upload_failed(err)
            self._halt.wait(self._backoff())
            return True
        if not finished:  # stopping between two parts
            self.spool.release(item)
            self._careful.add(item.name)
            return False
        self.spool.done(item)
        self._careful.discard(item.name)
        self._upload_ok()
        return True

    def _upload(self, item: SpoolItem, parts: list[Part]) -> bool:
        """Put the parts in order, the manifest last; True when the item is done, False when halted."""
        manifest = parts[-1]
        if self._exists(manifest.key):  # uploaded in full before (a replayed frame): write nothing twice
            self._bump("already_uploaded")
            return True
        careful = item.name in self._careful
        for part in parts:
            if self._halt.is_set():
                return False
            if careful and part is not manifest and self._exists(part.key):
                continue
            self.client.put_object(Bucket=self.s3.bucket, Key=part.key, Body=part.data, ContentType=part.content_type)
        self._bump("uploaded")
        return True

    def _exists(self, key: str) -> bool:
        if not self._head_allowed:
            return False
        try:
            self.client.head_object(Bucket=self.s3.bucket, Key=key)
            return True
        except Exception as err:
            code, _, _ = client_error(err)
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            if code in ("403", "AccessDenied"):
                # A write-only policy (s3:PutObject without s3:GetObject): upload without looking first.
                self._head_allowed = False
                logger.warning(
                    "uploads: HEAD on bucket %s is forbidden (403); uploading without checking for existing "
                    "objects, so a retry may write a second version (grant s3:GetObject to avoid it)",
                    self.s3.bucket,
                )
                return False
            raise

    def _backoff(self) -> float:
        cap = min(self.config.backoff_max_s, self.config.backoff_min_s * 2 ** min(self._failures - 1, 30))
        return random.uniform(cap / 2, cap)  # jitter: stations behind one proxy do not retry in step

    def _upload_failed(self, err: Exception) -> None:
        code, _, message = client_error(err)
        self._failures += 1
        self._bump("upload_errors")
        if code == self._failing:
            return  # the same outage: logged once
        if self._failing is None:
            self._outage_started = time.monotonic()
        self._failing = code
        permanent = code in PERMANENT_CODES
        log = logger.error if permanent else logger.warning
        log(
            "uploads to bucket %s failing: %s: %s; %d item(s) wait in %s, retried with backoff up to %g s%s",
            self.s3.bucket,
            code,
            message,
            self.spool.depth(),
            self.config.queue_dir,
            self.config.backoff_max_s,
            " (check the bucket name and the station's S3 permissions)" if permanent else "",
        )
        self.agent.events.publish(
            "upload_failed",
            f"uploads to bucket {self.s3.bucket} failing: {code}: {message}",
            bucket=self.s3.bucket,
            code=code,
            error=message,
            permanent=permanent,
            backlog=self.spool.depth(),
        )

    def _upload_ok(self) -> None:
        if self._failing is None:
            return
        took = time.monotonic() - self._outage_started
        logger.info(
            "uploads to bucket %s work again after %.0f s and %d failed attempt(s); %d item(s) left",
            self.s3.bucket,
            took,
            self._failures,
            self.spool.depth(),
        )
        self.agent.events.publish(
            "upload_resumed",
            f"uploads to bucket {self.s3.bucket} work again",
            bucket=self.s3.bucket,
            failed_attempts=self._failures,
            outage_s=round(took, 1),
            backlog=self.spool.depth(),
        )
        self._failing, self._failures = None, 0

    def _quarantine(self, item: SpoolItem, err: SpoolCorrupt) -> None:
        try:
            where = self.spool.quarantine(item)
        except OSError:
            self.spool.done(item)
            where = None
        self._bump("quarantined")
        logger.error("uploads: unreadable queue item, moved to %s: %s", where, err)
        self.agent.events.publish(
            "upload_quarantined", f"unreadable upload item {item.name}: {err}", item=item.name, moved_to=str(where)
        )

    # -- reporting -------------------------------------------------------------------------------

    def report(self) -> None:
        """Report evictions since the last call: one log line and one event with the count."""
        n = self.spool.take_unreported_evictions()
        if not n:
            return
        logger.warning(
            "uploads: queue %s full (max_queue_mb %g): evicted the %d oldest flagged frame(s) unsent (%d in all)",
            self.config.queue_dir,
            self.config.max_queue_mb,
            n,
            self.spool.evicted,
        )
        self.agent.events.publish(
            "upload_evicted",
            f"upload queue full: {n} oldest flagged frame(s) evicted unsent",
            count=n,
            total=self.spool.evicted,
            queue_dir=str(self.config.queue_dir),
        )

    def queue_depths(self) -> dict[str, int]:
        return {"uploads": self.spool.depth()}

    def counters(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        return {**counts, "evicted": self.spool.evicted}

    def _bump(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
