"""Video files -> uint8 RGB frames [T, H, W, 3] and their frame rate, decoded with PyAV (the optional ``video``
extra: ``pip install 'qwenvl-jax[video]'``).

Frames are what HF's PyAV reader (``transformers.video_utils.read_video_pyav``) returns: the first video stream
decoded in order, each frame converted with ``to_ndarray(format="rgb24")``; the frame rate is the stream's
``average_rate``. Unlike HF, the frame count is the number of frames actually decoded (container headers may omit
or misstate it), so a file gives exactly what its decoded frames passed as an array with that fps give.

``select(total_frames, fps)`` picks the frames to keep before any is converted to RGB: frames that are not kept are
decoded (the codec needs them) but never converted or held, so a long video costs the memory of its kept frames only.
PyAV is imported when a file is read, never at import time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = "pip install 'qwenvl-jax[video]' (or: pip install av)"

# (total frames, fps or None) -> source indices to keep, in order (repeats allowed), or None to keep every frame.
SelectFrames = Callable[[int, float | None], Sequence[int] | np.ndarray | None]


@dataclasses.dataclass(frozen=True)
class VideoFrames:
    """The kept frames of one video and what sampling and timestamps need to know about the whole of it."""

    frames: np.ndarray  # [kept frames, H, W, 3] uint8 RGB
    fps: float | None  # the stream's average frame rate; None when the container does not give one
    total_frames: int  # frames in the stream (counted while decoding)
    indices: np.ndarray | None  # source index of each kept frame; None when every frame is kept


def read_video(path: str | os.PathLike, select: SelectFrames | None = None) -> VideoFrames:
    """Decode the first video stream of ``path``; ``select`` (default: every frame) picks the frames kept.

    ValueError for a path that is not a readable video file, ImportError naming the package when PyAV is absent."""
    source = _local_file(path)
    av = _import_av()
    header_frames, fps = _probe(av, source)
    if select is None:
        frames, total = _decode(av, source, None)
        return VideoFrames(frames, fps, total, None)
    # Without a count in the header, count the frames first (decoding without conversion).
    total = header_frames or _decode(av, source, np.zeros(0, np.int64))[1]
    for _ in range(2):
        chosen = select(total, fps)
        indices = None if chosen is None else _checked_indices(chosen, total)
        frames, counted = _decode(av, source, indices)
        if counted == total:
            return VideoFrames(frames, fps, total, indices)
        total = counted  # the header misstated the count: select again from the true count
    raise ValueError(f"video file {str(source)!r} decodes to a different number of frames each time")


def _local_file(path: str | os.PathLike) -> Path:
    text = os.fspath(path)
    if text.startswith(("http://", "https://")):
        raise ValueError(f"{text!r} is a URL; this library never downloads, pass a local video file")
    resolved = Path(text.removeprefix("file://")).expanduser()
    if not resolved.exists():
        raise ValueError(f"video file {text!r} does not exist")
    if not resolved.is_file():
        raise ValueError(f"{text!r} is a directory, not a video file" if resolved.is_dir() else
                         f"{text!r} is not a regular file")
    return resolved


def _import_av() -> Any:
    try:
        import av
    except ImportError as e:
        raise ImportError(f"reading video files needs PyAV, which is not installed: {INSTALL_HINT}") from e
    return av


def _open(av: Any, source: Path) -> Any:
    try:
        container = av.open(str(source))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read video file {str(source)!r}: {e}") from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"{str(source)!r} has no video stream")
    return container


def _probe(av: Any, source: Path) -> tuple[int, float | None]:
    """(frame count from the header, 0 when unknown; the average frame rate, None when unknown)."""
    with _open(av, source) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        return max(int(stream.frames or 0), 0), (fps if fps and np.isfinite(fps) and fps > 0 else None)


def _decode(av: Any, source: Path, indices: np.ndarray | None) -> tuple[np.ndarray, int]:
    """(frames at ``indices`` in their order, all frames when None; the number of frames in the stream)."""
    wanted = None if indices is None else set(indices.tolist())
    kept: dict[int, np.ndarray] = {}
    count = 0
    with _open(av, source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads; the frames are the same
        try:
            for count, frame in enumerate(container.decode(stream), start=1):
                if wanted is None or count - 1 in wanted:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
        except av.FFmpegError as e:
            raise ValueError(f"cannot decode video file {str(source)!r} (after {count} frames): {e}") from e
    if count == 0:
        raise ValueError(f"video file {str(source)!r} holds no decodable frames")
    order = range(count) if indices is None else [i for i in indices.tolist() if i in kept]
    frames = [kept[i] for i in order]
    if indices is not None and len(frames) != len(indices):  # the caller re-samples from the true count
        return np.zeros((0, 0, 0, 3), np.uint8), count
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"video file {str(source)!r} changes frame size mid-stream: "
                         f"{sorted({f.shape[:2] for f in frames})}")
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), count


def _checked_indices(indices: Sequence[int] | np.ndarray, total: int) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("no frames selected")
    if indices.min() < 0 or indices.max() >= total:
        raise ValueError(f"frame indices {indices.min()}..{indices.max()} fall outside a video of {total} frames")
    return indices
