"""Hand the restored file back to the client: inline as base64, or as a URL in an S3 bucket.

Restored videos easily exceed what RunPod accepts in a job response (about 20 MB), so a
result can go to an S3-compatible bucket instead, configured the RunPod way through
`BUCKET_ENDPOINT_URL`, `BUCKET_ACCESS_KEY_ID` and `BUCKET_SECRET_ACCESS_KEY`.

Uploads follow the conventions of runpod's own helper
(`runpod.serverless.utils.rp_upload.upload_file_to_bucket`): path-style requests to the
endpoint URL; the "bucket" argument set to the current month ("%m-%y"), which becomes the
first level of the object key when the endpoint URL already names the bucket
(`https://my-bucket.nyc3.digitaloceanspaces.com`, `http://minio:9000/my-bucket`); the region
read from the endpoint URL by rp_upload's `extract_region_from_url`; and a presigned GET URL,
valid for 7 days, as the result. Two things of that helper we cannot use as is:

- Without bucket settings it silently copies the file to `./local_upload/` and returns that
  local path as if it were a URL; here a missing bucket is a clear INVALID_INPUT error.
- Its client keeps botocore's 60 s connect timeout for each of its 3 attempts, so an endpoint
  that drops packets holds the (GPU-billed) job for over 3 minutes before failing; it takes
  no client config. We therefore build the client ourselves with the same settings plus a
  short connect timeout, bounding a dead endpoint to about 20 s.
"""

import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seedvr import settings
from seedvr.errors import INTERNAL, INVALID_INPUT, RestoreError
from seedvr.io.media.payload import encode_file_base64

log = logging.getLogger(__name__)

MODES = ("base64", "url", "auto")

PRESIGNED_URL_LIFETIME_S = 7 * 24 * 3600  # the SigV4 maximum, as rp_upload uses
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class DeliverySpec:
    """How the client wants results back: `mode` (auto, base64, url) and base64 as data URIs or not."""

    mode: str = "auto"
    return_data_uri: bool = False


@dataclass(frozen=True)
class Delivered:
    """How a result reaches the client.

    kind: "base64" or "url". value: the base64 text (or a `data:<mime>;base64,...` URI), or the
    presigned URL. size_bytes: size of the delivered file itself (before any encoding).
    """

    kind: str
    value: str
    size_bytes: int


def deliver(path: Path, *, mode: str, job_id: str, mime: str, return_data_uri: bool = False) -> Delivered:
    """Deliver the file at `path` as base64 ("base64"), as a bucket URL ("url"), or by size ("auto").

    "auto" inlines the result when its encoded form is below the base64 limit
    (setting `SEEDVR_BASE64_LIMIT_BYTES`, default 15 MB) and uploads it otherwise.
    """
    if mode not in MODES:
        raise RestoreError(INVALID_INPUT, f"output_delivery must be one of {', '.join(MODES)}; got {mode!r}")
    path = Path(path)
    size = path.stat().st_size
    prefix = f"data:{mime};base64," if return_data_uri else ""
    worker = settings.current()
    if mode == "base64" or (mode == "auto" and len(prefix) + _base64_length(size) < worker.base64_limit_bytes):
        value = encode_file_base64(path, mime if return_data_uri else None)
        return Delivered(kind="base64", value=value, size_bytes=size)

    if worker.bucket is None:
        reason = ("output_delivery 'url' needs an S3-compatible bucket" if mode == "url" else
                  f"the result ({size} bytes) is too large to return inline, so it must go to a bucket")
        raise RestoreError(INVALID_INPUT, f"{reason}, but the worker has none configured: set the environment "
                                          f"variables {', '.join(settings.BUCKET_VARIABLES)}")
    return Delivered(kind="url", value=_upload(path, worker.bucket, job_id=job_id, mime=mime), size_bytes=size)


def _base64_length(size: int) -> int:
    return 4 * ((size + 2) // 3)



def object_key(job_id: str, path: Path) -> str:
    """`<job id>/<8 random hex><extension>`: namespaced by job, unique per upload."""
    job = re.sub(r"[^A-Za-z0-9._-]", "_", str(job_id)).strip(".") or "job"
    extension = re.sub(r"[^A-Za-z0-9.]", "", Path(path).suffix.lower())
    return f"{job}/{uuid.uuid4().hex[:8]}{extension}"


def _s3_client(bucket: settings.Bucket) -> Any:
    """An S3 client configured like rp_upload.get_boto_client, with a bounded connect timeout."""
    from boto3 import session
    from botocore.config import Config
    from runpod.serverless.utils.rp_upload import extract_region_from_url

    endpoint_url = bucket.endpoint_url
    config = Config(signature_version="s3v4", connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                    retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
    return session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=bucket.access_key_id,
        aws_secret_access_key=bucket.secret_access_key,
        region_name=extract_region_from_url(endpoint_url),
        config=config,
    )


def _upload(path: Path, target: settings.Bucket, *, job_id: str, mime: str) -> str:
    """Upload to the configured bucket; the presigned GET URL of the object."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = time.strftime("%m-%y")  # rp_upload's default bucket name (a key prefix when the endpoint names the bucket)
    key = object_key(job_id, path)
    started = time.monotonic()
    try:
        client = _s3_client(target)
        client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": mime})
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                            ExpiresIn=PRESIGNED_URL_LIFETIME_S)
    except (BotoCoreError, ClientError, Boto3Error, ValueError) as error:
        log.error("upload of %s to %s (bucket %s, key %s) failed", path, target.endpoint_url,
                  bucket, key, exc_info=True)
        raise RestoreError(INTERNAL, f"uploading the result to the bucket failed ({_failure_reason(error)}); "
                                     "see the worker log") from error
    log.info("uploaded %s (%d bytes) as %s/%s in %.1f s", path.name, path.stat().st_size, bucket, key,
             time.monotonic() - started)
    return url


def _failure_reason(error: BaseException) -> str:
    """The S3 error code (e.g. NoSuchBucket, InvalidAccessKeyId) if there is one, else the error's type."""
    from botocore.exceptions import ClientError

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ClientError):
            return cause.response.get("Error", {}).get("Code") or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__
