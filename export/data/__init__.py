"""Data set readers: GDXray folders, study folders, Lookout for Vision manifests, and group splits."""

from lineside.export.data.base import Box, Dataset, Sample, open_dataset, read_bytes
from lineside.export.data.splits import GDXRAY_DEFAULT_SPLIT, Split, apply, load_split, split_groups

__all__ = [
    "GDXRAY_DEFAULT_SPLIT",
    "Box",
    "Dataset",
    "Sample",
    "Split",
    "apply",
    "load_split",
    "open_dataset",
    "read_bytes",
    "split_groups",
]
