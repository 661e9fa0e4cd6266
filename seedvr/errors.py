"""Errors the worker reports to clients.

Every failure a client can see is a `RestoreError`. Its string form is
`"<CODE>: <message>"`: runpod's local API drops every field of a failed job but
`error` and answers 500 to a non-string error, so the machine-readable code
travels at the head of the string.
"""

import errno
import shutil
from pathlib import Path

INVALID_INPUT = "INVALID_INPUT"
UNSUPPORTED_MEDIA = "UNSUPPORTED_MEDIA"
MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE"
OUT_OF_MEMORY = "OUT_OF_MEMORY"
OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"  # the answer cannot carry the result inline: a bucket or a smaller result
NO_SPACE = "NO_SPACE"  # a disk of the worker is full: the operator's problem, a retry elsewhere may succeed
WORKER_FAULT = "WORKER_FAULT"  # a process of the worker died or hung twice in one job: a retry may succeed
CANCELLED = "CANCELLED"  # RunPod stopped the job (never answered: the job ends with CancelledError)
INTERNAL = "INTERNAL"

CODES = (INVALID_INPUT, UNSUPPORTED_MEDIA, MODEL_NOT_AVAILABLE, OUT_OF_MEMORY, OUTPUT_TOO_LARGE, NO_SPACE, WORKER_FAULT,
         CANCELLED, INTERNAL)


class RestoreError(Exception):
    """A failure with a code and a message that is safe to show the client."""

    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class WorkerFault(RestoreError):
    """A part of the worker failed (a rank process died or stalled); retrying the job may succeed."""

    def __init__(self, message: str):
        super().__init__(WORKER_FAULT, message)


def no_space(folder: Path, what: str) -> RestoreError:
    """NO_SPACE naming the full folder and what is left on its disk."""
    try:
        usage = shutil.disk_usage(folder if folder.exists() else folder.parent)
        left = f"{usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.0f} MB"
    except OSError:
        left = "free space unknown"
    return RestoreError(NO_SPACE, f"{what}: the worker's disk at {folder} is full ({left}); free space on the worker "
                                  "(or give it a larger temporary disk) and send the job again")


class CheckpointError(RestoreError):
    """A weight file is missing, truncated or does not match the model."""

    def __init__(self, message: str):
        super().__init__(MODEL_NOT_AVAILABLE, message)


def excerpt(value: object, limit: int = 40) -> str:
    """A short, printable excerpt of a client value for error messages."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)


def is_no_space(error: BaseException | None) -> bool:
    """Whether an OSError (or one in its causes) is a full disk."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
    return False
