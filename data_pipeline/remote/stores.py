"""Object stores: ``s3://bucket/prefix`` through boto3 (any S3-compatible endpoint) and read-only
``https://`` mirrors through urllib3.

boto3 reads ``AWS_ENDPOINT_URL``, the credentials environment variables, ``~/.aws`` profiles and
instance roles exactly as the AWS CLI does, and its transfer manager downloads large objects in
parallel ranges. Credentials are never logged: messages name the bucket, key and endpoint only.
Errors come out as three kinds (``data_pipeline.remote.retry`` decides what to do with each):
``MissingObject`` (404), ``DataError`` for what the user must fix (credentials, a missing bucket,
refused access), and ``OSError`` for everything else (worth another try).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from data_pipeline.dataset.locations import RemoteSpec
from engine.errors import DataError


class MissingObject(DataError):
    """The object does not exist (HTTP 404): not worth retrying."""


# Answers that mean "not now": throttling (S3's SlowDown is a 503), timeouts, overload.
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
TRANSIENT_CODES = (
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeTooSkewed",
)


def split_url(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b'); 'https://host/a' -> ('https', 'https://host', 'a')."""
    m = re.fullmatch(r"(s3|https?)://([^/]+)/?(.*)", url.rstrip("/"))
    if not m:
        raise DataError(f"data.shards={url!r}: expected s3://bucket/prefix or https://host/path")
    scheme, host, prefix = m.groups()
    return scheme, (host if scheme == "s3" else f"{scheme}://{host}"), prefix


class ObjectStore:
    """Objects under one location (``url``), named relative to it. Every method raises
    ``MissingObject``, ``DataError`` (the user must act) or ``OSError`` (worth another try)."""

    url: str
    spec: RemoteSpec

    def where(self, name: str) -> str:
        """The object's full location, for messages."""
        raise NotImplementedError

    def get(self, name: str) -> bytes:
        raise NotImplementedError

    def get_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        raise NotImplementedError

    def download(self, name: str, dest: Path) -> None:
        """The object's bytes into the file ``dest``."""
        raise NotImplementedError

    def put(self, path: Path, name: str) -> None:
        raise NotImplementedError

    def head(self, name: str) -> tuple[int, str]:
        """(size, version tag)."""
        raise NotImplementedError

    def list_tars(self) -> list[str]:
        """Locations of the ``*.tar`` objects directly under ``url``, sorted."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        try:
            self.head(name)
        except MissingObject:
            return False
        return True


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix`` through boto3 (any S3-compatible endpoint)."""

    def __init__(self, url: str, spec: RemoteSpec):
        _, self.bucket, self.prefix = split_url(url)
        self.url, self.spec = url.rstrip("/"), spec
        self._client = None

    def __getstate__(self) -> dict:  # clients do not cross process boundaries
        return {**self.__dict__, "_client": None}

    @property
    def endpoint(self) -> str:
        return self.spec.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL", "")

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"max_attempts": 2, "mode": "standard"},  # our own retries (with backoff) wrap these
                connect_timeout=self.spec.timeout_s,
                read_timeout=self.spec.timeout_s,
                max_pool_connections=32,
            )
            self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint or None, config=config)
        return self._client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def where(self, name: str) -> str:
        at = f" (endpoint {self.endpoint})" if self.endpoint else ""
        return f"s3://{self.bucket}/{self.key(name)}{at}"

    def get(self, name: str) -> bytes:
        with self._errors(name):
            return self.client.get_object(Bucket=self.bucket, Key=self.key(name))["Body"].read()

    def get_range(self, name: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        with self._errors(name):
            r = self.client.get_object(Bucket=self.bucket, Key=self.key(name), Range=f"bytes={start}-{end - 1}")
            return r["Body"].read()

    def download(self, name: str, dest: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=32 << 20, max_concurrency=8)
        with self._errors(name):
            self.client.download_file(self.bucket, self.key(name), str(dest), Config=config)

    def put(self, path: Path, name: str) -> None:
        with self._errors(name):
            self.client.upload_file(str(path), self.bucket, self.key(name))

    def head(self, name: str) -> tuple[int, str]:
        """(size, version tag) of an object."""
        with self._errors(name):
            r = self.client.head_object(Bucket=self.bucket, Key=self.key(name))
        return int(r["ContentLength"]), str(r.get("ETag", "")).strip('"')

    def list_tars(self) -> list[str]:
        """URLs of the *.tar objects directly under the prefix, sorted."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        found = []
        with self._errors(""):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            ):
                found += [o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".tar")]
        return [f"s3://{self.bucket}/{k}" for k in sorted(found)]

    @contextlib.contextmanager
    def _errors(self, name: str):
        """botocore's exceptions -> one line naming the object (never the credentials): a missing object,
        something the user must fix (``DataError``), or a condition of the moment (``OSError``)."""
        from boto3.exceptions import RetriesExceededError as Boto3RetriesExceeded
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from s3transfer.exceptions import RetriesExceededError

        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise DataError(
                f"{self.where(name)}: no usable AWS credentials ({err}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use an instance role"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchBucket", "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise DataError(f"{self.where(name)}: {code} (check the bucket name and the credentials)") from None
            if code in ("404", "NoSuchKey", "NotFound") or status == 404:
                raise MissingObject(f"{self.where(name)} does not exist") from None
            if status in TRANSIENT_STATUS or status >= 500 or code in TRANSIENT_CODES:
                what = f"{code} (HTTP {status})" if code and code != str(status) else f"HTTP {status}"
                raise OSError(f"{self.where(name)}: {what}") from None
            raise DataError(f"{self.where(name)}: {code or status} (HTTP {status}), refused by the store") from None
        except (BotoCoreError, RetriesExceededError, Boto3RetriesExceeded) as err:  # connections, timeouts, cuts
            raise OSError(f"{self.where(name)}: {type(err).__name__}: {str(err)[:200]}") from None
        except S3UploadFailedError as err:  # boto3 folds the ClientError of an upload into its text
            if any(code in str(err) for code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId")):
                raise DataError(f"{self.where(name)}: {err} (check the bucket name and the credentials)") from None
            raise OSError(f"{self.where(name)}: {err}") from None


class HttpStore(ObjectStore):
    """Objects under an ``https://`` mirror (read-only), through urllib3."""

    def __init__(self, url: str, spec: RemoteSpec):
        self.url, self.spec = url.rstrip("/"), spec
        self._pool = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}

    @property
    def pool(self):
        if self._pool is None:
            import urllib3

            timeout = urllib3.Timeout(connect=self.spec.timeout_s, read=self.spec.timeout_s)
            self._pool = urllib3.PoolManager(timeout=timeout, retries=urllib3.Retry(total=1, redirect=3))
        return self._pool

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _get(self, name: str, preload: bool):
        import urllib3

        try:
            r = self.pool.request("GET", self.where(name), preload_content=preload)
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__}") from None
        try:
            self._status(name, r.status)
        except (DataError, OSError):
            r.release_conn()
            raise
        return r

    def _status(self, name: str, status: int) -> None:
        if status in (404, 410):
            raise MissingObject(f"{self.where(name)} does not exist (HTTP {status})")
        if status in (401, 403):
            raise DataError(f"{self.where(name)}: HTTP {status} (the mirror refuses access)")
        if status in TRANSIENT_STATUS or status >= 500:
            raise OSError(f"{self.where(name)}: HTTP {status}")
        if status != 200:
            raise DataError(f"{self.where(name)}: HTTP {status}, refused by the mirror")

    def get(self, name: str) -> bytes:
        return self._get(name, preload=True).data

    def get_range(self, name: str, start: int, end: int) -> bytes:
        import urllib3

        if end <= start:
            return b""
        try:
            r = self.pool.request("GET", self.where(name), headers={"Range": f"bytes={start}-{end - 1}"})
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__}") from None
        if r.status == 206:
            return r.data
        self._status(name, r.status)
        return r.data[start:end]  # a server that ignores ranges sends the whole object

    def download(self, name: str, dest: Path) -> None:
        import urllib3

        r = self._get(name, preload=False)
        try:
            with open(dest, "wb") as f:
                for block in r.stream(1 << 20):
                    f.write(block)
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__} while reading") from None
        finally:
            r.release_conn()

    def put(self, path: Path, name: str) -> None:
        raise DataError(f"{self.url}: https:// locations are read-only; upload to s3:// instead")

    def head(self, name: str) -> tuple[int, str]:
        import urllib3

        try:
            r = self.pool.request("HEAD", self.where(name))
        except urllib3.exceptions.HTTPError as err:
            raise OSError(f"{self.where(name)}: {type(err).__name__}") from None
        self._status(name, r.status)
        tag = r.headers.get("ETag") or r.headers.get("Last-Modified") or ""
        return int(r.headers.get("Content-Length", -1)), tag.strip('"')

    def list_tars(self) -> list[str]:
        raise DataError(f"{self.url}: an https:// mirror cannot be listed; name its tars (a brace pattern)")


# scheme -> store class; ``register`` adds one (an in-memory store in the tests, say)
STORES: dict[str, type[ObjectStore]] = {"s3": S3Store, "https": HttpStore, "http": HttpStore}


def register(scheme: str, store: type[ObjectStore]) -> None:
    """Serve ``scheme://...`` locations with ``store`` (their shards then count as remote)."""
    from data_pipeline.dataset.locations import register_scheme

    STORES[scheme] = store
    register_scheme(f"{scheme}://")


def make_store(url: str, spec: RemoteSpec | None = None) -> ObjectStore:
    scheme = url.split("://", 1)[0]
    if scheme not in STORES:
        raise DataError(f"{url}: no store for {scheme}:// (known: {sorted(STORES)})")
    return STORES[scheme](url, spec or RemoteSpec())
