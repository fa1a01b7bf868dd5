"""`lineside-export keygen` and `publish` against a real S3 API (moto server over HTTP); no MXNet needed."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

import boto3
import pytest

from lineside.agent.errors import EXIT_FAILURE
from lineside.agent.s3.signing import ChannelPointer, load_public_key, verify_pointer
from lineside.export.cli import main


def new_bucket(endpoint: str) -> tuple[str, object]:
    client = boto3.client("s3", endpoint_url=endpoint)
    name = f"publish-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name, client


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    return tmp_path / "keys" / "bundle-signing.key", tmp_path / "keys" / "bundle-signing.pub"


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(
    keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = keys
    # then: private 0600, public PEM
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()

    # when a second keygen targets the same folder
    code = main(["keygen", "--out", str(private.parent)])

    # then it refuses and the key is untouched
    assert code == EXIT_FAILURE
    assert "refusing to overwrite" in capsys.readouterr().err
    assert private.read_bytes() == before


def test_publish_uploads_the_archive_then_writes_a_signed_pointer(
    test_bundle: Path, keys: tuple[Path, Path], s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # given a bucket and a key pair
    bucket, client = new_bucket(s3_endpoint)
    private, public = keys

    # when the bundle folder is published to stable, signed (endpoint from --endpoint-url)
    code = main(
        [
            "publish",
            "--bundle",
            str(test_bundle),
            "--to",
            f"s3://{bucket}/plant",
            "--channel",
            "stable",
            "--sign",
            str(private),
            "--endpoint-url",
            s3_endpoint,
        ]
    )

    # then the pointer names the archive, whose size and sha256 are the ones uploaded
    assert code == 0
    raw = client.get_object(Bucket=bucket, Key="plant/models/stable/latest.json")["Body"].read()  # type: ignore[attr-defined]
    pointer = ChannelPointer.model_validate_json(raw)
    manifest = json.loads((test_bundle / "manifest.json").read_text())
    assert (pointer.channel, pointer.bundle_id, pointer.version) == (
        "stable",
        manifest["bundle_id"],
        manifest["version"],
    )
    assert pointer.key == f"plant/models/bundles/{manifest['bundle_id']}/{manifest['bundle_id']}.tar.gz"
    archive = client.get_object(Bucket=bucket, Key=pointer.key)["Body"].read()  # type: ignore[attr-defined]
    assert len(archive) == pointer.size
    assert hashlib.sha256(archive).hexdigest() == pointer.sha256
    # and the signature verifies with the public key (and breaks when a field changes)
    verify_pointer(pointer, load_public_key(public))
    with pytest.raises(Exception, match="does not match"):
        verify_pointer(pointer.model_copy(update={"size": pointer.size + 1}), load_public_key(public))
    assert json.loads(capsys.readouterr().out)["sha256"] == pointer.sha256


def test_publish_writes_no_pointer_when_the_archive_upload_fails(
    test_bundle: Path, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # given a bucket whose policy refuses writes under the bundles/ prefix (the archive's place)
    bucket, client = new_bucket(s3_endpoint)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/plant/models/bundles/*",
            }
        ],
    }
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))  # type: ignore[attr-defined]

    # when publishing (endpoint from $AWS_ENDPOINT_URL this time)
    assert os.environ["AWS_ENDPOINT_URL"] == s3_endpoint
    code = main(["publish", "--bundle", str(test_bundle), "--to", f"s3://{bucket}/plant", "--channel", "canary"])

    # then it fails and the channel has no pointer: readers never see one before its archive
    assert code == EXIT_FAILURE
    assert "upload failed" in capsys.readouterr().err
    listed = client.list_objects_v2(Bucket=bucket, Prefix="plant/models/canary/")  # type: ignore[attr-defined]
    assert listed["KeyCount"] == 0


def test_promoting_to_another_channel_reuses_the_archive(test_bundle: Path, s3_endpoint: str) -> None:
    # given a bundle published to canary
    bucket, client = new_bucket(s3_endpoint)
    to = f"s3://{bucket}/plant"
    assert main(["publish", "--bundle", str(test_bundle), "--to", to, "--channel", "canary"]) == 0
    canary = ChannelPointer.model_validate_json(
        client.get_object(Bucket=bucket, Key="plant/models/canary/latest.json")["Body"].read()  # type: ignore[attr-defined]
    )
    etag = client.head_object(Bucket=bucket, Key=canary.key)["ETag"]  # type: ignore[attr-defined]

    # when the same folder is published to stable (packing it again would give other bytes)
    assert main(["publish", "--bundle", str(test_bundle), "--to", to, "--channel", "stable"]) == 0

    # then stable points at the very same object, which was not uploaded again
    stable = ChannelPointer.model_validate_json(
        client.get_object(Bucket=bucket, Key="plant/models/stable/latest.json")["Body"].read()  # type: ignore[attr-defined]
    )
    assert (stable.key, stable.sha256, stable.size) == (canary.key, canary.sha256, canary.size)
    assert client.head_object(Bucket=bucket, Key=canary.key)["ETag"] == etag  # type: ignore[attr-defined]


@pytest.mark.parametrize("channel", ["Stable", "a/b", "", "-x"])
def test_publish_refuses_a_bad_channel_name(
    test_bundle: Path, channel: str, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["publish", "--bundle", str(test_bundle), "--to", "s3://some-bucket/p", f"--channel={channel}"])
    assert code == EXIT_FAILURE
    assert "channel" in capsys.readouterr().err


def test_publish_refuses_a_tampered_bundle_before_uploading(
    test_bundle: Path, tmp_path: Path, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # given a copy of the bundle with one byte of a model changed
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(test_bundle, bad)
    model = bad / "vae.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    bucket, client = new_bucket(s3_endpoint)

    # when
    code = main(["publish", "--bundle", str(bad), "--to", f"s3://{bucket}/plant", "--channel", "stable"])

    # then nothing was uploaded
    assert code == EXIT_FAILURE
    assert "vae.onnx: sha256" in capsys.readouterr().err
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0  # type: ignore[attr-defined]
