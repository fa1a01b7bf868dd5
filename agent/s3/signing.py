"""The channel pointer (`<prefix>/models/<channel>/latest.json`) and its Ed25519 signature.

`lineside-export publish` writes and signs the pointer; the agent's `updates` service reads and verifies
it. The signature covers the canonical serialisation of every pointer field except `signature` itself
(sorted keys, no spaces, UTF-8), and the pointer carries the sha256 and size of the archive, so a valid
signature vouches for the archive's exact bytes too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lineside.agent.errors import SignatureError

CHANNEL_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"  # canary, stable, line-3...
POINTER_NAME = "latest.json"
POINTER_SCHEMA_VERSION = 1


def pointer_key(models_prefix: str, channel: str) -> str:
    """`<models_prefix>/<channel>/latest.json` (models_prefix is `<s3 prefix>/models`)."""
    return f"{models_prefix}/{channel}/{POINTER_NAME}"


def archive_key(models_prefix: str, bundle_id: str) -> str:
    """`<models_prefix>/bundles/<bundle_id>/<bundle_id>.tar.gz`: one archive per bundle, shared by channels."""
    return f"{models_prefix}/bundles/{bundle_id}/{bundle_id}.tar.gz"


class ChannelPointer(BaseModel):
    """What a channel serves now: one bundle archive, its size and sha256, and who signed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = Field(default=POINTER_SCHEMA_VERSION, description="Pointer format.")
    channel: str = Field(pattern=CHANNEL_PATTERN, description="The channel this pointer was published to.")
    bundle_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$", description="Bundle id.")
    version: str = Field(min_length=1, max_length=128, description="Bundle version.")
    key: str = Field(min_length=1, max_length=1024, description="Object key of the bundle archive (.tar.gz).")
    size: int = Field(ge=1, description="Archive size in bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the archive, hex.")
    published_at: datetime = Field(description="When it was published (UTC).")
    key_id: str | None = Field(default=None, description="Id of the signing key (see `key_id`); none = unsigned.")
    signature: str | None = Field(default=None, description="Ed25519 signature of `signed_bytes()`, base64.")

    def signed_bytes(self) -> bytes:
        """The canonical serialisation the signature covers: every field but `signature`."""
        fields = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public_key: Any) -> str:
    """A short id of a public key: the first 16 hex digits of the sha256 of its raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file; SignatureError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise SignatureError(f"{path}: cannot read a PEM public key ({err})") from err
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: expected an Ed25519 public key, found {type(key).__name__}")
    return key


def load_private_key(path: Path) -> Any:
    """An Ed25519 private key from an unencrypted PEM file; SignatureError naming the file otherwise."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise SignatureError(f"{path}: cannot read an unencrypted PEM private key ({err})") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: expected an Ed25519 private key, found {type(key).__name__}")
    return key


def generate_keypair(out: Path, name: str = "bundle-signing") -> tuple[Path, Path]:
    """Write `<name>.key` (private, mode 0600) and `<name>.pub` into `out`; never overwrites either."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} already exists; refusing to overwrite a signing key")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL: a file created between the check above and here is not overwritten either; 0600 from the start.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(public_pem)
    return private_path, public_path


def sign_pointer(pointer: ChannelPointer, private_key: Any) -> ChannelPointer:
    """The pointer with `key_id` and `signature` set by `private_key`."""
    unsigned = pointer.model_copy(update={"key_id": key_id(private_key.public_key()), "signature": None})
    signature = private_key.sign(unsigned.signed_bytes())
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def verify_pointer(pointer: ChannelPointer, public_key: Any) -> None:
    """Raise SignatureError unless `public_key` signed exactly these pointer fields."""
    from cryptography.exceptions import InvalidSignature

    if pointer.signature is None:
        raise SignatureError("the pointer is unsigned, and a public key is configured")
    expected = key_id(public_key)
    if pointer.key_id != expected:
        raise SignatureError(f"signed by key {pointer.key_id}, the configured public key is {expected}")
    try:
        signature = base64.b64decode(pointer.signature, validate=True)
    except ValueError as err:
        raise SignatureError(f"the signature is not base64 ({err})") from err
    try:
        public_key.verify(signature, pointer.signed_bytes())
    except InvalidSignature as err:
        raise SignatureError("the signature does not match the pointer's fields (altered, or another key)") from err
