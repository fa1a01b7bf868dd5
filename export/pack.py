"""Putting a finished bundle folder in place: `<out>/` and `<out>.tar.gz`, both atomically (no MXNet here)."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path


def pack_bundle(tmp: Path, out: Path) -> None:
    """Archive `tmp` as `<out>.tar.gz` (top folder named `out.name`), then rename `tmp` to `out`.

    `tmp` must lie beside `out` (same file system). An existing `out` is replaced; on failure nothing at
    `out` changes and no half-written archive is left.
    """
    archive_tmp = out.parent / f".{out.name}.tar.gz.tmp"
    try:
        with tarfile.open(archive_tmp, "w:gz") as tar:
            tar.add(tmp, arcname=out.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        os.replace(archive_tmp, out.parent / f"{out.name}.tar.gz")
    finally:
        archive_tmp.unlink(missing_ok=True)
