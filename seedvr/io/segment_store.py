"""The bucket's room for the intermediates of a job spread over workers: its uploaded source and its segments.

Every object lives under the key prefix PREFIX, in one folder per job recipe (seedvr.serving.fanout.recipe):

    seedvr-intermediates/<recipe digest>/source<ext>                   base64 media, uploaded for the other workers
    seedvr-intermediates/<recipe digest>/segment-<first>-<last>.mkv    a restored segment, lossless (FFV1 RGB)

Where that is, from BUCKET_ENDPOINT_URL (the same variables as seedvr.io.delivery):
- the URL names the bucket in its path (https://host/my-bucket[/folder], the usual form for S3, R2, MinIO): the
  objects go to that bucket under [folder/]PREFIX/, and the store can list them;
- the URL has no path (https://my-bucket.nyc3.digitaloceanspaces.com): PREFIX is passed as the bucket argument, as
  runpod's rp_upload passes its month, so a host that names the bucket makes it the first level of the key (a
  plain endpoint would need a bucket of that name). Such a store cannot list its objects.

An object is kept until the job that made it succeeds (which deletes its folder), or for MAX_AGE_S (24 h): an older
one is deleted when it is next looked at (`fresh`), and `expire` sweeps every older object under PREFIX where the
store can list (every coordinator calls it first). A bucket lifecycle rule on PREFIX/ does the same for any store.
"""

import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from seedvr import settings
from seedvr.errors import INTERNAL, RestoreError
from seedvr.io.delivery import failure_reason, s3_client  # the delivery's client: its timeouts and retries

log = logging.getLogger(__name__)

PREFIX = "seedvr-intermediates"
MAX_AGE_S = 24 * 3600
PRESIGNED_URL_LIFETIME_S = 24 * 3600  # a source URL handed to the segment jobs lives as long as the source
DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


@dataclass(frozen=True)
class Place:
    """Where the objects are: the URL the client talks to, the bucket argument, and the prefix of every key."""

    endpoint_url: str
    bucket: str
    prefix: str  # ends with "/"
    listable: bool


def place_of(endpoint_url: str) -> Place:
    """See the module docstring."""
    parts = urlsplit(endpoint_url)
    path = parts.path.strip("/")
    if not path:
        return Place(endpoint_url, PREFIX, "", False)
    bucket, _, folder = path.partition("/")
    return Place(f"{parts.scheme}://{parts.netloc}", bucket, f"{folder}/{PREFIX}/" if folder else f"{PREFIX}/", True)


class SegmentStore:
    """put / fetch / delete objects by their key below the store's prefix (e.g. "<digest>/segment-0-1.mkv")."""

    def __init__(self, bucket: settings.Bucket) -> None:
        self.place = place_of(bucket.endpoint_url)
        self._client: Any = s3_client(replace(bucket, endpoint_url=self.place.endpoint_url))

    def _key(self, key: str) -> str:
        return self.place.prefix + key

    def put(self, key: str, path: Path, mime: str) -> None:
        started = time.monotonic()
        self._call("upload", key, lambda: self._client.upload_file(str(path), self.place.bucket, self._key(key),
                                                                   ExtraArgs={"ContentType": mime}))
        log.info("stored %s (%d bytes) in %.1f s", key, path.stat().st_size, time.monotonic() - started)

    def fetch(self, key: str, path: Path) -> None:
        self._call("download", key, lambda: self._client.download_file(self.place.bucket, self._key(key), str(path)))

    def age_s(self, key: str) -> float | None:
        """Seconds since the object was written, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            head = self._client.head_object(Bucket=self.place.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._failure("look up", key, error) from error
        except Exception as error:
            raise self._failure("look up", key, error) from error
        return max(0.0, time.time() - head["LastModified"].timestamp())

    def fresh(self, key: str) -> bool:
        """Whether the object exists and is younger than MAX_AGE_S; an older one is deleted."""
        age = self.age_s(key)
        if age is not None and age >= MAX_AGE_S:
            log.info("removing %s: written %.0f h ago", key, age / 3600)
            self.delete([key])
            return False
        return age is not None

    def url(self, key: str) -> str:
        """A presigned GET URL of the object (PRESIGNED_URL_LIFETIME_S)."""
        return self._call("sign", key, lambda: self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.place.bucket, "Key": self._key(key)},
            ExpiresIn=PRESIGNED_URL_LIFETIME_S))

    def delete(self, keys: list[str]) -> None:
        for first in range(0, len(keys), DELETE_BATCH):
            batch = [{"Key": self._key(key)} for key in keys[first:first + DELETE_BATCH]]
            request = {"Bucket": self.place.bucket, "Delete": {"Objects": batch, "Quiet": True}}
            self._call("delete", keys[first], partial(self._client.delete_objects, **request))

    def keys(self, folder: str = "") -> list[tuple[str, float]]:
        """(key, age in seconds) of every object below `folder`; [] when the store cannot list."""
        if not self.place.listable:
            return []
        found = []
        paginator = self._client.get_paginator("list_objects_v2")
        now = time.time()
        pages = self._call("list", folder or "/", lambda: list(paginator.paginate(
            Bucket=self.place.bucket, Prefix=self._key(folder))))
        for page in pages:
            for item in page.get("Contents", []):
                found.append((item["Key"][len(self.place.prefix):], now - item["LastModified"].timestamp()))
        return found

    def expire(self) -> list[str]:
        """Delete every object older than MAX_AGE_S (where the store can list); the keys deleted."""
        old = [key for key, age in self.keys() if age >= MAX_AGE_S]
        if old:
            log.info("removing %d intermediates older than %d h", len(old), MAX_AGE_S // 3600)
            self.delete(old)
        return old

    def _call(self, action: str, key: str, call: Any) -> Any:
        try:
            return call()
        except Exception as error:
            raise self._failure(action, key, error) from error

    def _failure(self, action: str, key: str, error: BaseException) -> RestoreError:
        log.error("the bucket could not %s %s (endpoint %s, bucket %s)", action, key, self.place.endpoint_url,
                  self.place.bucket, exc_info=error)
        return RestoreError(INTERNAL, f"the bucket could not {action} the intermediate {key} "
                                      f"({failure_reason(error)}); see the worker log")
