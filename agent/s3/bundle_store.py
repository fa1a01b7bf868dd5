"""The bundles the updater keeps on disk, and which one is active.

Layout under `updates.bundles_dir`:

    store/<bundle_id>/   verified bundle folders: the active one and up to `keep` previously active ones
    staging/             downloads and extractions in progress; emptied after every attempt and at start
    active.json          the active bundle and the ones active before it (most recent first)
    updates.json         the last channel pointer handled (ETag, outcome), so a restart neither re-downloads
                         a rejected bundle nor undoes a rollback made by command

staging/ lies inside bundles_dir so that installing an extracted bundle is a rename on one filesystem:
store/ never holds a half-copied folder. JSON files are written atomically (temporary file, fsync, rename,
fsync of the folder).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lineside.agent.bundle.manifest import MANIFEST_NAME, BundleManifest
from lineside.agent.errors import BundleError
from lineside.agent.storage import write_json_atomic

logger = logging.getLogger(__name__)

ACTIVE_FILE = "active.json"
STATE_FILE = "updates.json"


class ActiveRecord(BaseModel):
    """active.json: what the agent serves after a restart."""

    model_config = ConfigDict(extra="ignore")

    bundle_id: str
    version: str
    activated_at: datetime
    how: str = Field(description="update (from the channel), command (activate-bundle) or adopted.")
    history: list[str] = Field(default_factory=list, description="Previously active bundle ids, most recent first.")
    configured_bundle_id: str | None = Field(
        default=None, description="The id of bundle.path when this was recorded: a bundle.path changed by hand wins."
    )


@dataclass(frozen=True)
class StoredBundle:
    bundle_id: str
    version: str
    path: Path
    created_at: datetime


def bundle_id_at(location: Path) -> str | None:
    """The bundle id of a bundle folder or .tar.gz from its manifest alone (nothing verified, nothing
    extracted to disk); None when it cannot be read."""
    import tarfile

    location = Path(location)
    try:
        if location.is_dir():
            return BundleManifest.read(location).bundle_id
        with tarfile.open(location, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.count("/") <= 1 and member.name.endswith(MANIFEST_NAME):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return BundleManifest.model_validate_json(handle.read()).bundle_id
    except (OSError, tarfile.TarError, EOFError, ValueError, BundleError):
        return None
    return None


class BundleStore:
    """Verified bundle folders by id under `root/store`, the active record, and a staging area."""

    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = keep
        self.store_dir = self.root / "store"
        self.staging_dir = self.root / "staging"

    # -- staging ---------------------------------------------------------------------------------

    def new_staging(self) -> Path:
        """A fresh empty folder under staging/ (removed by `clean_staging`)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="update-", dir=self.staging_dir))

    def clean_staging(self) -> None:
        """Remove everything under staging/ (an attempt's leftovers, or a crash's)."""
        if self.staging_dir.is_dir():
            for entry in self.staging_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        """Free space for an unprivileged writer on the filesystem of bundles_dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free

    # -- stored bundles --------------------------------------------------------------------------

    def path_of(self, bundle_id: str) -> Path:
        if not bundle_id or "/" in bundle_id or bundle_id in (".", ".."):
            raise BundleError(f"{bundle_id!r} is not a bundle id")
        return self.store_dir / bundle_id

    def has(self, bundle_id: str) -> bool:
        return (self.path_of(bundle_id) / MANIFEST_NAME).is_file()

    def install(self, root: Path, bundle_id: str) -> Path:
        """Move an extracted, verified bundle folder (inside staging/) to store/<bundle_id>."""
        target = self.path_of(bundle_id)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if target.exists():  # the same id again (a damaged copy, or re-published): the new one wins
            shutil.rmtree(target)
        os.rename(root, target)
        return target

    def adopt(self, root: Path, bundle_id: str) -> Path:
        """Copy a bundle folder served from elsewhere (bundle.path) into the store, unless it is there."""
        if self.has(bundle_id):
            return self.path_of(bundle_id)
        staging = self.new_staging()
        try:
            copy = staging / bundle_id
            shutil.copytree(root, copy)
            return self.install(copy, bundle_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, bundle_id: str) -> None:
        shutil.rmtree(self.path_of(bundle_id), ignore_errors=True)

    def bundles(self) -> list[StoredBundle]:
        """Every stored bundle whose manifest reads (files are verified when one is loaded, not here)."""
        found = []
        if not self.store_dir.is_dir():
            return found
        for folder in sorted(self.store_dir.iterdir()):
            try:
                manifest = BundleManifest.read(folder)
            except BundleError as err:
                logger.warning("updates: %s is not a readable bundle: %s", folder, err)
                continue
            if manifest.bundle_id == folder.name:
                found.append(StoredBundle(manifest.bundle_id, manifest.version, folder, manifest.created_at))
        return found

    def find(self, *, bundle_id: str | None = None, version: str | None = None) -> StoredBundle | None:
        for stored in self.bundles():
            if stored.bundle_id == bundle_id or (bundle_id is None and stored.version == version):
                return stored
        return None

    # -- active record ---------------------------------------------------------------------------

    def active(self) -> ActiveRecord | None:
        """The recorded active bundle; None when none was recorded or the record cannot be read."""
        path = self.root / ACTIVE_FILE
        try:
            return ActiveRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as err:
            logger.error("updates: %s cannot be read (%s); serving bundle.path", path, err)
            return None

    def record_active(self, manifest: BundleManifest, how: str, configured_bundle_id: str | None) -> ActiveRecord:
        """Record `manifest`'s bundle as the one to serve after a restart; the previous goes into history.

        `configured_bundle_id`: the id of the bundle at bundle.path now (see `bundle_id_at`)."""
        previous = self.active()
        history: list[str] = []
        if previous is not None:
            history = [previous.bundle_id, *previous.history]
        history = list(dict.fromkeys(h for h in history if h != manifest.bundle_id))
        record = ActiveRecord(
            bundle_id=manifest.bundle_id,
            version=manifest.version,
            activated_at=datetime.now(UTC),
            how=how,
            history=history[:50],
            configured_bundle_id=configured_bundle_id,
        )
        write_json_atomic(self.root / ACTIVE_FILE, record.model_dump(mode="json"))
        return record

    def prune(self, also_keep: tuple[str, ...] = ()) -> list[str]:
        """Remove stored bundles beyond the active one, the `keep` most recently active before it and
        `also_keep` (a bundle downloaded and proven, waiting for activate-bundle)."""
        record = self.active()
        if record is None:
            return []
        wanted = {record.bundle_id, *record.history[: self.keep], *also_keep}
        removed = []
        for stored in self.bundles():
            if stored.bundle_id not in wanted:
                self.remove(stored.bundle_id)
                removed.append(stored.bundle_id)
        if removed:
            logger.info("updates: removed old bundles %s (keep: %d)", ", ".join(removed), self.keep)
        return removed

    # -- the updater's memory of the channel -----------------------------------------------------

    def read_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.root / STATE_FILE, state)
