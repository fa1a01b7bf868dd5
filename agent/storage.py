"""Where images are read from and outputs written to: a local folder or an S3 prefix.

One module for both halves of the project: `predict` reads and writes through a `Store`, the export
stage's dataset readers read `s3://` images through `read_uri`, and uploads and bundle updates will
use the same client. There is one S3 client per process, made on first use.

Credentials come from boto3's standard chain (environment, shared files, instance profile); the
endpoint from `AWS_ENDPOINT_URL` for S3-compatible stores (MinIO, Ceph, moto).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from lineside.agent.errors import StoreError
from lineside.agent.imaging import IMAGE_SUFFIXES

_s3_lock = threading.Lock()
_s3_clients: dict[int, Any] = {}


def s3_client() -> Any:
    """The process's S3 client, made on first use.

    Keyed by process id: a boto3 client must not be shared across fork (e.g. data loader workers).
    """
    pid = os.getpid()
    with _s3_lock:
        client = _s3_clients.get(pid)
        if client is None:
            import boto3  # lazily: only S3 users pay for importing it

            client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
            _s3_clients.clear()
            _s3_clients[pid] = client
        return client


def reset_s3_client() -> None:
    """Forget the cached client, e.g. after the endpoint or credentials in the environment changed."""
    with _s3_lock:
        _s3_clients.clear()


def split_s3_uri(uri: str, *, key_required: bool = True) -> tuple[str, str]:
    """('bucket', 'key') of an `s3://bucket/key` URI; StoreError when it is not one."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not uri.startswith("s3://") or not bucket or (key_required and not key):
        form = "s3://bucket/key" if key_required else "s3://bucket/prefix"
        raise StoreError(f"{uri}: expected an S3 URI of the form {form}")
    return bucket, key


def is_s3_error(err: BaseException) -> bool:
    """True for botocore/boto3 exceptions (they have their own hierarchy, imported lazily)."""
    return type(err).__module__.startswith(("botocore", "boto3", "s3transfer"))


def read_uri(uri: str | Path) -> bytes:
    """The bytes of a local file or an `s3://` object; StoreError naming it when it cannot be read."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, key = split_s3_uri(text)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:
            if is_s3_error(err):
                raise StoreError(f"{text}: cannot read from S3 ({err})") from err
            raise
    try:
        return Path(text).read_bytes()
    except OSError as err:
        raise StoreError(f"{text}: cannot read file ({err.strerror or err})") from err


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable: it survives a power cut only once the folder is synced."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, body: dict[str, Any]) -> None:
    """Replace `path` with `body` so that a power cut leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(body, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and Path(base).suffix.lower() in IMAGE_SUFFIXES


class Store(Protocol):
    """A place images are read from or outputs written to."""

    uri: str

    def list_images(self) -> list[str]:
        """Names ('/'-separated, relative to the store) of the images it holds, sorted."""
        ...

    def read(self, name: str) -> bytes: ...

    def write(self, name: str, data: bytes) -> None: ...


class LocalStore:
    """A local folder; names are '/'-separated paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.uri = str(self.root)

    def list_images(self) -> list[str]:
        if not self.root.is_dir():
            raise StoreError(f"input folder {self.root} does not exist or is not a folder")
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.is_file() and _is_image_name(p.relative_to(self.root).as_posix())
        )

    def read(self, name: str) -> bytes:
        return read_uri(self.root / name)

    def write(self, name: str, data: bytes) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


class S3Store:
    """An S3 prefix (`s3://bucket/prefix`)."""

    def __init__(self, bucket: str, prefix: str) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}"
        self._client = s3_client()

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _names(self) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        start = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                yield item["Key"][len(start) :]

    def list_images(self) -> list[str]:
        return sorted(n for n in self._names() if _is_image_name(n))

    def read(self, name: str) -> bytes:
        return read_uri(f"s3://{self.bucket}/{self._key(name)}")

    def write(self, name: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)


def open_store(uri: str | Path) -> Store:
    """`s3://bucket/prefix` or a local folder."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, prefix = split_s3_uri(text, key_required=False)
        return S3Store(bucket, prefix)
    return LocalStore(Path(text))
