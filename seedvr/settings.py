"""The worker's settings: every SEEDVR_* and BUCKET_* environment variable, read and checked in one place.

    settings = current()          # a frozen Settings; raises SettingsError naming a bad variable

The worker checks them once at start (handler.py), so a bad value stops it there, in every mode, with a
message that names the variable and what it accepts; jobs then read the same values through `current()`.
`current()` re-reads the environment only when one of these variables changed (tests change them), so
reading a setting costs a dictionary lookup. `Settings.public()` is what `health` shows: never a secret.
"""

import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NETWORK_VOLUME = Path("/runpod-volume")  # a RunPod network volume, used for weights when mounted

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
MIN_OUTPUT_AREA = 16 * 16
DEFAULT_MAX_OUTPUT_AREA = 3840 * 2160  # 4K UHD
DEFAULT_MAX_CHUNK_FRAMES = 121  # see seedvr.engine.memory_plan
DEFAULT_BASE64_LIMIT_BYTES = 15_000_000  # below RunPod's 20 MB response limit, with room for the rest
DEFAULT_MAX_DOWNLOAD_BYTES = 2 * 1024**3
DEFAULT_DOWNLOAD_TIMEOUT_S = 120.0
DEFAULT_SP_STALL_S = 300.0  # a rank without progress this long is hung (its collective timeout too)

BUCKET_VARIABLES = ("BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY")
PATH_VARIABLES = ("SEEDVR_CONFIG_DIR", "SEEDVR_CKPT_DIR", "SEEDVR_EMBEDDINGS_DIR")
VARIABLES = (
    *PATH_VARIABLES,
    "SEEDVR_AUTO_DOWNLOAD",
    "SEEDVR_MAX_OUTPUT_AREA",
    "SEEDVR_MAX_CHUNK_FRAMES",
    "SEEDVR_BASE64_LIMIT_BYTES",
    "SEEDVR_MAX_DOWNLOAD_BYTES",
    "SEEDVR_DOWNLOAD_TIMEOUT_S",
    "SEEDVR_ALLOW_PRIVATE_URLS",
    "SEEDVR_DISABLE_NVENC",
    "SEEDVR_SP_STALL_S",
    "SEEDVR_COMPILE",
    "SEEDVR_ENDPOINT_URL",
    "SEEDVR_STREAMING",
    "SEEDVR_TEST_MEMORY_BUDGET_BYTES",
    "SEEDVR_TEST_MEMORY_SCALE",
    *BUCKET_VARIABLES,
)
# SEEDVR_* names the worker does not read but that are not typos either (the tests' reference data).
OTHER_KNOWN_VARIABLES = ("SEEDVR_REFERENCE_DIR",)


class SettingsError(Exception):
    """A variable holds a value the worker cannot run with; the message names it and what it accepts."""


@dataclass(frozen=True)
class Bucket:
    """An S3-compatible bucket for results, configured the RunPod way."""

    endpoint_url: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)


@dataclass(frozen=True)
class Settings:
    config_dir: Path  # holds configs_3b/ and configs_7b/
    ckpt_dir: Path
    embeddings_dir: Path
    auto_download: bool  # fetch missing weights on first use
    max_output_area: int  # the largest res_h * res_w a request may ask for
    max_chunk_frames: int  # the longest pass the memory plan makes on its own (4n + 1)
    base64_limit_bytes: int  # the largest base64 text an answer carries inline
    max_download_bytes: int  # media_url size cap
    download_timeout_s: float  # media_url overall deadline
    allow_private_urls: bool  # media_url may point at private / loopback addresses
    disable_nvenc: bool
    sp_stall_s: float  # a sequence-parallel rank without progress this long is torn down
    compile: bool  # torch.compile the DiT blocks when a request does not say
    endpoint_url: str | None  # this endpoint's API for a job's segment jobs (None: RunPod's, from RUNPOD_ENDPOINT_ID)
    streaming: bool  # the handler is a generator: progress and each result as stream events (/stream)
    bucket: Bucket | None
    test_memory_budget_bytes: int | None  # tests: a simulated device of this many bytes
    test_memory_scale: float  # tests: the simulated device needs this times the estimate

    def public(self) -> dict:
        """The effective settings as `health` shows them: paths and limits, never a key."""
        return {
            "config_dir": str(self.config_dir),
            "ckpt_dir": str(self.ckpt_dir),
            "embeddings_dir": str(self.embeddings_dir),
            "auto_download": self.auto_download,
            "max_output_area": self.max_output_area,
            "max_chunk_frames": self.max_chunk_frames,
            "base64_limit_bytes": self.base64_limit_bytes,
            "max_download_bytes": self.max_download_bytes,
            "download_timeout_s": self.download_timeout_s,
            "allow_private_urls": self.allow_private_urls,
            "disable_nvenc": self.disable_nvenc,
            "sp_stall_s": self.sp_stall_s,
            "compile": self.compile,
            "endpoint_url": self.endpoint_url,
            "streaming": self.streaming,
            "bucket_endpoint_url": self.bucket.endpoint_url if self.bucket else None,
        }


def _raw(environ: dict[str, str], name: str) -> str:
    return environ.get(name, "").strip()


def _shown(raw: str) -> str:
    return repr(raw if len(raw) <= 40 else raw[:40] + "…")


def _flag(environ: dict[str, str], name: str) -> bool:
    raw = _raw(environ, name).lower()
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise SettingsError(f"{name} must be 1/true/yes/on or 0/false/no/off (or unset), got {_shown(raw)}")


def _integer(environ: dict[str, str], name: str, default: int, minimum: int, accepts: str = "") -> int:
    raw = _raw(environ, name)
    if not raw:
        return default
    value = int(raw) if raw.isascii() and raw.isdigit() else None
    if value is None or value < minimum:
        raise SettingsError(f"{name} must be {accepts or f'an integer >= {minimum}'}, got {_shown(raw)}")
    return value


def _positive_number(environ: dict[str, str], name: str, default: float) -> float:
    raw = _raw(environ, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise SettingsError(f"{name} must be a positive number, got {_shown(raw)}")
    return value


def _folder(environ: dict[str, str], name: str, default: Path) -> Path:
    raw = _raw(environ, name)
    return Path(raw).expanduser() if raw else default


def _weights_default(name: str) -> Path:
    return NETWORK_VOLUME / "seedvr" / name if NETWORK_VOLUME.is_dir() else REPO_ROOT / name


def _url(environ: dict[str, str], name: str) -> str | None:
    raw = _raw(environ, name)
    if not raw:
        return None
    if not raw.startswith(("http://", "https://")) or len(raw) <= len("https://"):
        raise SettingsError(f"{name} must be an http(s) URL such as https://api.runpod.ai/v2/<endpoint id>, got "
                            f"{_shown(raw)}")
    return raw.rstrip("/")


def _bucket(environ: dict[str, str]) -> Bucket | None:
    given = {name: _raw(environ, name) for name in BUCKET_VARIABLES}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise SettingsError(f"the bucket needs all of {', '.join(BUCKET_VARIABLES)}; missing: {', '.join(missing)} "
                            "(set them all, or none for a worker without a bucket)")
    url = given["BUCKET_ENDPOINT_URL"]
    if not url.startswith(("http://", "https://")) or len(url) <= len("https://"):
        raise SettingsError(f"BUCKET_ENDPOINT_URL must be an http(s) URL such as https://s3.example.com/bucket, "
                            f"got {_shown(url)}")
    return Bucket(url, given["BUCKET_ACCESS_KEY_ID"], given["BUCKET_SECRET_ACCESS_KEY"])


def read(environ: dict[str, str]) -> Settings:
    """Settings from a mapping of environment variables; SettingsError at the first bad one."""
    max_chunk = _integer(environ, "SEEDVR_MAX_CHUNK_FRAMES", DEFAULT_MAX_CHUNK_FRAMES, 5, "4n+1 and at least 5")
    if max_chunk % 4 != 1:
        raise SettingsError(f"SEEDVR_MAX_CHUNK_FRAMES must be 4n+1 and at least 5, got {max_chunk}")
    budget_raw = _raw(environ, "SEEDVR_TEST_MEMORY_BUDGET_BYTES")
    return Settings(
        config_dir=_folder(environ, "SEEDVR_CONFIG_DIR", REPO_ROOT),
        ckpt_dir=_folder(environ, "SEEDVR_CKPT_DIR", _weights_default("ckpts")),
        embeddings_dir=_folder(environ, "SEEDVR_EMBEDDINGS_DIR", _weights_default("embeddings")),
        auto_download=_flag(environ, "SEEDVR_AUTO_DOWNLOAD"),
        max_output_area=_integer(environ, "SEEDVR_MAX_OUTPUT_AREA", DEFAULT_MAX_OUTPUT_AREA, MIN_OUTPUT_AREA),
        max_chunk_frames=max_chunk,
        base64_limit_bytes=_integer(environ, "SEEDVR_BASE64_LIMIT_BYTES", DEFAULT_BASE64_LIMIT_BYTES, 0,
                                    "a non-negative integer"),
        max_download_bytes=_integer(environ, "SEEDVR_MAX_DOWNLOAD_BYTES", DEFAULT_MAX_DOWNLOAD_BYTES, 1,
                                    "a positive integer"),
        download_timeout_s=_positive_number(environ, "SEEDVR_DOWNLOAD_TIMEOUT_S", DEFAULT_DOWNLOAD_TIMEOUT_S),
        allow_private_urls=_flag(environ, "SEEDVR_ALLOW_PRIVATE_URLS"),
        disable_nvenc=_flag(environ, "SEEDVR_DISABLE_NVENC"),
        sp_stall_s=_positive_number(environ, "SEEDVR_SP_STALL_S", DEFAULT_SP_STALL_S),
        compile=_flag(environ, "SEEDVR_COMPILE"),
        endpoint_url=_url(environ, "SEEDVR_ENDPOINT_URL"),
        streaming=_flag(environ, "SEEDVR_STREAMING"),
        bucket=_bucket(environ),
        test_memory_budget_bytes=(_integer(environ, "SEEDVR_TEST_MEMORY_BUDGET_BYTES", 0, 1, "a positive integer")
                                  if budget_raw else None),
        test_memory_scale=_positive_number(environ, "SEEDVR_TEST_MEMORY_SCALE", 1.0),
    )


def unknown_variables(environ: dict[str, str]) -> list[str]:
    """SEEDVR_* variables this worker does not read (likely typos), each with the closest known name."""
    known = (*VARIABLES, *OTHER_KNOWN_VARIABLES)
    notes = []
    for name in sorted(environ):
        if name.startswith("SEEDVR_") and name not in known:
            close = difflib.get_close_matches(name, VARIABLES, n=1)
            notes.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return notes


_cache: tuple[tuple[str, ...], Settings] | None = None


def current() -> Settings:
    """The settings of the current environment (re-read only when one of the variables changed)."""
    global _cache
    snapshot = tuple(os.environ.get(name, "") for name in VARIABLES)
    if _cache is None or _cache[0] != snapshot:
        _cache = (snapshot, read(dict(os.environ)))
    return _cache[1]
