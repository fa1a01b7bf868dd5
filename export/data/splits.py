"""Train / validation / test splits by group (series or part), never by image.

The images of one group are views of the same part: splitting them across sets leaks the part into
the test set and flatters every figure. Groups without any annotated image always go to training:
they are unverified, so they can serve unsupervised training but never evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lineside.agent.errors import DatasetError
from lineside.export.data.base import Dataset

logger = logging.getLogger(__name__)


class Split(BaseModel):
    """Group names of each set; the sets are disjoint."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    train: list[str] = Field(description="Groups to train on (may include unannotated ones).")
    val: list[str] = Field(description="Groups for early stopping and threshold calibration.")
    test: list[str] = Field(description="Groups held out for the final figures.")

    @model_validator(mode="after")
    def _disjoint(self) -> Split:
        seen: dict[str, str] = {}
        for set_name in ("train", "val", "test"):
            for group in getattr(self, set_name):
                if group in seen:
                    raise ValueError(f"group {group!r} is in both {seen[group]} and {set_name}")
                seen[group] = set_name
        return self

    def save(self, path: Path) -> None:
        """Write as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)


GDXRAY_LINKED_SERIES: tuple[tuple[str, ...], ...] = (("C0001", "C0002", "C0047"), ("C0044", "C0051"))
"""GDXray series that show the same part, found by template matching (correlation >= 0.99): the C0002
crops and the C0047 256x256 crops are cut from C0001 images, and C0044 (no ground truth) holds the
same crops as C0051. Each tuple must stay within one set, or the part leaks across the split."""

GDXRAY_DEFAULT_SPLIT = Split(
    train=[
        "C0001", "C0002", "C0008", "C0021", "C0024", "C0031", "C0047", "C0051", "C0054",
        # not annotated: unsupervised training only
        "C0003", "C0004", "C0005", "C0006", "C0009", "C0044", "C0052", "C0053",
    ],
    val=["C0010", "C0015", "C0026", "C0029"],
    test=["C0007", "C0019", "C0030", "C0045", "C0057"],
)  # fmt: skip
"""Series-disjoint split of the GDXray Castings subset (846 annotated images, see its README).

- test, 208 images (25%), 145 defective, 63 defect-free: wheels C0007, C0019, C0030 (three wheel
  series, from mostly clean to all defective), knuckle C0057 and the 256x256 crops C0045, which are
  not cut from any full-frame series here; every kind of part and image is scored on unseen parts.
- val, 148 images (17%), 45 defective, 103 defect-free: wheels C0010, C0015, C0026, C0029, rich in
  verified normals, which threshold calibration at a low false-alarm rate needs most.
- train, 490 annotated images: the rest, including the other knuckle (C0054), C0001 with the crops
  cut from it (C0002, C0047), C0051 with its twin C0044 (see GDXRAY_LINKED_SERIES), and every series
  without ground truth (C0003-C0006, C0009, C0044, C0052, C0053) as unverified normal data.
"""


def split_groups(
    dataset: Dataset,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    *,
    linked: Sequence[Sequence[str]] | None = None,
) -> Split:
    """Deterministic split of the dataset's groups, stratified by whether a group has defective images.

    Fractions are of annotated images. `linked` lists groups showing the same part, kept in one set
    (None: GDXRAY_LINKED_SERIES for GDXray data sets, nothing otherwise). Within each stratum units
    are shuffled (seeded) and dealt to test, then val, until each holds its share; a stratum of three
    or more units gives each set at least one, so every set gets defective images when it can.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DatasetError(
            f"split fractions must be in [0, 1) and sum below 1, got val {val_fraction}, test {test_fraction}"
        )
    if linked is None:
        linked = GDXRAY_LINKED_SERIES if dataset.name == "gdxray" else ()
    unit_of = {g: g for g in dataset.groups()}
    for chain in linked:
        present = sorted(g for g in chain if g in unit_of)
        for g in present:
            unit_of[g] = present[0]
    sizes = dict.fromkeys(unit_of.values(), 0)
    defective: set[str] = set()
    for s in dataset.samples:
        if s.annotated:
            sizes[unit_of[s.group]] += 1
            if s.label:
                defective.add(unit_of[s.group])
    unannotated = {u for u, n in sizes.items() if n == 0}
    rng = np.random.default_rng(seed)
    dealt: dict[str, list[str]] = {"train": sorted(unannotated), "val": [], "test": []}
    clean = [u for u in sizes if u not in defective and u not in unannotated]
    for stratum in (sorted(defective), sorted(clean)):
        test, val, train = _deal(stratum, sizes, val_fraction, test_fraction, rng)
        dealt["test"] += test
        dealt["val"] += val
        dealt["train"] += train
    members = {name: sorted(g for g, u in unit_of.items() if u in units) for name, units in dealt.items()}
    split = Split(**members)
    logger.info(
        "split %s by group: %d train, %d val, %d test groups",
        dataset.root,
        *(len(members[k]) for k in ("train", "val", "test")),
    )
    return split


def _deal(
    groups: list[str], sizes: dict[str, int], val_f: float, test_f: float, rng: np.random.Generator
) -> tuple[list[str], list[str], list[str]]:
    """Deal one stratum: seed each wanted set with one group when there are enough, then fill by share."""
    order = [groups[i] for i in rng.permutation(len(groups))]
    total = sum(sizes[g] for g in order)
    wanted = [name for name, f in (("test", test_f), ("val", val_f)) if f > 0]
    # Training keeps at least one group; the held-out sets get one each only if that leaves one.
    seeded = wanted[: max(len(order) - 1, 0)]
    sets: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for name, group in zip(seeded, order, strict=False):
        sets[name].append(group)
    rest = order[len(seeded) :]
    for i, group in enumerate(rest):
        last = i == len(rest) - 1
        if not last or sets["train"]:
            held = [(n, f) for n, f in (("test", test_f), ("val", val_f)) if f > 0]
            target = next((n for n, f in held if sum(sizes[g] for g in sets[n]) < f * total), None)
            if target is not None:
                sets[target].append(group)
                continue
        sets["train"].append(group)
    return sets["test"], sets["val"], sets["train"]


def load_split(path: Path) -> Split:
    """Read a split JSON file; a malformed one is a DatasetError naming the file."""
    path = Path(path)
    try:
        return Split.model_validate_json(path.read_text())
    except OSError as err:
        raise DatasetError(f"{path}: cannot read split file ({err.strerror})") from err
    except ValidationError as err:
        raise DatasetError(f"{path}: not a valid split ({err.errors()[0]['msg']})") from err


def apply(dataset: Dataset, split: Split) -> tuple[Dataset, Dataset, Dataset]:
    """(train, val, test) subsets. Unknown group names are an error; groups the split omits are left out."""
    known = set(dataset.groups())
    named = set(split.train) | set(split.val) | set(split.test)
    unknown = sorted(named - known)
    if unknown:
        raise DatasetError(f"{dataset.root}: the split names groups the data set does not have: {unknown}")
    left_out = sorted(known - named)
    if left_out:
        logger.warning("%s: groups not in the split are left out: %s", dataset.root, left_out)
    return dataset.subset(split.train), dataset.subset(split.val), dataset.subset(split.test)
