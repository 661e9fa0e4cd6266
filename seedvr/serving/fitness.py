"""What the worker checks before it takes a job: its settings, and what a job would otherwise find out late.

handler.py runs `problems()` before `runpod.serverless.start` in every mode (production, `python handler.py`,
`--rp_serve_api`) and stops the worker on the first run with a message naming what is wrong; it also
registers `CHECKS` with `runpod.serverless.register_fitness_check`, so on RunPod a broken worker is marked
unhealthy instead of failing jobs.
"""

import os
import subprocess
from collections.abc import Callable

from seedvr import settings
from seedvr.io.media.ffmpeg import ffmpeg_exe

FFMPEG_TIMEOUT_S = 20


class FitnessError(RuntimeError):
    """The worker cannot serve as configured."""


def check_settings() -> None:
    try:
        settings.current()
    except settings.SettingsError as error:
        raise FitnessError(str(error)) from None


def check_ffmpeg() -> None:
    """The bundled ffmpeg runs (every video decode and encode needs it)."""
    try:
        completed = subprocess.run([ffmpeg_exe(), "-hide_banner", "-version"], capture_output=True,
                                   timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        raise FitnessError(f"ffmpeg does not run: {type(error).__name__}: {error}") from None
    if completed.returncode != 0:
        raise FitnessError(f"ffmpeg -version exited with {completed.returncode}")


def check_libmagic() -> None:
    """libmagic loads (media types are sniffed from the bytes with it): install libmagic1."""
    try:
        import magic

        magic.from_buffer(b"\x89PNG\r\n\x1a\n", mime=True)
    except (ImportError, OSError) as error:
        raise FitnessError(f"libmagic does not load ({error}): install the system package libmagic1") from None


def check_weight_folders() -> None:
    """A weights folder the settings name is a readable folder (unless weights are downloaded on first use)."""
    worker = settings.current()
    if worker.auto_download:
        return
    for variable, folder in (("SEEDVR_CKPT_DIR", worker.ckpt_dir), ("SEEDVR_EMBEDDINGS_DIR", worker.embeddings_dir),
                             ("SEEDVR_CONFIG_DIR", worker.config_dir)):
        if not os.environ.get(variable, "").strip():
            continue  # the default folders may be filled later (a network volume, a download)
        if not folder.is_dir():
            raise FitnessError(f"{variable} names {folder}, which is not a folder: fix the path, or set "
                               "SEEDVR_AUTO_DOWNLOAD=1 to download the weights there on first use")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise FitnessError(f"{variable} names {folder}, which this worker cannot read")


CHECKS: tuple[Callable[[], None], ...] = (check_settings, check_ffmpeg, check_libmagic, check_weight_folders)


def problems() -> list[str]:
    """What keeps this worker from serving; empty when it can. Later checks are skipped once settings fail."""
    found = []
    for check in CHECKS:
        try:
            check()
        except FitnessError as error:
            found.append(str(error))
            if check is check_settings:
                break
    return found
