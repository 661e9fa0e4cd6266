"""Hand the restored file back to the client: inline as base64, or as a URL in an S3 bucket.

The inline limit is counted in one unit, the bytes of base64 text the JSON answer carries (a data URI's
`data:<mime>;base64,` prefix included): every result and before/after picture of a job shares one
`InlineBudget` of `SEEDVR_BASE64_LIMIT_BYTES` (default 15,000,000: RunPod takes about 20 MB in a job's answer
and refuses a larger one at its job-done endpoint with 400 Bad Request, the result lost, as reported in
runpod-workers/worker-comfyui#129; runpod-python's own tip names 20 MB too). A text the answer carries twice
(`media` and its legacy alias `videos`) counts twice. "auto" inlines a result while it fits the budget and
uploads it otherwise; "base64" inlines it while it fits; a result that must be inline but does not fit fails
the job with OUTPUT_TOO_LARGE, whose message gives the sizes in that same unit and the fixes (a bucket, a
smaller result). `inline_risk` warns of that before the work, from a low estimate of the results' size.

A result can go to an S3-compatible bucket, configured the RunPod way through
`BUCKET_ENDPOINT_URL`, `BUCKET_ACCESS_KEY_ID` and `BUCKET_SECRET_ACCESS_KEY`.

Uploads follow the conventions of runpod's own helper
(`runpod.serverless.utils.rp_upload.upload_file_to_bucket`): path-style requests to the
endpoint URL; the "bucket" argument set to the current month ("%m-%y"), which becomes the
first level of the object key when the endpoint URL already names the bucket
(`https://my-bucket.nyc3.digitaloceanspaces.com`, `http://minio:9000/my-bucket`); the region
read from the endpoint URL by rp_upload's `extract_region_from_url`; and a presigned GET URL,
valid for 7 days, as the result. Two things of that helper we cannot use as is:

- Without bucket settings it silently copies the file to `./local_upload/` and returns that
  local path as if it were a URL; here a missing bucket is a clear error.
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
from seedvr.errors import INTERNAL, INVALID_INPUT, OUTPUT_TOO_LARGE, RestoreError
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


@dataclass
class InlineBudget:
    """The base64 text one answer may carry inline, shared by every result and picture of a job.

    limit: results are inlined only while `used` stays below it (SEEDVR_BASE64_LIMIT_BYTES).
    result_copies: how many times the answer carries a result's text (2 when `videos` repeats `media`); a
    before/after picture is carried once.
    """

    limit: int
    result_copies: int = 1
    used: int = 0

    @classmethod
    def from_settings(cls, result_copies: int = 1) -> "InlineBudget":
        return cls(settings.current().base64_limit_bytes, result_copies)

    def fits(self, text_bytes: int) -> bool:
        return self.used + text_bytes < self.limit


def inline_bytes(file_bytes: int, mime: str | None = None) -> int:
    """The length of a file's base64 text: standard padded base64, after a `data:<mime>;base64,` prefix when
    `mime` is given (the bytes the answer carries; the text is ASCII, one byte a character)."""
    prefix = len(f"data:{mime};base64,") if mime else 0
    return prefix + 4 * ((file_bytes + 2) // 3)


def inline_forced(spec: DeliverySpec, bucket: settings.Bucket | None) -> bool:
    """Whether every result must travel inside the answer: "base64", or "auto" on a worker without a bucket."""
    return spec.mode == "base64" or (spec.mode == "auto" and bucket is None)


def deliver(path: Path, *, mode: str, job_id: str, mime: str, return_data_uri: bool = False,
            budget: InlineBudget | None = None, copies: int = 1, what: str = "the result",
            smaller: str = "a lower res_h/res_w or scale") -> Delivered:
    """Deliver the file at `path` as base64 ("base64"), as a bucket URL ("url"), or by size ("auto").

    A result goes inline while its text, counted `copies` times (see InlineBudget), fits `budget` (by default
    a budget of its own); "auto" uploads one that does not fit. OUTPUT_TOO_LARGE when it must be inline and does not
    fit: the message names it (`what`, e.g. "the restored video of media[1]") and how to make it `smaller`.
    """
    if mode not in MODES:
        raise RestoreError(INVALID_INPUT, f"output_delivery must be one of {', '.join(MODES)}; got {mode!r}")
    path = Path(path)
    size = path.stat().st_size
    worker = settings.current()
    budget = InlineBudget(worker.base64_limit_bytes) if budget is None else budget
    text_bytes = copies * inline_bytes(size, mime if return_data_uri else None)
    if mode != "url" and budget.fits(text_bytes):
        value = encode_file_base64(path, mime if return_data_uri else None)
        budget.used += text_bytes
        return Delivered(kind="base64", value=value, size_bytes=size)
    if inline_forced(DeliverySpec(mode, return_data_uri), worker.bucket):
        raise _too_large(what, size, text_bytes, copies, budget, mode, worker.bucket, smaller)
    if worker.bucket is None:
        raise RestoreError(INVALID_INPUT, "output_delivery 'url' needs an S3-compatible bucket, but the worker has "
                                          f"none configured: set the environment variables "
                                          f"{', '.join(settings.BUCKET_VARIABLES)}")
    return Delivered(kind="url", value=_upload(path, worker.bucket, job_id=job_id, mime=mime), size_bytes=size)


def _too_large(what: str, size: int, text_bytes: int, copies: int, budget: InlineBudget, mode: str,
               bucket: settings.Bucket | None, smaller: str) -> RestoreError:
    """OUTPUT_TOO_LARGE with every size in bytes of base64, as the limit is, and the ways out."""
    twice = f", counted {copies} times as the answer repeats it in `videos`" if copies > 1 else ""
    before = f", on top of {budget.used} bytes already inline for earlier results" if budget.used else ""
    return RestoreError(OUTPUT_TOO_LARGE,
                        f"{what} is {text_bytes} bytes of base64 (a {size}-byte file{twice}){before}; an answer "
                        f"carries results inline only below {budget.limit} bytes of base64 "
                        f"(SEEDVR_BASE64_LIMIT_BYTES): {_way_out(mode, bucket)}, or ask for a smaller result "
                        f"({smaller})")


def _way_out(mode: str, bucket: settings.Bucket | None) -> str:
    if bucket is None:
        return (f"configure a bucket ({', '.join(settings.BUCKET_VARIABLES)}) so that output_delivery \"auto\" "
                "or \"url\" returns a URL")
    return f"send output_delivery \"auto\" or \"url\" instead of {mode!r} to get a URL from the bucket"


def inline_risk(least_bytes: int, spec: DeliverySpec, budget: InlineBudget, bucket: settings.Bucket | None,
                smaller: str) -> str | None:
    """A warning when results that must be inline will surely not fit: `least_bytes` is a low estimate of their
    base64 text, counted as InlineBudget counts (copies and data-URI prefixes included). None when they may fit
    or need not be inline."""
    if not inline_forced(spec, bucket) or budget.fits(least_bytes):
        return None
    return (f"the results will not fit in the answer: they come to at least {least_bytes} bytes of base64 (a low "
            f"estimate from their size, frames and encoding), and an answer carries results inline only below "
            f"{budget.limit} bytes of base64 (SEEDVR_BASE64_LIMIT_BYTES), so the job will most likely end in "
            f"OUTPUT_TOO_LARGE after the work; cancel it and {_way_out(spec.mode, bucket)}, or ask for a smaller "
            f"result ({smaller})")


def object_key(job_id: str, path: Path) -> str:
    """`<job id>/<8 random hex><extension>`: namespaced by job, unique per upload."""
    job = re.sub(r"[^A-Za-z0-9._-]", "_", str(job_id)).strip(".") or "job"
    extension = re.sub(r"[^A-Za-z0-9.]", "", Path(path).suffix.lower())
    return f"{job}/{uuid.uuid4().hex[:8]}{extension}"


def s3_client(bucket: settings.Bucket) -> Any:
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
        client = s3_client(target)
        client.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": mime})
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                            ExpiresIn=PRESIGNED_URL_LIFETIME_S)
    except (BotoCoreError, ClientError, Boto3Error, ValueError) as error:
        log.error("upload of %s to %s (bucket %s, key %s) failed", path, target.endpoint_url,
                  bucket, key, exc_info=True)
        raise RestoreError(INTERNAL, f"uploading the result to the bucket failed ({failure_reason(error)}); "
                                     "see the worker log") from error
    log.info("uploaded %s (%d bytes) as %s/%s in %.1f s", path.name, path.stat().st_size, bucket, key,
             time.monotonic() - started)
    return url


def failure_reason(error: BaseException) -> str:
    """The S3 error code (e.g. NoSuchBucket, InvalidAccessKeyId) if there is one, else the error's type."""
    from botocore.exceptions import ClientError

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ClientError):
            return cause.response.get("Error", {}).get("Code") or type(cause).__name__
        cause = cause.__cause__ or cause.__context__
    return type(error).__name__
