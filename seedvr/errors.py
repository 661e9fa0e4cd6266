"""Errors the worker reports to clients.

Every failure a client can see is a `RestoreError`. Its string form is
`"<CODE>: <message>"`: runpod's local API drops every field of a failed job but
`error` and answers 500 to a non-string error, so the machine-readable code
travels at the head of the string.
"""

INVALID_INPUT = "INVALID_INPUT"
UNSUPPORTED_MEDIA = "UNSUPPORTED_MEDIA"
MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE"
OUT_OF_MEMORY = "OUT_OF_MEMORY"
INTERNAL = "INTERNAL"

CODES = (INVALID_INPUT, UNSUPPORTED_MEDIA, MODEL_NOT_AVAILABLE, OUT_OF_MEMORY, INTERNAL)


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


class CheckpointError(RestoreError):
    """A weight file is missing, truncated or does not match the model."""

    def __init__(self, message: str):
        super().__init__(MODEL_NOT_AVAILABLE, message)


def excerpt(value: object, limit: int = 40) -> str:
    """A short, printable excerpt of a client value for error messages."""
    text = value if isinstance(value, str) else repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return repr(text[:limit] + "…") if len(text) > limit else repr(text)
