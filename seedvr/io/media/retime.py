"""Give an encoded constant-rate video the timestamps of a variable-frame-rate source, without re-encoding.

ffmpeg's command line cannot take one timestamp per frame, so the packets are rewritten with PyAV: the
packet that shows frame k at k / fps (its presentation time) is shown at the source's k-th time instead,
and its decode time is mapped the same way. The mapping is increasing, so decode times stay in order and
never after presentation times (B-frames keep working). Every other stream (the audio) is copied as is.
"""

from fractions import Fraction
from pathlib import Path

import av

from seedvr.io.media.encoders import Container
from seedvr.io.media.video import FrameTimes


def retime(source: Path, target: Path, times: FrameTimes, fps: Fraction, container: Container) -> None:
    """Copy `source` (video encoded at the constant rate `fps`) to `target` with the frames shown at `times`."""
    starts, time_base = times.starts, times.time_base
    first_step = starts[1] - starts[0] if len(starts) > 1 else times.end - starts[0]

    def shown_at(frame: int) -> int:
        """When frame number `frame` is shown, in `time_base` ticks; frames before the first (decode times
        of reordered streams) follow the first step back, frames after the last end at times.end."""
        if frame < 0:
            return starts[0] + frame * first_step
        if frame >= len(starts):
            return times.end + (frame - len(starts)) * first_step
        return starts[frame]

    options = dict(zip(container.muxer_options[::2], container.muxer_options[1::2]))
    with av.open(str(source)) as encoded, av.open(
        str(target), "w", format=container.muxer, options={k.lstrip("-"): v for k, v in options.items()}
    ) as output:
        streams = {}
        for stream in encoded.streams:
            copy = streams[stream.index] = output.add_stream_from_template(stream, opaque=True)
            if stream.codec_tag.strip("\x00"):  # the template leaves it out: mp4's hvc1 would become hev1
                copy.codec_tag = stream.codec_tag
            if stream.type == "video":
                copy.time_base = time_base
        for packet in encoded.demux():
            if packet.size == 0:  # the demuxer's end-of-stream marker
                continue
            stream = packet.stream
            if stream.type == "video":
                assert packet.pts is not None and stream.time_base is not None, "encoded packets are timed"
                frame = round(packet.pts * stream.time_base * fps)
                if packet.dts is not None:  # Matroska stores presentation times only
                    packet.dts = shown_at(round(packet.dts * stream.time_base * fps))
                packet.pts = shown_at(frame)
                packet.duration = shown_at(frame + 1) - shown_at(frame)
                packet.time_base = time_base
            packet.stream = streams[stream.index]
            output.mux(packet)
