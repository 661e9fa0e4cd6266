"""Clips of any length: overlapping temporal chunks, cross-faded, streamed frame by frame.

A clip of f frames that is longer than `chunk_frames` (4n + 1) is cut into chunks that start every
`chunk_frames - overlap` frames; the last chunk ends with the clip and may be shorter (the pipeline pads
it to 4n + 1 frames by repeating its last frame, as it does for any clip). Each chunk is restored on
its own. Two neighbouring chunks share `overlap` frames, where the output fades from the earlier chunk
to the later one with complementary weights (Hann: sin² / cos², or linear), so no seam shows:

    chunk i      |==========\\            weights: 1 ... fading out over the overlap
    chunk i + 1          /==========|     weights: fading in ... 1
    output       |=======XXX========|     XXX = w_i · chunk_i + w_i+1 · chunk_i+1, w_i + w_i+1 = 1

Each output frame is the weighted mean over the chunks that hold it (an exact cross-fade when no frame
lies in three chunks, a smooth blend otherwise). Frames are read from the decoder only as the next chunk
needs them and handed on as soon as no later chunk can touch them, so host memory holds about one chunk
of input and output frames, whatever the length of the clip.

Noise policy. A clip that fits in one chunk runs the official whole-clip pass: one generator seeded with
`seed`, drawn in the official order. With several chunks each latent frame gets its posterior ε, its
x_T noise and (when cond_noise_scale > 0) its condition aug noise from its own CPU generator, seeded from
(seed, "eps", "noise" or "aug", the index in the clip of the last input frame that latent frame encodes).
The noise is thus a function of the position in the clip, not of the chunking: where two chunks' latent
grids line up (overlap ≡ 1 mod 4, as the automatic overlaps are), both chunks see the same noise in their
shared frames, and a result does not depend on the GPU model (CPU draws). The condition-noise level
follows the same rule: every chunk is noised at the level of the whole clip (`clip_latent_frames`).
"""

import hashlib
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from seedvr.engine.preprocess import VAE_TEMPORAL_STRIDE
from seedvr.engine.restorer import Restorer, Sampling
from seedvr.engine.sizing import ItemSize

FADES = ("hann", "linear")


@dataclass(frozen=True)
class Chunk:
    """Frames [start, stop) of the clip; `fade_in` / `fade_out` frames are shared with the chunk before / after."""

    start: int
    stop: int
    fade_in: int
    fade_out: int

    @property
    def frames(self) -> int:
        return self.stop - self.start


def check_chunking(chunk_frames: int | None, overlap: int) -> None:
    if chunk_frames is None:
        return
    if chunk_frames < 5 or chunk_frames % VAE_TEMPORAL_STRIDE != 1:
        raise ValueError(f"chunk_frames must be 4n+1 and at least 5, got {chunk_frames}")
    if not 0 <= overlap < chunk_frames:
        raise ValueError(f"the overlap must be in [0, chunk_frames={chunk_frames}), got {overlap}")


def plan_chunks(frame_count: int, chunk_frames: int | None, overlap: int = 0) -> list[Chunk]:
    """The chunks covering frames [0, frame_count); one chunk when chunk_frames is None or not shorter."""
    check_chunking(chunk_frames, overlap)
    if chunk_frames is None or frame_count <= chunk_frames:
        return [Chunk(0, frame_count, 0, 0)]
    step = chunk_frames - overlap
    starts = [0]
    while starts[-1] + chunk_frames < frame_count:
        starts.append(starts[-1] + step)
    stops = [min(start + chunk_frames, frame_count) for start in starts]
    fades = [0] + [stop - start for stop, start in zip(stops, starts[1:])]  # frames shared with the previous
    return [Chunk(start, stop, fades[i], fades[i + 1] if i + 1 < len(starts) else 0)
            for i, (start, stop) in enumerate(zip(starts, stops))]


def _ramp(positions: np.ndarray, fade: str) -> np.ndarray:
    """Fade-in weights at positions in (0, 1); fade(x) + fade(1 - x) = 1 for both shapes."""
    if fade == "hann":
        return np.sin(0.5 * math.pi * positions) ** 2
    if fade == "linear":
        return positions
    raise ValueError(f"unknown fade {fade!r}; expected one of {', '.join(FADES)}")


def chunk_weights(chunk: Chunk, fade: str = "hann") -> np.ndarray:
    """float64 (chunk.frames,) blending weights: rising over fade_in, falling over fade_out, 1 elsewhere."""
    weights = np.ones(chunk.frames)
    if chunk.fade_in:
        weights[: chunk.fade_in] *= _ramp(np.arange(1, chunk.fade_in + 1) / (chunk.fade_in + 1), fade)
    if chunk.fade_out:
        weights[chunk.frames - chunk.fade_out:] *= _ramp(np.arange(chunk.fade_out, 0, -1) / (chunk.fade_out + 1), fade)
    return weights


class CrossFader:
    """Collects the chunks' restored frames and gives each output frame back once it is complete."""

    def __init__(self) -> None:
        self.first = 0  # clip index of pending[0]
        self.pending: deque = deque()  # [frame, None] when final as is, [float32 weighted sum, total weight] else

    def add(self, start: int, frames: np.ndarray, weights: np.ndarray, complete_before: int) -> list[np.ndarray]:
        """Blend uint8 frames (n, H, W, 3) restored for clip frames [start, start + n) in; return, in order,
        the output frames below `complete_before` (the next chunk's start, or the clip's length)."""
        if start > self.first + len(self.pending):
            raise ValueError(f"a chunk starting at frame {start} leaves a gap before it")
        for offset, (frame, weight) in enumerate(zip(frames, weights)):
            index = start + offset - self.first
            if index < 0:
                raise ValueError(f"frame {start + offset} was already handed out")
            if index < len(self.pending):
                entry = self.pending[index]
                if entry[1] is None:  # cannot happen with plan_chunks: a shared frame is never final early
                    raise ValueError(f"frame {start + offset} was already complete")
                entry[0] += frame.astype(np.float32) * np.float32(weight)
                entry[1] += weight
            elif weight == 1.0 and start + offset < complete_before:
                self.pending.append([frame, None])
            else:
                self.pending.append([frame.astype(np.float32) * np.float32(weight), weight])
        done = []
        while self.pending and self.first < complete_before:
            value, weight = self.pending.popleft()
            done.append(value if weight is None else np.rint(value / np.float32(weight)).clip(0, 255).astype(np.uint8))
            self.first += 1
        return done


def _seed_for(seed: int, stream: str, frame: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{stream}:{frame}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes up to 2^63 - 1


def _frame_normal(seed: int, stream: str, frame: int, *shape: int) -> torch.Tensor:
    """A standard normal of `shape` from the CPU generator of (seed, stream, clip frame index)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(_seed_for(seed, stream, frame)))


def positional_noise(seed: int, start: int, latent_frames: int, height: int, width: int,
                     channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps (1, C, t, h, w), noise (t, h, w, C)) float32 for a chunk whose first frame is clip frame `start`:
    latent frame j is drawn from generators keyed by the clip index of the last frame it encodes."""
    eps = torch.empty(1, channels, latent_frames, height, width)
    noise = torch.empty(latent_frames, height, width, channels)
    for j in range(latent_frames):
        last_frame = start + VAE_TEMPORAL_STRIDE * j
        eps[0, :, j] = _frame_normal(seed, "eps", last_frame, channels, height, width)
        noise[j] = _frame_normal(seed, "noise", last_frame, height, width, channels)
    return eps, noise


def positional_aug_noise(seed: int, start: int, latent_frames: int, height: int, width: int,
                         channels: int) -> torch.Tensor:
    """aug noise (t, h, w, C) float32, the condition noise of `Sampling.cond_noise_scale`, keyed as
    `positional_noise` keys x_T but in a stream of its own (the official aug noise is a draw of its own, with
    the shape and dtype of the latent)."""
    aug_noise = torch.empty(latent_frames, height, width, channels)
    for j in range(latent_frames):
        aug_noise[j] = _frame_normal(seed, "aug", start + VAE_TEMPORAL_STRIDE * j, height, width, channels)
    return aug_noise


def _pull(frames: Iterator[np.ndarray], index: int, count: int) -> np.ndarray:
    frame = next(frames, None)
    if frame is None:
        raise ValueError(f"the frame source ended after {index} frames, {count} were announced")
    return frame


def _read_clip(frames: Iterator[np.ndarray], count: int) -> np.ndarray:
    """The next `count` frames as one uint8 array (count, H, W, 3)."""
    first = _pull(frames, 0, count)
    clip = np.empty((count, *first.shape), dtype=np.uint8)
    clip[0] = first
    for index in range(1, count):
        clip[index] = _pull(frames, index, count)
    return clip


def _finish(frames: Iterator[np.ndarray]) -> None:
    """Pull once past the last frame, so that a decoder checks its frame count and exit status."""
    if next(frames, None) is not None:
        raise ValueError("the frame source holds more frames than announced")


def restore_clip(restorer: Restorer, frames: Iterable[np.ndarray], frame_count: int, size: ItemSize, *,
                 chunk_frames: int | None = None, overlap: int = 0, sampling: Sampling = Sampling(), fade: str = "hann",
                 on_chunk: Callable[[int, Chunk], None] | None = None, timings: dict[str, float] | None = None,
                 on_phase: Callable[[str], None] | None = None, first_frame: int = 0,
                 video_frames: int | None = None, chunks: Sequence[Chunk] | None = None) -> Iterator[np.ndarray]:
    """Yield the restored uint8 (Hc, Wc, 3) frames of a clip, in order, one per input frame.

    frames: uint8 (H, W, 3) frames, read lazily (e.g. from `seedvr.io.media.video.iter_frames`). size: the
    item's output size (seedvr.engine.sizing.item_size), the same for every chunk.
    restorer: the single-process pipeline or a sequence-parallel group. timings, on_phase: passed to every
    `restorer.restore` call. on_chunk(index, chunk) is called before each chunk is restored.
    first_frame, video_frames: where the clip starts in its video and how many frames the video has (a part
    restored alone, `start_time`; None: the clip is the video): chunked noise is keyed by the video's frame
    numbers and conditioned at the video's level, so a part that starts at a chunk start of the whole video's
    plan restores its chunks exactly as the whole video's run does.
    chunks: a segment of a larger clip's plan (seedvr.engine.segments): exactly these chunks are restored (frames
    counted from the first frame given), with their fades, the chunked way even when there is one.
    """
    source = iter(frames)
    segment = chunks is not None
    if chunks is None:
        chunks = plan_chunks(frame_count, chunk_frames, overlap)
    elif chunks[0].start != 0 or chunks[-1].stop != frame_count:
        raise ValueError(f"the chunks cover frames [{chunks[0].start}, {chunks[-1].stop}), not the {frame_count} given")
    if len(chunks) == 1 and not segment:  # the official whole-clip pass
        if on_chunk is not None:
            on_chunk(0, chunks[0])
        clip = _read_clip(source, frame_count)
        _finish(source)
        restored = restorer.restore(clip, res_h=size.res_h, res_w=size.res_w, sampling=sampling, timings=timings,
                                    on_phase=on_phase)
        del clip
        yield from restored.numpy()
        return

    fader = CrossFader()
    # the whole video's length sets every chunk's condition-noise level
    clip_latent = restorer.latent_shape(video_frames or frame_count, size.height, size.width)
    window: deque = deque()  # input frames not yet needed by every chunk, from clip index window_start
    window_start = 0
    for index, chunk in enumerate(chunks):
        while window_start + len(window) < chunk.stop:
            window.append(_pull(source, window_start + len(window), frame_count))
        while window_start < chunk.start:
            window.popleft()
            window_start += 1
        if on_chunk is not None:
            on_chunk(index, chunk)
        clip = np.stack(window)
        latent = restorer.latent_shape(chunk.frames, size.height, size.width)
        eps, noise = positional_noise(sampling.seed, first_frame + chunk.start, latent.frames, latent.height, latent.width,
                                      latent.channels)
        # At scale 0 the aug noise is multiplied by 0: the restorer's own (unused) draw stands in.
        aug_noise = (positional_aug_noise(sampling.seed, first_frame + chunk.start, latent.frames, latent.height,
                                          latent.width, latent.channels) if sampling.cond_noise_scale else None)
        restored = restorer.restore(clip, res_h=size.res_h, res_w=size.res_w, sampling=sampling, eps=eps, noise=noise,
                                    aug_noise=aug_noise, clip_latent_frames=clip_latent.frames, timings=timings,
                                    on_phase=on_phase)
        del clip, eps, noise, aug_noise
        complete_before = chunks[index + 1].start if index + 1 < len(chunks) else frame_count
        yield from fader.add(chunk.start, restored.numpy(), chunk_weights(chunk, fade), complete_before)
        del restored
    _finish(source)
