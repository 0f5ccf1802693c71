"""One video file, encoded under a temporary name and renamed into place only once it reads back whole.

imageio-ffmpeg ignores ffmpeg's exit status: an ffmpeg that runs out of disk space while writing the
trailer (``+faststart`` rewrites the whole file at the end) leaves a truncated MP4 and closing the writer
still succeeds. So every file is read back (packets counted, every frame must be there) before it may
replace an earlier video.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError, first_line
from ..files import atomic_target


BT709_TAGS = [
    "-vf", "setparams=color_primaries=bt709:color_trc=bt709:colorspace=bt709",
    "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
]
"""Colour tags of every MP4 (matrix, primaries, transfer: BT.709). Untagged H.264 is read as BT.601
by some players and BT.709 by others, so colours shifted between them. The output options alone
tagged only the matrix with the bundled ffmpeg (9.0: primaries and transfer stayed "unknown");
``setparams`` tags the frames, so the encoder writes all three, and the RGB -> YUV conversion
uses the BT.709 matrix (pure red encodes to Y = 63, not BT.601's 81; tests/test_export_video.py)."""


class VideoFile:
    """One output file, encoded into a temporary file beside it (:func:`~nfsd_nerf.files.atomic_target`):
    :meth:`append` frames, then :meth:`finish` closes the encoder and checks that the file holds every
    frame; the temporary file is renamed into place only after that (see :func:`video_file`).

    The check is needed because imageio-ffmpeg ignores ffmpeg's exit status: an ffmpeg that runs out of
    disk space while writing the trailer (``+faststart`` rewrites the whole file at the end) exits in
    error and leaves a truncated MP4, and closing the writer still succeeds."""

    def __init__(self, path: Path, tmp: Path, fps: float, quality: float):
        import imageio.v2 as iio

        self.path, self.tmp, self.frames = path, tmp, 0
        if path.suffix == ".gif":
            self.writer = iio.get_writer(tmp, format="GIF", mode="I", duration=1000.0 / fps, loop=0)
        else:
            self.writer = iio.get_writer(
                tmp,
                format="FFMPEG",
                mode="I",
                fps=fps,
                codec="libx264",
                quality=quality,
                pixelformat="yuv420p",
                macro_block_size=2,
                ffmpeg_log_level="error",
                output_params=["-movflags", "+faststart", *BT709_TAGS],
            )

    def append(self, frame: np.ndarray) -> None:
        try:
            self.writer.append_data(frame)
        except OSError as exc:  # the encoder died (its own message went to stderr): broken pipe
            raise UserError(self._failed(f"the encoder stopped ({first_line(exc)})")) from None
        self.frames += 1

    def finish(self) -> None:
        """Close the encoder; a :class:`UserError` unless the file reads back with every frame."""
        try:
            self.writer.close()
        except OSError as exc:
            raise UserError(self._failed(f"the encoder failed ({first_line(exc)})")) from None
        problem = gif_problem(self.tmp) if self.path.suffix == ".gif" else mp4_problem(self.tmp, self.frames)
        if problem:
            raise UserError(self._failed(problem))

    def abandon(self) -> None:
        try:
            self.writer.close()
        except Exception:  # the encoder may already be broken; the temporary file goes either way
            pass

    def _failed(self, problem: str) -> str:
        import shutil

        try:
            free = shutil.disk_usage(self.tmp.parent).free
        except OSError:
            free = None
        full = f"; the disk is full ({free} bytes free)" if free is not None and free < 2**20 else ""
        return f"cannot write the video {self.path}: {problem}{full}; no video was replaced"


def mp4_problem(path: Path, frames: int) -> str | None:
    """None if ``path`` is a readable video stream of ``frames`` frames, else what is wrong. Reads the
    packets without decoding them (``-c copy``): milliseconds, even for long videos."""
    import subprocess

    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:v:0",
           "-c", "copy", "-f", "null", "-progress", "pipe:1", "-"]
    try:
        probe = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    except OSError as exc:
        return f"ffmpeg could not read it back ({first_line(exc)})"
    counts = [line.split("=", 1)[1].strip() for line in probe.stdout.splitlines() if line.startswith("frame=")]
    found = int(counts[-1]) if counts and counts[-1].isdigit() else 0
    errors = probe.stderr.strip()
    if probe.returncode != 0 or errors or found != frames:
        detail = f": {errors.splitlines()[-1]}" if errors else ""
        return f"the file is incomplete, {found} of {frames} frames readable{detail}"
    return None


def gif_problem(path: Path) -> str | None:
    """None if every frame of the GIF decodes (frame counts are not compared: identical frames merge)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.seek(image.n_frames - 1)
            image.load()
    except (OSError, EOFError, ValueError) as exc:
        return f"the file is incomplete ({first_line(exc)})"
    return None


@contextmanager
def video_file(path: Path, fps: float, quality: float) -> Iterator[VideoFile]:
    """A :class:`VideoFile` on a temporary file: renamed into place when the block ends normally (call
    :meth:`~VideoFile.finish` in it first), closed and removed when it raises."""
    with atomic_target(path) as tmp:
        video = VideoFile(path, tmp, fps, quality)
        try:
            yield video
        except BaseException:
            video.abandon()
            raise
