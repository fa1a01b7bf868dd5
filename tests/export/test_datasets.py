"""Data set readers (GDXray, study, Lookout for Vision manifests, local and S3) and group splits."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import cv2
import numpy as np
import pytest

from lineside.agent.errors import DatasetError
from lineside.agent.lfv_manifest import build_line, parse_line, to_line
from lineside.export.data import GDXRAY_DEFAULT_SPLIT, Box, Split, apply, load_split, open_dataset, split_groups
from lineside.export.data.lfv import write_manifest
from lineside.export.data.splits import GDXRAY_LINKED_SERIES
from lineside.export.synth import SynthSummary

# series: (images, boxes, images with defects), from the GDXray README's table
GDXRAY_TABLE = {
    "C0001": (72, 226, 72), "C0002": (90, 88, 60), "C0007": (37, 30, 30), "C0008": (37, 22, 22),
    "C0010": (37, 16, 16), "C0015": (37, 15, 8), "C0019": (37, 24, 18), "C0021": (37, 212, 31),
    "C0024": (37, 23, 17), "C0026": (37, 24, 12), "C0029": (37, 9, 9), "C0030": (37, 73, 37),
    "C0031": (37, 34, 22), "C0045": (66, 71, 29), "C0047": (72, 13, 12), "C0051": (77, 86, 49),
    "C0054": (31, 55, 31), "C0057": (31, 54, 31),
}  # fmt: skip
GDXRAY_UNANNOTATED = {"C0003", "C0004", "C0005", "C0006", "C0009", "C0044", "C0052", "C0053"}


def _png(path: Path, width: int = 64, height: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((height, width), 128, np.uint8)
    image[::7, ::5] = 90  # not flat, so a decode mix-up would show
    ok, data = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(data.tobytes())
    return path


def _series(root: Path, ground_truth: str, images: int = 2) -> Path:
    folder = root / "Castings" / "C0100"
    for n in range(1, images + 1):
        _png(folder / f"C0100_{n:04d}.png")
    (folder / "ground_truth.txt").write_text(ground_truth)
    return folder


def _key(sample: object) -> tuple:
    s = sample
    return (Path(s.uri).resolve().as_posix(), s.group, s.boxes, s.annotated, s.label)  # type: ignore[attr-defined]


# --- GDXray ---------------------------------------------------------------------------------------


def test_real_gdxray_matches_the_readme_table(gdxray_root: Path) -> None:
    # given the real GDXray subset

    # when
    dataset = open_dataset(gdxray_root)

    # then every series has the README's counts of images, boxes and images with defects
    assert dataset.name == "gdxray"
    assert set(dataset.groups()) == set(GDXRAY_TABLE) | GDXRAY_UNANNOTATED
    for series, (images, boxes, defective) in GDXRAY_TABLE.items():
        samples = dataset.subset([series]).samples
        found = (len(samples), sum(len(s.boxes) for s in samples), sum(1 for s in samples if s.label))
        assert found == (images, boxes, defective), series
        assert all(s.annotated for s in samples)
    unannotated = [s for s in dataset.samples if s.group in GDXRAY_UNANNOTATED]
    assert unannotated and all(not s.annotated and s.label is None and not s.boxes for s in unannotated)
    assert dataset.summary()["annotated"] == 846


def test_real_gdxray_box_past_the_edge_is_clipped(gdxray_root: Path) -> None:
    # given C0024 image 27, whose box in the README's data ends at x = 769 on a 768 px wide image

    # when
    sample = next(s for s in open_dataset(gdxray_root / "Castings" / "C0024").samples if s.name == "C0024_0027")

    # then
    assert Box(643.0, 320.0, 768.0, 397.0) in sample.boxes and len(sample.boxes) == 2
    assert sample.load().shape == (572, 768)


def test_malformed_ground_truth_line_is_reported_with_file_and_line(tmp_path: Path) -> None:
    # given a ground truth whose second line has a word where a number belongs
    _series(tmp_path, "1 10 20 10 20\n2 10 twenty 10 20\n")

    # when / then
    with pytest.raises(DatasetError, match=r"ground_truth\.txt:2: .*'2 10 twenty 10 20'"):
        open_dataset(tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1 100 120 10 20", "outside the 64x48 image"),
        ("1 20 10 10 20", "empty box"),
        ("3 10 20 10 20", "no image numbered 3"),
        ("1.5 10 20 10 20", "positive whole number"),
        ("1 10 20 10", "expected 5 numbers"),
    ],
)
def test_bad_boxes_are_reported_with_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    # given
    _series(tmp_path, f"2 1 5 1 5\n{line}\n")

    # when / then
    with pytest.raises(DatasetError, match=rf"ground_truth\.txt:2: .*{message}"):
        open_dataset(tmp_path)


def test_box_passing_the_edge_is_clipped_and_images_without_lines_are_normal(tmp_path: Path) -> None:
    # given a box reaching 2 px past the right edge of a 64 px wide image
    folder = _series(tmp_path, "1 50 66 10 20\n", images=2)

    # when the single series folder is opened directly
    dataset = open_dataset(folder)

    # then
    first, second = dataset.samples
    assert first.boxes == (Box(50.0, 10.0, 64.0, 20.0),) and first.label is True
    assert second.boxes == () and second.label is False and second.annotated
    assert dataset.groups() == ["C0100"]


def test_missing_path_and_unknown_layout_are_refused_with_the_path(tmp_path: Path) -> None:
    # given
    missing = tmp_path / "nowhere"
    unknown = tmp_path / "docs"
    unknown.mkdir()
    (unknown / "readme.txt").write_text("no images here")

    # when / then
    with pytest.raises(DatasetError, match=rf"{missing}: no such file or folder"):
        open_dataset(missing)
    with pytest.raises(DatasetError, match=rf"{unknown}: unknown data set layout"):
        open_dataset(unknown)


# --- study layout ---------------------------------------------------------------------------------


def test_study_layout_with_groups_from_names_and_boxes_from_json_and_txt(tmp_path: Path) -> None:
    # given
    _png(tmp_path / "defective" / "P1_a.png")
    _png(tmp_path / "defective" / "P2_a.png")
    _png(tmp_path / "normal" / "P1_b.png")
    _png(tmp_path / "non-defective" / "P3.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"P1_a.png": [[1, 2, 11, 12]]}))
    (tmp_path / "boxes.txt").write_text("P2_a.png 5 25 6 26\nP2_a.png 60 70 40 50\n")

    # when
    dataset = open_dataset(tmp_path)

    # then
    by_name = {s.name: s for s in dataset.samples}
    assert dataset.name == "study"
    assert dataset.groups() == ["P1", "P2", "P3"]
    assert by_name["P1_a.png"].boxes == (Box(1, 2, 11, 12),)
    assert by_name["P2_a.png"].boxes == (Box(5, 6, 25, 26), Box(60, 40, 64, 48))  # second one clipped
    assert by_name["P1_b.png"].label is False and by_name["P3.png"].label is False
    assert all(s.annotated for s in dataset.samples)


def test_study_groups_json_must_cover_every_image_and_normals_cannot_have_boxes(tmp_path: Path) -> None:
    # given
    _png(tmp_path / "anomaly" / "a.png")
    _png(tmp_path / "normal" / "b.png")
    (tmp_path / "groups.json").write_text(json.dumps({"a.png": "part-7", "b.png": "part-7"}))

    # when
    dataset = open_dataset(tmp_path)

    # then
    assert dataset.groups() == ["part-7"]

    # and given a box on the normal image / a groups.json missing an image
    (tmp_path / "boxes.json").write_text(json.dumps({"b.png": [[1, 1, 5, 5]]}))
    with pytest.raises(DatasetError, match="non-defective folder"):
        open_dataset(tmp_path)
    (tmp_path / "boxes.json").unlink()
    (tmp_path / "groups.json").write_text(json.dumps({"a.png": "part-7"}))
    with pytest.raises(DatasetError, match=r"groups\.json: every image needs a group; missing: \['b\.png'\]"):
        open_dataset(tmp_path)


# --- Lookout for Vision manifests ------------------------------------------------------------------


def test_manifest_line_round_trip_uses_the_hyphenated_lookout_for_vision_keys() -> None:
    # given
    line = build_line(
        "s3://bucket/parts/P9/img.png",
        anomaly=True,
        boxes=[(10.0, 20.0, 40.0, 45.0)],
        image_size=(768, 572),
        part_id="P9",
        creation_date="2026-01-31T12:00:00.000",
    )

    # when
    text = to_line(line)
    data = json.loads(text)

    # then
    assert parse_line(text) == line
    assert data["source-ref"] == "s3://bucket/parts/P9/img.png" and data["anomaly-label"] == 1
    assert data["anomaly-label-metadata"]["class-name"] == "anomaly"
    assert data["anomaly-label-metadata"]["type"] == "groundtruth/image-classification"
    assert data["bounding-box"]["annotations"] == [
        {"class_id": 0, "left": 10.0, "top": 20.0, "width": 30.0, "height": 25.0}
    ]
    assert data["bounding-box"]["image_size"] == [{"width": 768, "height": 572, "depth": 1}]
    assert data["bounding-box-metadata"]["class-map"] == {"0": "defect"}
    assert data["lineside-part-id"] == "P9"


def test_class_name_not_the_label_index_decides_normal_or_anomaly() -> None:
    # given the guide's own example: label index 1, class-name "normal"
    text = json.dumps(
        {
            "source-ref": "s3://b/IMG_1133.png",
            "anomaly-label": 1,
            "anomaly-label-metadata": {
                "confidence": 0.95,
                "job-name": "labeling-job/testclconsolebucket",
                "class-name": "normal",
                "human-annotated": "yes",
                "creation-date": "2020-04-15T20:17:23.433061",
                "type": "groundtruth/image-classification",
            },
        }
    )

    # when
    line = parse_line(text)

    # then
    assert line.is_anomaly is False and line.human_verified


def test_manifest_round_trip_local_with_relative_refs(synth_set: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    # given the synthetic set as a GDXray folder, written out as a manifest next to its images
    root, _ = synth_set
    original = open_dataset(root)
    manifest = root / "train.manifest"

    # when
    written = write_manifest(original.samples, manifest, creation_date="2026-02-01T00:00:00.000")
    reread = open_dataset(manifest)

    # then the same images, groups, boxes and labels come back, referenced relatively
    assert written == len(original.samples)
    assert reread.name == "lfv"
    assert sorted(map(_key, reread.samples)) == sorted(map(_key, original.samples))
    first = json.loads(manifest.read_text().splitlines()[0])
    assert first["source-ref"].startswith("Castings/S0001/")
    manifest.unlink()


def test_malformed_manifest_line_is_reported_with_manifest_and_line(tmp_path: Path) -> None:
    # given a manifest whose second line is cut short and a third with an unknown class
    good = to_line(build_line("a.png", anomaly=False, creation_date="2026-01-01T00:00:00.000"))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(f"{good}\n{good[:30]}\n")
    bad_class = tmp_path / "c.manifest"
    bad_class.write_text(good.replace('"normal"', '"scratch"') + "\n")

    # when / then
    with pytest.raises(DatasetError, match=rf"{manifest}:2: not valid JSON"):
        open_dataset(manifest)
    with pytest.raises(DatasetError, match=rf"{bad_class}:1: not a valid manifest line .*class-name"):
        open_dataset(bad_class)


def test_machine_flags_are_not_ground_truth_and_groups_default_to_the_folder(tmp_path: Path) -> None:
    # given one human label and one machine flag, without part ids
    lines = [
        build_line("s3://b/line3/p1.png", anomaly=True, creation_date="2026-01-01T00:00:00.000"),
        build_line(
            "s3://b/line3/p2.png",
            anomaly=True,
            human_annotated=False,
            creation_date="2026-01-01T00:00:00.000",
        ),
    ]
    manifest = tmp_path / "flags.manifest"
    manifest.write_text("".join(to_line(x) + "\n" for x in lines))

    # when
    dataset = open_dataset(manifest)

    # then
    human, flag = dataset.samples
    assert (human.annotated, human.label, human.group) == (True, True, "line3")
    assert (flag.annotated, flag.label, flag.group) == (False, True, "line3")


def test_manifest_and_images_on_s3_are_read_through_boto3(
    s3_endpoint: str, synth_set: tuple[Path, SynthSummary], tmp_path: Path
) -> None:
    # given the synthetic images uploaded to a bucket, with an absolute-ref and a relative-ref manifest
    root, _ = synth_set
    original = open_dataset(root)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="castings")
    lines_abs, lines_rel = [], []
    for sample in original.samples:
        key = f"data/{sample.group}/{sample.name}.png"
        s3.put_object(Bucket="castings", Key=key, Body=Path(sample.uri).read_bytes())
        boxes = [(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes] or None
        size = (256, 192) if boxes else None
        for lines, ref in (
            (lines_abs, f"s3://castings/{key}"),
            (lines_rel, f"{sample.group}/{sample.name}.png"),
        ):
            line = build_line(ref, anomaly=bool(sample.label), boxes=boxes, image_size=size)
            lines.append(to_line(line) + "\n")
    s3.put_object(Bucket="castings", Key="manifests/all.manifest", Body="".join(lines_abs).encode())
    s3.put_object(Bucket="castings", Key="data/rel.manifest", Body="".join(lines_rel).encode())

    # when
    absolute = open_dataset("s3://castings/manifests/all.manifest")
    relative = open_dataset("s3://castings/data/rel.manifest")

    # then both list the same S3 images with the original groups, boxes and labels, and pixels decode
    def key(s: object) -> tuple:
        return (s.uri, s.group, s.boxes, s.label)  # type: ignore[attr-defined]

    assert sorted(map(key, absolute.samples)) == sorted(map(key, relative.samples))
    assert sorted((s.group, s.boxes, s.label) for s in absolute.samples) == sorted(
        (s.group, s.boxes, s.label) for s in original.samples
    )
    remote = absolute.samples[0]
    local = next(s for s in original.samples if f"/{s.name}.png" in remote.uri)
    assert remote.uri.startswith("s3://castings/data/")
    assert np.array_equal(remote.load(), local.load())
    with pytest.raises(DatasetError, match=r"s3://castings/missing\.manifest: cannot read from S3"):
        open_dataset("s3://castings/missing.manifest")


def _per_image_manifests(samples: list, ref_for: object, *, human: bool = False, job: str = "m") -> dict[str, bytes]:
    """One manifest per image, as the agent's flagged uploads write them: {name: manifest bytes}."""
    out = {}
    for sample in samples:
        boxes = [(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes] if sample.label else None
        line = build_line(
            ref_for(sample),  # type: ignore[operator]
            anomaly=bool(sample.label),
            boxes=boxes,
            image_size=(256, 192) if boxes else None,
            human_annotated=human,
            creation_date="2026-01-01T00:00:00.000",
        )
        out[f"{sample.name}.{job}.manifest"] = (to_line(line) + "\n").encode()
    return out


def test_an_s3_prefix_of_many_manifests_is_one_data_set(s3_endpoint: str, synth_set: tuple[Path, SynthSummary]) -> None:
    # given images with one machine-labelled manifest each under dated folders, like the agent's uploads,
    # and a labelling job's output (human labels) for two of them beside them
    root, _ = synth_set
    original = open_dataset(root)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="field-uploads")
    keys = {s.name: f"up/cell-1/2026/01/{i % 3 + 1:02d}/{s.name}.png" for i, s in enumerate(original.samples)}
    for sample in original.samples:
        s3.put_object(Bucket="field-uploads", Key=keys[sample.name], Body=Path(sample.uri).read_bytes())
    machine = _per_image_manifests(original.samples, lambda s: f"s3://field-uploads/{keys[s.name]}")
    for sample in original.samples:
        folder = keys[sample.name].rsplit("/", 1)[0]
        s3.put_object(
            Bucket="field-uploads", Key=f"{folder}/{sample.name}.m.manifest", Body=machine[f"{sample.name}.m.manifest"]
        )
    reviewed = original.samples[:2]
    job = _per_image_manifests(reviewed, lambda s: f"s3://field-uploads/{keys[s.name]}", human=True, job="gt")
    s3.put_object(Bucket="field-uploads", Key="up/review/job-1.manifest", Body=b"".join(job.values()))
    s3.put_object(Bucket="field-uploads", Key="elsewhere/x.manifest", Body=b"not json")  # outside the prefix

    # when the prefix (not a manifest) is given, as `--data s3://field-uploads/up`
    dataset = open_dataset("s3://field-uploads/up/")

    # then every image once; machine labels unverified, the reviewed ones verified
    assert len(dataset.samples) == len(original.samples) and dataset.root == "s3://field-uploads/up"
    verified = {s.name for s in dataset.samples if s.annotated}
    assert verified == {f"{s.name}.png" for s in reviewed}
    by_name = {s.name.removesuffix(".png"): s for s in dataset.samples}
    assert all(by_name[s.name].label == s.label and by_name[s.name].boxes == s.boxes for s in original.samples)
    assert np.array_equal(dataset.samples[0].load().shape, (192, 256))
    with pytest.raises(DatasetError, match=r"s3://field-uploads/nothing: no \.manifest or \.jsonl manifest"):
        open_dataset("s3://field-uploads/nothing")


def test_a_local_copy_of_the_uploads_reads_images_beside_the_manifests(
    synth_set: tuple[Path, SynthSummary], tmp_path: Path
) -> None:
    # given a local copy of an uploads prefix (aws s3 sync): images and manifests side by side, refs s3://
    root, _ = synth_set
    original = open_dataset(root)
    copy = tmp_path / "uploads" / "cell-1" / "2026" / "01" / "02"
    copy.mkdir(parents=True)
    for sample in original.samples[:6]:
        (copy / f"{sample.name}.png").write_bytes(Path(sample.uri).read_bytes())
    manifests = _per_image_manifests(original.samples[:6], lambda s: f"s3://unreachable-bucket/x/{s.name}.png")
    for name, data in manifests.items():
        (copy / name).write_bytes(data)

    # when
    dataset = open_dataset(tmp_path / "uploads")

    # then one data set of local images (no S3 needed), machine labels unverified
    assert len(dataset.samples) == 6 and all(Path(s.uri).parent == copy for s in dataset.samples)
    assert not any(s.annotated for s in dataset.samples)
    assert dataset.samples[0].load().shape == (192, 256)

    # and the same image labelled twice by machines is an error naming both places
    first = next(iter(manifests))
    (copy / "again.manifest").write_bytes(manifests[first])
    with pytest.raises(DatasetError, match=r"again\.manifest:1: image .* already listed at .*\.m\.manifest:1"):
        open_dataset(tmp_path / "uploads")


# --- splits ---------------------------------------------------------------------------------------


def test_split_groups_is_deterministic_disjoint_and_stratified(synth_set: tuple[Path, SynthSummary]) -> None:
    # given 4 series of 6 images, each with defective images
    dataset = open_dataset(synth_set[0])

    # when
    split = split_groups(dataset, val_fraction=0.25, test_fraction=0.25, seed=1)
    again = split_groups(dataset, val_fraction=0.25, test_fraction=0.25, seed=1)
    train, val, test = apply(dataset, split)

    # then
    assert split == again
    assert sorted(split.train + split.val + split.test) == dataset.groups()
    for part in (train, val, test):
        assert part.samples and any(s.label for s in part.samples)
    assert not {s.group for s in train.samples} & {s.group for s in test.samples}


def test_unannotated_groups_always_train_and_linked_series_stay_together(gdxray_root: Path) -> None:
    # given the real data
    dataset = open_dataset(gdxray_root)

    for seed in range(5):
        # when
        split = split_groups(dataset, seed=seed)

        # then
        assert GDXRAY_UNANNOTATED - {"C0044"} <= set(split.train)  # C0044 follows its twin C0051
        for chain in GDXRAY_LINKED_SERIES:
            homes = {name for name in ("train", "val", "test") for g in chain if g in getattr(split, name)}
            assert len(homes) == 1, (seed, chain, split)


def test_default_gdxray_split_covers_every_series_once_with_about_a_quarter_held_out(
    gdxray_root: Path,
) -> None:
    # given
    dataset = open_dataset(gdxray_root)

    # when
    train, val, test = apply(dataset, GDXRAY_DEFAULT_SPLIT)

    # then
    assert sorted(train.groups() + val.groups() + test.groups()) == dataset.groups()
    annotated = dataset.summary()["annotated"]
    assert 0.2 < test.summary()["annotated"] / annotated < 0.3
    assert 0.12 < val.summary()["annotated"] / annotated < 0.2
    assert all(s.annotated for s in val.samples + test.samples)
    assert {"C0054", "C0057"} & set(test.groups()) and {"C0054", "C0057"} & set(train.groups())


def test_split_file_round_trip_and_unknown_groups_are_refused(
    synth_set: tuple[Path, SynthSummary], tmp_path: Path
) -> None:
    # given
    dataset = open_dataset(synth_set[0])
    split = Split(train=["S0001", "S0002"], val=["S0003"], test=["S0004"])
    path = tmp_path / "split.json"

    # when
    split.save(path)
    loaded = load_split(path)

    # then
    assert loaded == split
    with pytest.raises(DatasetError, match=r"does not have: \['C0007'\]"):
        apply(dataset, Split(train=["S0001"], val=[], test=["C0007"]))
    path.write_text(json.dumps({"train": ["S0001"], "val": ["S0001"], "test": []}))
    with pytest.raises(DatasetError, match="in both train and val"):
        load_split(path)
