"""Where configs, checkpoints and text embeddings live.

Each location is overridable by an environment variable; a RunPod network
volume mounted at /runpod-volume is used for weights when present.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NETWORK_VOLUME = Path("/runpod-volume")


def _from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value).expanduser() if value else default


def _weights_default(name: str) -> Path:
    if NETWORK_VOLUME.is_dir():
        return NETWORK_VOLUME / "seedvr" / name
    return REPO_ROOT / name


def config_dir() -> Path:
    """The folder holding configs_3b/ and configs_7b/."""
    return _from_env("SEEDVR_CONFIG_DIR", REPO_ROOT)


def ckpt_dir() -> Path:
    return _from_env("SEEDVR_CKPT_DIR", _weights_default("ckpts"))


def embeddings_dir() -> Path:
    return _from_env("SEEDVR_EMBEDDINGS_DIR", _weights_default("embeddings"))
