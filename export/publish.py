"""Publishing a bundle to a channel of an S3 bucket, and the Ed25519 key pair that signs it.

No MXNet here: a release machine with only the agent extra can publish. The order is what makes it
safe to read at any moment: the archive is uploaded (and its size checked) under
`<prefix>/models/bundles/<bundle_id>/`, and only then is the channel pointer
`<prefix>/models/<channel>/latest.json` replaced, so an agent never sees a pointer to a missing or
half-uploaded archive. An archive already published for the same bundle id (promoting canary to
stable) is reused, not uploaded again: the bundle id names one build, and its files are verified by
their sha256 on every device.
"""

from __future__ import annotations

import logging
import re
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lineside.agent.bundle.loader import load_bundle, sha256_file
from lineside.agent.errors import LinesideError, StoreError
from lineside.agent.s3.config import S3Config, client_for
from lineside.agent.s3.signing import (
    CHANNEL_PATTERN,
    ChannelPointer,
    archive_key,
    generate_keypair,
    load_private_key,
    pointer_key,
    sign_pointer,
)

logger = logging.getLogger(__name__)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ('bucket', 'some/prefix'); the prefix may be empty."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", url)
    if not match:
        raise LinesideError(f"--to expects s3://bucket/prefix, got {url!r}")
    return match.group(1), match.group(2).strip("/")


def keygen(out: Path) -> tuple[Path, Path]:
    """Write a new signing key pair into `out` (private 0600, public PEM); refuses to overwrite either."""
    return generate_keypair(out)


def _pack(folder: Path, into: Path, bundle_id: str) -> Path:
    archive = into / f"{bundle_id}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=bundle_id)
    return archive


def publish(
    bundle: Path,
    to: str,
    channel: str,
    *,
    sign: Path | None = None,
    endpoint_url: str | None = None,
) -> ChannelPointer:
    """Verify `bundle` (folder or .tar.gz), upload its archive, then write the channel's pointer; returns it."""
    if not re.fullmatch(CHANNEL_PATTERN, channel):
        raise LinesideError(f"channel {channel!r}: use canary, stable or lower-case letters, digits and '-'")
    bucket, prefix = parse_s3_url(to)
    try:
        s3 = S3Config(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url)
    except ValueError as err:
        raise LinesideError(f"{to}: {err}") from err
    private_key = load_private_key(sign) if sign is not None else None  # fail before any upload
    loaded = load_bundle(Path(bundle))  # every file's sha256 against the manifest
    try:
        manifest = loaded.manifest
        if not manifest.golden:
            raise LinesideError(f"{bundle}: no golden images; agents refuse a bundle they cannot prove")
        with tempfile.TemporaryDirectory(prefix="lineside-publish-") as tmp:
            source = Path(bundle)
            archive = source if source.is_file() else _pack(source, Path(tmp), manifest.bundle_id)
            size, sha256 = archive.stat().st_size, sha256_file(archive)
            models = s3.key("models")
            key = archive_key(models, manifest.bundle_id)
            client = client_for(s3)
            size, sha256 = _upload_archive(client, bucket, key, archive, size, sha256)
    finally:
        loaded.close()
    pointer = ChannelPointer(
        channel=channel,
        bundle_id=manifest.bundle_id,
        version=manifest.version,
        key=key,
        size=size,
        sha256=sha256,
        published_at=datetime.now(UTC),
    )
    if private_key is not None:
        pointer = sign_pointer(pointer, private_key)
    target = pointer_key(models, channel)
    try:
        client.put_object(
            Bucket=bucket,
            Key=target,
            Body=pointer.model_dump_json(indent=2).encode("utf-8"),
            ContentType="application/json",
            CacheControl="no-cache",
        )
    except Exception as err:
        raise StoreError(f"s3://{bucket}/{target}: cannot write the pointer ({err})") from err
    logger.info("published bundle %s (%s) to s3://%s/%s", manifest.version, manifest.bundle_id, bucket, target)
    return pointer


def _upload_archive(client: Any, bucket: str, key: str, archive: Path, size: int, sha256: str) -> tuple[int, str]:
    """Upload unless this bundle's archive is there already; returns the (size, sha256) of the object in S3."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = f"s3://{bucket}/{key}"
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
            raise StoreError(f"{uri}: {err}") from err
        head = None
    except BotoCoreError as err:
        raise StoreError(f"{uri}: {err}") from err
    if head is not None:
        meta = head.get("Metadata", {})
        if re.fullmatch(r"[0-9a-f]{64}", meta.get("sha256", "")) and head.get("ContentLength"):
            logger.info("%s is published already (sha256 %s): reused", uri, meta["sha256"])
            return int(head["ContentLength"]), meta["sha256"]
    try:
        client.upload_file(
            str(archive),
            bucket,
            key,
            ExtraArgs={"ContentType": "application/gzip", "Metadata": {"sha256": sha256}},
        )
        stored = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as err:  # boto3's transfer manager raises its own S3UploadFailedError too
        raise StoreError(f"{uri}: upload failed ({err})") from err
    if stored != size:
        raise StoreError(f"{uri} holds {stored} bytes after the upload, expected {size}; the pointer was not written")
    return size, sha256
