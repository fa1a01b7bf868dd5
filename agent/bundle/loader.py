"""Opening a model bundle (folder or .tar.gz) and proving its files are the ones the manifest names."""

from __future__ import annotations

import hashlib
import logging
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lineside.agent.bundle.manifest import BundleManifest, FileRef
from lineside.agent.errors import BundleError

logger = logging.getLogger(__name__)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoadedBundle:
    """A bundle folder whose files all matched their sha256.

    A bundle opened from a .tar.gz lives in a temporary folder that `close()` removes (and, failing
    that, the interpreter at exit): loading never leaves folders behind.
    """

    root: Path
    manifest: BundleManifest
    extracted: tempfile.TemporaryDirectory[str] | None = field(default=None, compare=False, repr=False)

    def path(self, ref: FileRef) -> Path:
        return self.root / ref.path

    def close(self) -> None:
        """Remove the extracted copy of an archive; a folder bundle is left alone."""
        if self.extracted is not None:
            self.extracted.cleanup()


def resolve_inside(root: Path, ref: FileRef) -> Path:
    """The file's path, refusing names that escape the bundle folder."""
    path = (root / ref.path).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: manifest names {ref.path!r}, which lies outside the bundle")
    return path


def verify_files(root: Path, manifest: BundleManifest) -> None:
    """Raise BundleError naming every missing or tampered file."""
    problems: list[str] = []
    for ref in manifest.files():
        path = resolve_inside(root, ref)
        if not path.is_file():
            problems.append(f"{ref.path}: missing")
            continue
        try:
            actual = sha256_file(path)
        except OSError as err:
            problems.append(f"{ref.path}: cannot read ({err.strerror or err})")
            continue
        if actual != ref.sha256:
            problems.append(f"{ref.path}: sha256 is {actual}, manifest says {ref.sha256}")
    if problems:
        raise BundleError(f"bundle {root} failed verification: " + "; ".join(problems))


def extract_archive(archive: Path, target: Path) -> Path:
    """Extract a bundle .tar.gz into the folder `target` (made if missing); returns the bundle's root folder.

    BundleError for an archive that cannot be read (truncated, not gzip, unsafe member names).
    """
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(target, filter="data")  # 'data' refuses absolute paths, links out, devices
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:  # EOFError: an archive cut short
        raise BundleError(f"{archive}: not a readable bundle archive ({err})") from err
    entries = list(target.iterdir())
    # Archives hold one top-level folder; accept a flat archive too.
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else target


def _extract(archive: Path) -> tuple[Path, tempfile.TemporaryDirectory[str]]:
    holder = tempfile.TemporaryDirectory(prefix="lineside-bundle-")
    try:
        return extract_archive(archive, Path(holder.name)), holder
    except BaseException:
        holder.cleanup()
        raise


def load_bundle(location: Path, *, verify: bool = True) -> LoadedBundle:
    """Open a bundle folder or .tar.gz and verify every file's sha256."""
    location = Path(location)
    if not location.exists():
        raise BundleError(f"{location}: bundle not found")
    holder = None
    if location.is_file():
        root, holder = _extract(location)
    else:
        root = location
    try:
        manifest = BundleManifest.read(root)
        if verify:
            verify_files(root, manifest)
    except BaseException:
        if holder is not None:
            holder.cleanup()
        raise
    logger.info(
        "bundle %s version %s verified (%d files)",
        manifest.bundle_id,
        manifest.version,
        len(manifest.files()),
    )
    return LoadedBundle(root, manifest, holder)
