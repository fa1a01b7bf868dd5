"""Data set readers: GDXray folders, study folders, Lookout for Vision manifests, and group splits.

The readers import `base` for Box/Sample/Dataset; layout detection lives here, above them, so no
module imports another in a loop.
"""

from __future__ import annotations

from pathlib import Path

from lineside.agent.errors import DatasetError
from lineside.export.data import gdxray, lfv, study
from lineside.export.data.base import Box, Dataset, Sample, read_bytes
from lineside.export.data.splits import GDXRAY_DEFAULT_SPLIT, Split, apply, load_split, split_groups

__all__ = [
    "GDXRAY_DEFAULT_SPLIT",
    "Box",
    "Dataset",
    "Sample",
    "Split",
    "apply",
    "datasets_for",
    "load_split",
    "open_dataset",
    "read_bytes",
    "split_groups",
]


def open_dataset(location: str | Path) -> Dataset:
    """Open a data set, detecting its layout.

    - a `.manifest` / `.jsonl` file, local or s3:// -> Lookout for Vision manifest (export.data.lfv)
    - any other s3:// prefix -> every manifest under it, as one data set (e.g. the agent's uploads)
    - a folder with `defective/`, `non-defective/`, `normal/` or `anomaly/` -> study layout
    - a folder holding `.manifest` / `.jsonl` files (at any depth) -> every manifest in it, as one data set
    - a folder with `Castings/`, series folders of images, or a single series folder -> GDXray
    """
    text = str(location)
    if text.startswith("s3://"):
        if text.lower().endswith(lfv.MANIFEST_SUFFIXES):
            return lfv.read_manifest(text)
        return lfv.read_manifests(text)
    path = Path(location)
    if not path.exists():
        raise DatasetError(
            f"{path}: no such file or folder; expected a GDXray folder, a study folder "
            "(defective/, non-defective/) or a .manifest/.jsonl file"
        )
    if path.is_file():
        if path.suffix.lower() in lfv.MANIFEST_SUFFIXES:
            return lfv.read_manifest(path)
        raise DatasetError(f"{path}: expected a .manifest or .jsonl manifest file, found {path.suffix!r}")
    if study.looks_like(path):
        return study.read_study(path)
    # Before GDXray: a folder of uploads holds images too, but its manifests carry the labels.
    if any(p.suffix.lower() in lfv.MANIFEST_SUFFIXES for p in path.rglob("*") if p.is_file()):
        return lfv.read_manifests(path)
    if gdxray.looks_like(path):
        return gdxray.read_gdxray(path)
    raise DatasetError(
        f"{path}: unknown data set layout; expected Castings/ or series folders with images (GDXray), "
        "defective/ and non-defective/ folders (study), or .manifest/.jsonl files"
    )


def datasets_for(
    data: str | Path, split_file: str | Path | None = None
) -> tuple[Dataset, Dataset, Dataset, Dataset, Split]:
    """(dataset, train, val, test, split) from a dataset location and an optional split file.

    Without a split file, GDXray gets the documented default series split; other data sets are
    split by group with fixed fractions and seed.
    """
    dataset = open_dataset(data)
    if split_file:
        split = load_split(Path(split_file))
    elif dataset.name == "gdxray" and set(GDXRAY_DEFAULT_SPLIT.train) & set(dataset.groups()):
        split = GDXRAY_DEFAULT_SPLIT
    else:
        split = split_groups(dataset, val_fraction=0.2, test_fraction=0.2, seed=0)
    train, val, test = apply(dataset, split)
    return dataset, train, val, test, split
