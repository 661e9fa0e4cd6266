"""The name of a job's intermediates in the bucket: a digest of everything that decides its restored pixels.

Two runs with the same recipe restore the same frames, so the segments one run left in the bucket serve the other
(`resume`, on any worker). The recipe holds the source's bytes (SHA-256), the model as it runs (type, variant,
sequence-parallel size, the attention kernel it resolved to, compile), every sampling option, the output size, how
the frames are read (deinterlacing), the clip (its first frame and length in the video, and the video's length,
which sets the noise level), the chunk plan and the VAE tiling. Not in it: the output encoding, the audio and the
delivery (applied once, after the merge), the job id and the worker.

    <digest>/source<ext>                       the uploaded source
    <digest>/segment-<first>-<last>.mkv        chunks first..last, lossless
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from seedvr.engine.segments import Segment
from seedvr.engine.sizing import ItemSize
from seedvr.io.media.lossless import EXTENSION
from seedvr.io.media.video import VideoInfo
from seedvr.serving.model_holder import LoadedModel
from seedvr.serving.specs import RestoreSpec

RECIPE_VERSION = 1  # raise it when something that changes pixels changes meaning: old segments are not reused
HASH_BLOCK = 1024**2


@dataclass(frozen=True)
class Clip:
    """The frames a job restores, as video frame numbers: `frames` from `first`, in a video of `video_frames`."""

    first: int
    frames: int
    video_frames: int


def clip_of(video: VideoInfo) -> Clip:
    """The clip of a probed item: its part (start_time / duration) or the whole video."""
    if video.part is not None:
        return Clip(video.part.first, video.part.count, video.part.total)
    return Clip(0, video.frame_count, video.frame_count)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def recipe_digest(source_sha256: str, model: LoadedModel, spec: RestoreSpec, size: ItemSize, video: VideoInfo,
                  clip: Clip) -> str:
    """The digest naming the job's folder of intermediates; `spec` carries the pinned chunking and tiling."""
    memory = spec.memory
    recipe = {
        "version": RECIPE_VERSION,
        "source": source_sha256,
        "model": [model.model_type, model.variant, model.sp_size, model.restorer.attention_backend,
                  model.restorer.compiled],
        "sampling": asdict(spec.sampling),
        "size": [size.res_h, size.res_w, size.height, size.width],
        "read": [video.width, video.height, None if video.deinterlace is None else asdict(video.deinterlace)],
        "clip": asdict(clip),
        "chunks": [memory.chunk_frames, memory.chunk_overlap],
        "vae_tile": memory.vae_tile_size if memory.vae_tiling else None,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:40]


def segment_key(digest: str, segment: Segment) -> str:
    return f"{digest}/segment-{segment.first_chunk}-{segment.last_chunk}{EXTENSION}"


def source_key(digest: str, path: Path) -> str:
    return f"{digest}/source{path.suffix.lower()}"
