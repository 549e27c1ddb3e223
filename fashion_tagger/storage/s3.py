"""S3 (AWS, MinIO, moto) in the project's terms: the client (endpoint from AWS_ENDPOINT_URL), the one mapping of
botocore failures onto the error contract, and `S3Store`, a prefix of a bucket behind the `Store` interface.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from fashion_tagger.core import io
from fashion_tagger.core.errors import SourceError, SourceUnavailableError
from fashion_tagger.storage.base import Store, check_key, join_key, nonempty_prefix, relative_key

S3_THREADS = 16  # parallel transfers; small objects on a local endpoint are latency-bound, not bandwidth-bound
DATA_HINT = "endpoint: set data.s3_endpoint_url or AWS_ENDPOINT_URL"
STORE_HINT = "check the bucket, the key and the credentials; the endpoint comes from AWS_ENDPOINT_URL"
MULTIPART_BYTES = 64 << 20  # larger files go up in parts (upload_file); smaller ones in one PUT
_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
# Seconds a request waits to connect, and then for each answer, before it counts as "did not answer" (botocore
# retries it, then the stage fails as transient and its task is retried). botocore's default is 60.
TIMEOUT_ENV = "FASHION_TAGGER_S3_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60.0


def s3_timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise SourceError(f"${TIMEOUT_ENV}={value!r}: give the seconds an S3 request may wait for an answer, a "
                          f"positive number (default {DEFAULT_TIMEOUT_S:g})")
    return seconds


def connect_s3(endpoint_url: str | None, *, max_connections: int | None = None) -> Any:
    """A boto3 S3 client for ENDPOINT_URL, else $AWS_ENDPOINT_URL or $MLFLOW_S3_ENDPOINT_URL, else AWS.

    MAX_CONNECTIONS sizes its connection pool for that many threads sharing it (boto3 keeps 10 by default). Each
    client gets a session of its own, so it reads the credentials the environment holds now: boto3's default
    session keeps the first ones it found for the life of the process."""
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    timeout = s3_timeout_s()
    config = Config(connect_timeout=timeout, read_timeout=timeout,
                    **({"max_pool_connections": max_connections} if max_connections else {}))
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


@contextmanager
def s3_errors(what: str, hint: str = DATA_HINT) -> Iterator[None]:
    """S3 failures in the error contract's terms: an endpoint that does not answer or drops the connection mid-
    transfer is transient (retried), any other S3 error (no such bucket or key, access denied) is bad input; both
    name WHAT was being done."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    try:
        yield
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
            ResponseStreamingError) as exc:
        raise SourceUnavailableError(f"{what} failed: {exc}; the S3 endpoint did not answer") from exc
    except (BotoCoreError, ClientError) as exc:
        raise SourceError(f"{what} failed: {exc} ({hint})") from exc


def list_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Every key of BUCKET under PREFIX, all pages."""
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    return keys


def _is_not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey")


class S3Store(Store):
    """The objects under s3://BUCKET/PREFIX; the client is made on first use, so building a store needs no network."""

    transfer_threads = S3_THREADS

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = check_key(prefix, prefix=True)
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect_s3(None, max_connections=S3_THREADS)
        return self._client

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _errors(self, verb: str, key: str) -> AbstractContextManager[None]:
        return s3_errors(f"{verb} {self.url(key)}", STORE_HINT)

    def exists(self, key: str) -> bool:
        with self._errors("looking up", key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as exc:
                if _is_not_found(exc):
                    return False
                raise
        return True

    def read_bytes(self, key: str) -> bytes:
        with self._errors("reading", key):
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        return body

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("writing", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def download(self, key: str, dest: Path) -> Path:
        # One streamed GET: download_file would add a HEAD and a transfer manager per object, which dominates
        # for the many small objects a stage reads.
        with self._errors("downloading", key), io.atomic_path(dest) as tmp, tmp.open("wb") as out:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            for chunk in body.iter_chunks(1 << 20):
                out.write(chunk)
        return dest

    def upload(self, src: Path, key: str) -> None:
        with self._errors("uploading to", key):
            if src.stat().st_size < MULTIPART_BYTES:
                with src.open("rb") as body:
                    self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body)
            else:  # multipart: S3 shows the object only once every part is there
                self.client.upload_file(str(src), self.bucket, self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        prefix = check_key(prefix, prefix=True)
        base = join_key(self.prefix, prefix) if prefix else self.prefix
        with s3_errors(f"listing {self.location}/{prefix}".rstrip("/"), STORE_HINT):
            keys = list_keys(self.client, self.bucket, f"{base}/" if base else "")
        return sorted(relative_key(k, self.prefix) for k in keys)

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> int:
        prefix = nonempty_prefix(prefix, "delete_prefix")
        keys = [self._key(k) for k in self.list(prefix)]
        with s3_errors(f"deleting {self.location}/{prefix}", STORE_HINT):
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = [{"Key": k} for k in keys[start : start + _DELETE_BATCH]]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise SourceError(f"deleting s3://{self.bucket}/{first.get('Key')} failed: "
                                      f"{first.get('Code')} {first.get('Message')} ({STORE_HINT})")
        return len(keys)
