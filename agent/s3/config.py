"""The `s3:` config section and the boto3 client made from it.

Credentials come from boto3's standard chain (environment, shared files, a named profile, the instance
profile), or from systemd credentials (`LoadCredential=aws_access_key_id`, `aws_secret_access_key`,
optional `aws_session_token`) when the unit provides both. Secrets are never logged: only which source
was used.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field, field_validator

from lineside.agent.plugins import StrictConfig

logger = logging.getLogger(__name__)

ACCESS_KEY_CREDENTIAL = "aws_access_key_id"
SECRET_KEY_CREDENTIAL = "aws_secret_access_key"
SESSION_TOKEN_CREDENTIAL = "aws_session_token"


class S3Config(StrictConfig):
    """Where the station's uploads and the plant's model bundles live."""

    bucket: str = Field(
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", description="Bucket name (S3 naming rules: 3-63 characters)."
    )
    prefix: str = Field(
        default="lineside",
        description="Key prefix: uploads under <prefix>/<station>/..., bundles under <prefix>/models/...",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="An S3-compatible store (MinIO, Ceph), e.g. http://minio.local:9000; none = AWS.",
    )
    region: str | None = Field(default=None, description="AWS region; none = boto3's default chain.")
    profile: str | None = Field(default=None, description="Named profile of the shared AWS files; none = default.")
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120, description="Seconds to open a connection.")
    read_timeout_s: float = Field(default=30.0, gt=0, le=600, description="Seconds to wait for a response.")

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if "//" in value:
            raise ValueError("prefix must not contain empty path segments ('//')")
        return value

    def key(self, *parts: str) -> str:
        """`<prefix>/<parts...>` ('/'-joined, no empty segments)."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))


def client_for(config: S3Config) -> Any:
    """A boto3 S3 client for the section; one per user (boto3 clients are thread-safe, sessions are not).

    botocore's own retries stay short (2 attempts): the callers retry with their own backoff and count.
    """
    import boto3  # lazily: only S3 users pay for importing it
    from botocore.config import Config

    from lineside.agent.config import resolve_secret

    session_args: dict[str, Any] = {}
    if config.profile:
        session_args["profile_name"] = config.profile
    access, secret = resolve_secret(ACCESS_KEY_CREDENTIAL), resolve_secret(SECRET_KEY_CREDENTIAL)
    if access and secret:
        session_args.update(aws_access_key_id=access, aws_secret_access_key=secret)
        token = resolve_secret(SESSION_TOKEN_CREDENTIAL)
        if token:
            session_args["aws_session_token"] = token
        logger.info("s3: credentials from the service's credentials (%s)", ACCESS_KEY_CREDENTIAL)
    session = boto3.session.Session(**session_args)
    return session.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        config=Config(
            connect_timeout=config.connect_timeout_s,
            read_timeout=config.read_timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
        ),
    )


def client_error(err: BaseException) -> tuple[str, int, str]:
    """(code, HTTP status, message) of an S3 failure, without anything secret (never the request or its
    headers). The code falls back to the HTTP status (a HEAD's error has no body), then the exception type."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        error = response.get("Error") or {}
        status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        code = str(error.get("Code") or status or "unknown")
        return code, status, str(error.get("Message") or f"HTTP {status}")[:300]
    return type(err).__name__, 0, str(err)[:300]
