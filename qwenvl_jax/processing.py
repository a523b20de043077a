"""Host-side request preprocessing, torch-free: chat messages, images and videos -> model inputs.

Produces exactly what the checkpoint's HF processor (Qwen2_5_VLProcessor / Qwen3VLProcessor) produces, under HF's
names: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values`` + ``image_grid_thw``,
``pixel_values_videos`` + ``video_grid_thw``, ``second_per_grid_ts`` (Qwen2.5-VL) and the frame timestamps that
Qwen3-VL / Qwen3.5 write into the prompt.

Images go through transformers' PIL-backend image processor (no torch), or, with ``image_resize="torchvision"``,
through the numpy path below, which reproduces HF's default torchvision-backend image processor. HF's video
processors need torch + torchvision, so videos are done here in numpy: frame sampling, smart_resize, and a port of
torch's uint8 antialiased bicubic resize (what torchvision runs on CPU for uint8 frames; PIL's bicubic differs by
1 in ~0.5% of pixels), then HF's fused rescale+normalize in float32 and its patch layout. Video files are decoded
by ``video_io`` (PyAV, the optional ``video`` extra) into the frames a decoded array would give.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import scipy.sparse
from transformers import AutoTokenizer
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import ChannelDimension
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as image_smart_resize

from qwenvl_jax import video_io
from qwenvl_jax.video_io import VideoFrames

ImageInput = str | Path | PIL.Image.Image | np.ndarray
VideoInput = str | Path | np.ndarray | Sequence[PIL.Image.Image | np.ndarray]  # a path: a video file (PyAV)
Message = Mapping[str, Any]

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
VISION_START_TOKEN, VISION_END_TOKEN = "<|vision_start|>", "<|vision_end|>"
_PLACEHOLDER = re.compile(f"(?P<image>{re.escape(IMAGE_TOKEN)})|(?P<video>{re.escape(VIDEO_TOKEN)})")
_PROCESSOR_FAMILY = {"Qwen2_5_VLProcessor": "qwen2_5_vl", "Qwen2VLProcessor": "qwen2_5_vl",
                     "Qwen3VLProcessor": "qwen3_vl"}
_DEFAULT_VIDEO_FPS = 24.0  # what HF assumes when a video comes without its fps


@dataclasses.dataclass
class ProcessorOutput:
    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64
    mm_token_type_ids: np.ndarray  # [B, T] int64: 0 text, 1 image, 2 video
    pixel_values: np.ndarray | None = None  # [image patches, C * temporal_patch * patch^2] float32
    image_grid_thw: np.ndarray | None = None  # [num_images, 3] int64
    pixel_values_videos: np.ndarray | None = None  # [video patches, C * temporal_patch * patch^2] float32
    video_grid_thw: np.ndarray | None = None  # [num_videos, 3] int64
    second_per_grid_ts: np.ndarray | None = None  # [num_videos] float32, Qwen2.5-VL only
    video_timestamps: list[list[float]] | None = None  # per video, per temporal patch (s); Qwen3-VL / Qwen3.5


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    """The fields of video_preprocessor_config.json that decide the output (HF defaults where absent)."""

    family: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    do_sample_frames: bool
    fps: float | None
    num_frames: int | None
    min_frames: int
    max_frames: int
    cap_pixels_per_frame: bool
    max_video_tokens: int

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], family: str) -> VideoSettings:
        qwen3 = family != "qwen2_5_vl"
        size = raw.get("size") or {}
        mean_std = (0.5, 0.5, 0.5) if qwen3 else None
        return cls(
            family=family,
            patch_size=int(raw.get("patch_size", 16 if qwen3 else 14)),
            temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            merge_size=int(raw.get("merge_size", 2)),
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or (128 * 32 * 32 if qwen3 else
                                                                                   128 * 28 * 28)),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or (32 * 32 * 768 if qwen3 else
                                                                                 28 * 28 * 768)),
            image_mean=tuple(raw.get("image_mean") or mean_std or (0.48145466, 0.4578275, 0.40821073)),
            image_std=tuple(raw.get("image_std") or mean_std or (0.26862954, 0.26130258, 0.27577711)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_sample_frames=bool(raw.get("do_sample_frames", qwen3)),
            fps=raw.get("fps", 2 if qwen3 else None),
            num_frames=raw.get("num_frames"),
            min_frames=int(raw.get("min_frames", 4)),
            max_frames=int(raw.get("max_frames", 768)),
            cap_pixels_per_frame=bool(raw.get("cap_pixels_per_frame") or False),
            max_video_tokens=int(raw.get("max_video_tokens", 768 if qwen3 else 128000)),
        )


# ----------------------------------------------------------------------------------------------------------------
# Input loading and validation


def load_image(image: ImageInput, index: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB; a clear ValueError for anything else."""
    if isinstance(image, (str, Path)):
        image = _open_image_file(str(image), index)
    if isinstance(image, PIL.Image.Image):
        # HF's conversion: alpha is composited onto white, palettes and greyscale expand to RGB.
        return convert_to_rgb(image, return_numpy=True)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image {index}: expected an [H, W, 3] RGB array, got shape {image.shape} "
                             f"({image.shape[-1] if image.ndim == 3 else 'no'} channels)")
        if image.dtype != np.uint8:
            raise ValueError(f"image {index}: expected uint8 pixels, got {image.dtype}")
        if min(image.shape[:2]) == 0:
            raise ValueError(f"image {index}: empty image of shape {image.shape}")
        return image
    raise ValueError(f"image {index}: unsupported type {type(image).__name__}; pass a path, a PIL image or an "
                     "[H, W, 3] uint8 array")


def _open_image_file(source: str, index: int) -> PIL.Image.Image:
    if source.startswith(("http://", "https://")):
        raise ValueError(f"image {index}: {source!r} is a URL; this library never downloads, pass a local file")
    if source.startswith("data:image"):
        try:
            data = io.BytesIO(base64.b64decode(source.split(",", 1)[1], validate=True))
        except (IndexError, binascii.Error) as e:
            raise ValueError(f"image {index}: malformed base64 data URL ({e})") from e
    else:
        data = Path(source.removeprefix("file://")).expanduser()
    try:
        with PIL.Image.open(data) as opened:
            opened.load()
            return opened.copy()
    except (OSError, PIL.Image.DecompressionBombError) as e:
        raise ValueError(f"image {index}: cannot read image file {source[:200]!r}: {e}") from e


def load_video(video: VideoInput, index: int, settings: VideoSettings, fps: float | None = None) -> VideoFrames:
    """The frames of one video that HF's video processor keeps ([T, H, W, 3] uint8 RGB), sampled at the video's
    fps: ``fps`` when given, else a file's own (its container's average rate), else unknown (None). A file is
    decoded with PyAV (the ``video`` extra) and only its kept frames are converted and held."""
    if isinstance(video, (str, Path)):
        try:
            decoded = video_io.read_video(video, lambda total, file_fps: sample_frame_indices(
                settings, total, file_fps if fps is None else fps))
        except ValueError as e:
            raise ValueError(f"video {index}: {e}") from e
        return decoded if fps is None else dataclasses.replace(decoded, fps=fps)
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video {index}: expected a [T, H, W, 3] RGB array, got shape {video.shape}")
        if video.dtype != np.uint8:
            raise ValueError(f"video {index}: expected uint8 pixels, got {video.dtype}")
        frames = video
    elif isinstance(video, Sequence) and len(video) > 0:
        if any(isinstance(frame, (str, Path)) for frame in video):
            raise ValueError(f"video {index}: frames must be PIL images or [H, W, 3] arrays, not paths")
        frames_hwc = [load_image(frame, index) for frame in video]
        if len({f.shape for f in frames_hwc}) != 1:
            raise ValueError(f"video {index}: frames differ in size: {sorted({f.shape for f in frames_hwc})}")
        frames = np.stack(frames_hwc)
    else:
        raise ValueError(f"video {index}: unsupported input {type(video).__name__}; pass a [T, H, W, 3] uint8 "
                         "array or a non-empty list of frames")
    if frames.shape[0] == 0 or min(frames.shape[1:3]) == 0:
        raise ValueError(f"video {index}: empty video of shape {frames.shape}")
    try:
        indices = sample_frame_indices(settings, frames.shape[0], fps)
    except ValueError as e:
        raise ValueError(f"video {index}: {e}") from e
    return VideoFrames(frames if indices is None else frames[indices], fps, frames.shape[0], indices)


# ----------------------------------------------------------------------------------------------------------------
# Video: frame sampling, resize, normalise, patchify


def sample_frame_indices(settings: VideoSettings, total_frames: int, video_fps: float | None) -> np.ndarray | None:
    """Indices of the frames HF's video processor keeps, or None when it keeps all of them."""
    if not settings.do_sample_frames:
        return None
    if settings.family == "qwen2_5_vl":
        return _qwen2_vl_sample(settings, total_frames, video_fps)
    num_frames = settings.num_frames
    if num_frames is None and settings.fps is not None:
        source_fps = _DEFAULT_VIDEO_FPS if video_fps is None else video_fps
        num_frames = int(total_frames / source_fps * settings.fps)
        num_frames = min(max(num_frames, settings.min_frames), settings.max_frames, total_frames)
    if num_frames is None:
        num_frames = min(max(total_frames, settings.min_frames), settings.max_frames)
    return np.linspace(0, total_frames - 1, num_frames).round().astype(np.int64)


def _qwen2_vl_sample(settings: VideoSettings, total_frames: int, video_fps: float | None) -> np.ndarray:
    tps = settings.temporal_patch_size
    if settings.num_frames is not None:
        num_frames = round(settings.num_frames / tps) * tps
    elif settings.fps is not None:
        if video_fps is None:
            raise ValueError("sampling frames at the configured fps needs the video's fps")
        max_frames = math.floor(min(settings.max_frames, total_frames) / tps) * tps
        num_frames = total_frames / video_fps * settings.fps
        num_frames = min(max(num_frames, settings.min_frames), max_frames, total_frames)
        num_frames = math.floor(num_frames / tps) * tps
    else:
        return np.arange(total_frames)
    if num_frames > total_frames:
        raise ValueError(f"cannot sample {num_frames} frames from a video of {total_frames}")
    # HF: torch.arange(0, total, total / num_frames).int() -- float32 values, truncated.
    step = total_frames / num_frames
    count = math.ceil(total_frames / step)
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def video_smart_resize(settings: VideoSettings, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """Target (height, width) of every frame, as HF's Qwen2VL / Qwen3VL video processors choose it."""
    factor = settings.patch_size * settings.merge_size
    max_pixels = settings.max_pixels
    if settings.family == "qwen2_5_vl":
        if settings.cap_pixels_per_frame:
            total_pixels = int(settings.max_video_tokens * factor * factor * 0.9)
            max_pixels = max(min(max_pixels, total_pixels * settings.temporal_patch_size // num_frames),
                             int(settings.min_pixels * 1.05))
        return image_smart_resize(height, width, factor=factor, min_pixels=settings.min_pixels,
                                  max_pixels=max_pixels)
    if settings.cap_pixels_per_frame:
        frame_cap = settings.max_video_tokens * factor * factor
        max_pixels = max(min(frame_cap, max_pixels // num_frames), int(settings.min_pixels * 1.05)) * num_frames
    return _qwen3_vl_smart_resize(num_frames, height, width, settings.temporal_patch_size, factor,
                                  settings.min_pixels, max_pixels)


def _qwen3_vl_smart_resize(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                           min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """video_processing_qwen3_vl.smart_resize: the pixel budget covers all frames."""
    if num_frames < temporal_factor:
        raise ValueError(f"a video needs at least {temporal_factor} frames after sampling, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _bicubic_aa_int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source start index [out], fixed-point weights [out, taps] and their precision (bits), computed as torch's
    compute_index_ranges_int16_weights does for antialiased bicubic (a = -0.5, support scaled when shrinking)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward zero
    xsize = np.clip(np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    x = np.abs((np.arange(taps)[None, :] + xmin[:, None] - center[:, None] + 0.5) * invscale)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    weights = np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
    weights[np.arange(taps)[None, :] >= xsize[:, None]] = 0.0
    total = np.zeros(out_size)
    for k in range(taps):  # torch sums taps in order; keep its rounding
        total += weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    peak = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + peak * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, (scaled - 0.5).astype(np.int64), (scaled + 0.5).astype(np.int64))
    return xmin, fixed, precision


def _resize_matrix(in_size: int, out_size: int) -> tuple[scipy.sparse.csr_matrix, int]:
    """[out, in] sparse int32 matrix of the fixed-point weights, and their precision."""
    xmin, fixed, precision = _bicubic_aa_int16_weights(in_size, out_size)
    rows = np.repeat(np.arange(out_size), fixed.shape[1])
    cols = (xmin[:, None] + np.arange(fixed.shape[1])).ravel()
    used = fixed.ravel() != 0  # taps past the edge carry zero weight
    matrix = scipy.sparse.csr_matrix((fixed.ravel()[used].astype(np.int32), (rows[used], cols[used])),
                                     shape=(out_size, in_size))
    return matrix, precision


def _resample_axis(frame: np.ndarray, axis: int, matrix: scipy.sparse.csr_matrix, precision: int) -> np.ndarray:
    """One separable pass of the uint8 resize along ``axis`` of one [H, W, C] frame: exact integer
    multiply-accumulate (int16 weights times uint8 pixels stay far inside int32, as in torch's AVX kernels /
    Pillow-SIMD), round by the precomputed half, arithmetic shift, saturate to [0, 255]."""
    moved = np.moveaxis(frame, axis, 0)
    acc = matrix @ moved.reshape(moved.shape[0], -1).astype(np.int32)
    out = np.clip((acc + (1 << (precision - 1))) >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out.reshape((matrix.shape[0],) + moved.shape[1:]), 0, axis)


def resize_bicubic_uint8(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision ``resize(uint8, BICUBIC, antialias=True)`` on CPU: width pass, then height pass. Frame by
    frame, so a long video never holds more than one frame's int32 intermediate."""
    _, in_height, in_width, _ = frames_thwc.shape
    passes = [(axis, *_resize_matrix(size, out))
              for axis, size, out in ((1, in_width, width), (0, in_height, height)) if size != out]
    if not passes:
        return frames_thwc
    resized = np.empty((frames_thwc.shape[0], height, width, frames_thwc.shape[3]), dtype=np.uint8)
    for t, frame in enumerate(frames_thwc):
        for axis, matrix, precision in passes:
            frame = _resample_axis(frame, axis, matrix, precision)
        resized[t] = frame
    return resized


def patchify_video(frames_tchw: np.ndarray, patch_size: int, merge_size: int,
                   temporal_patch_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, C, H, W] -> ([grid_t * grid_h * grid_w, C * temporal_patch * patch^2], grid), HF's patch order: merge
    windows contiguous, the last frame repeated to fill the final temporal patch."""
    if pad := -frames_tchw.shape[0] % temporal_patch_size:
        frames_tchw = np.concatenate([frames_tchw, np.repeat(frames_tchw[-1:], pad, axis=0)])
    t, c, h, w = frames_tchw.shape
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    patches = frames_tchw.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                                  gw // merge_size, merge_size, patch_size)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def process_video_frames(settings: VideoSettings, frames_thwc: np.ndarray
                         ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(patches, grid_thw) for the kept (already sampled) frames of one video."""
    height, width = video_smart_resize(settings, *frames_thwc.shape[:3])
    frames_thwc = resize_bicubic_uint8(frames_thwc, height, width)
    frames_tchw = normalize_uint8(frames_thwc, settings.image_mean, settings.image_std, settings.rescale_factor)
    patches, grid = patchify_video(frames_tchw, settings.patch_size, settings.merge_size,
                                   settings.temporal_patch_size)
    return patches, grid


def normalize_uint8(frames_thwc: np.ndarray, mean: Sequence[float], std: Sequence[float],
                    rescale_factor: float) -> np.ndarray:
    """[T, H, W, C] uint8 -> [T, C, H, W] float32 the way HF's torchvision backend does it: rescale fused into
    normalisation, (x - mean / rescale) / (std / rescale), all in float32."""
    inv_rescale = np.float32(1.0 / rescale_factor)
    mean_f32 = np.asarray(mean, dtype=np.float32) * inv_rescale
    std_f32 = np.asarray(std, dtype=np.float32) * inv_rescale
    return ((frames_thwc.astype(np.float32) - mean_f32) / std_f32).transpose(0, 3, 1, 2)


def frame_timestamps(indices: Sequence[int], video_fps: float, temporal_patch_size: int) -> list[float]:
    """Qwen3VLProcessor._calculate_timestamps: mean time of the first and last frame of each temporal patch."""
    indices = [int(i) for i in indices]
    if len(indices) % temporal_patch_size:
        indices += [indices[-1]] * (temporal_patch_size - len(indices) % temporal_patch_size)
    seconds = [i / video_fps for i in indices]
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(seconds), temporal_patch_size)]


# ----------------------------------------------------------------------------------------------------------------
# The processor


def _family_of(processor_class: str | None, model_type: str | None) -> str:
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        return "qwen2_5_vl"
    if model_type in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        return "qwen3_vl"
    if processor_class in _PROCESSOR_FAMILY:
        return _PROCESSOR_FAMILY[processor_class]
    raise ValueError(f"cannot tell the processor family: processor_class {processor_class!r}, "
                     f"model_type {model_type!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and processor files: a checkpoint saved from the model alone (config + weights) has none of them, and
# needs none for token ids and HF-named arrays in, logits and token ids out.

PROCESSOR_NEEDED_FOR = ("to turn prompts, chat messages, images and videos into token ids and pixel arrays (token "
                        "ids with HF-named arrays, as generate(input_ids=..., pixel_values=..., image_grid_thw=...) "
                        "and logits(...) take them, need none of these files)")


class MissingFilesError(ValueError):
    """A checkpoint directory lacks files that a requested input or output needs: names them and why."""

    def __init__(self, path: Path, missing: Sequence[str], needed_for: str):
        super().__init__(f"{path} has no {' and no '.join(missing)}, needed {needed_for}. Copy the tokenizer and "
                         "processor files of the base model's HF checkpoint into it (e.g. "
                         "AutoProcessor.from_pretrained(base).save_pretrained(dir)).")


def missing_tokenizer_files(path: Path) -> list[str]:
    """[] when ``path`` holds a tokenizer (a fast tokenizer.json, or a slow BPE's vocab.json + merges.txt), else
    the files it lacks."""
    if (path / "tokenizer.json").is_file() or all((path / f).is_file() for f in ("vocab.json", "merges.txt")):
        return []
    return ["tokenizer.json (or vocab.json + merges.txt)"]


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory that has its files (see :func:`missing_tokenizer_files`)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class Processor:
    """Chat messages / text + images + videos -> :class:`ProcessorOutput`, as the checkpoint's HF processor."""

    def __init__(self, tokenizer: Any, image_processor: Qwen2VLImageProcessorPil, video_settings: VideoSettings,
                 max_image_patches: int | None = None, image_resize: Literal["pil", "torchvision"] = "pil"):
        if image_resize not in ("pil", "torchvision"):
            raise ValueError(f"image_resize must be 'pil' or 'torchvision', got {image_resize!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_resize = image_resize
        self.video = video_settings
        self.family = video_settings.family
        # Largest image the vision tower accepts, in patches; smart_resize can overshoot max_pixels only for
        # extreme aspect ratios, where it keeps one merge window on the short side.
        self.max_image_patches = max_image_patches or image_processor.size["longest_edge"] // (
            image_processor.patch_size**2)
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the vision tokens {missing}")
        self.image_token_id, self.video_token_id = vocab[IMAGE_TOKEN], vocab[VIDEO_TOKEN]

    @classmethod
    def from_pretrained(cls, path: str | Path, max_image_patches: int | None = None,
                        image_resize: Literal["pil", "torchvision"] = "pil", tokenizer: Any = None) -> Processor:
        """Loads tokenizer, chat template and processor configs from a local checkpoint directory.

        ``max_image_patches``: largest image accepted, in patches (default: max_pixels / patch_size^2).
        ``image_resize``: "pil" gives HF's PIL-backend image processor (what transformers runs without
        torchvision, and the resize the Qwen processors used before transformers 5); "torchvision" reproduces
        HF's default torchvision-backend image processor bit for bit. The two differ by a few uint8 levels at
        some pixels. ``tokenizer``: one already loaded from ``path`` (else it is loaded here)."""
        path = Path(path)
        image_config_path = path / "preprocessor_config.json"
        missing = [] if tokenizer is not None else missing_tokenizer_files(path)
        if not image_config_path.is_file():
            missing.append(image_config_path.name)
        if missing:
            raise MissingFilesError(path, missing, PROCESSOR_NEEDED_FOR)
        image_config = _read_json(image_config_path)
        video_config_path = path / "video_preprocessor_config.json"
        # Checkpoints without a video config (e.g. Qwen2.5-VL on the hub) build the video processor from the
        # image one, as HF does.
        video_config = _read_json(video_config_path) if video_config_path.is_file() else image_config
        model_type = _read_json(path / "config.json").get("model_type") if (path / "config.json").is_file() \
            else None
        family = _family_of(image_config.get("processor_class"), model_type)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), local_files_only=True)
        return cls(tokenizer, image_processor, VideoSettings.from_dict(video_config, family), max_image_patches,
                   image_resize)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text: str | Sequence[str] | Sequence[Message] | Sequence[Sequence[Message]],
                 images: Sequence[ImageInput] | None = None, videos: Sequence[VideoInput] | None = None,
                 video_fps: float | Sequence[float | None] | None = None, padding_side: str = "left",
                 add_generation_prompt: bool = True) -> ProcessorOutput:
        """``text``: a prompt, a batch of prompts (holding ``<|image_pad|>`` / ``<|video_pad|>`` placeholders),
        one conversation (list of message dicts) or a batch of conversations. Images and videos of conversations
        come from their content parts (``{"type": "image", "image": ...}``, ``{"type": "video", "video": frames,
        "fps": 2.0}`` or ``{"type": "video", "video": "clip.mp4"}``); for prompts pass them in ``images`` /
        ``videos`` (with ``video_fps``) in order. A video's fps is the frame rate of the frames given (a file's
        defaults to its container's); the processor samples from it at its own configured fps.
        Rows are padded to the longest on ``padding_side``."""
        texts, images, videos, video_fps = self._texts_and_media(text, images, videos, video_fps,
                                                                 add_generation_prompt)
        self._check_placeholder_counts(texts, len(images), len(videos))
        out: dict[str, Any] = {}
        image_repl, video_repl = [], []
        if images:
            out["pixel_values"], out["image_grid_thw"] = self._process_images(images)
            merge = self.image_processor.merge_size**2
            image_repl = [IMAGE_TOKEN * int(np.prod(g) // merge) for g in out["image_grid_thw"]]
        if videos:
            video_repl = self._process_videos(videos, video_fps, out)
        image_repl_iter, video_repl_iter = iter(image_repl), iter(video_repl)  # consumed across the batch
        texts = [self._expand(t, image_repl_iter, video_repl_iter) for t in texts]
        encoded = self.tokenizer(texts, padding="longest", padding_side=padding_side, return_tensors="np")
        input_ids = encoded["input_ids"].astype(np.int64)
        types = np.zeros_like(input_ids)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        return ProcessorOutput(input_ids=input_ids, attention_mask=encoded["attention_mask"].astype(np.int64),
                               mm_token_type_ids=types, **out)

    def _texts_and_media(self, text, images, videos, video_fps, add_generation_prompt):
        if isinstance(text, str):
            texts = [text]
        elif len(text) == 0:
            raise ValueError("nothing to process: the text / messages list is empty")
        elif all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            conversations = [text] if isinstance(text[0], Mapping) else list(text)
            if images is not None or videos is not None:
                raise ValueError("pass images/videos inside the messages' content parts, not beside them")
            images, videos, fps = [], [], []
            for conversation in conversations:
                for message in conversation:
                    for part in message.get("content") if isinstance(message.get("content"), list) else ():
                        kind = _part_kind(part)
                        if kind == "image":
                            images.append(_part_image(part))
                        elif kind == "video":
                            videos.append(_part_video(part))
                            fps.append(part.get("fps"))
            texts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
            video_fps = fps
        images, videos = list(images or []), list(videos or [])
        if video_fps is None or isinstance(video_fps, (int, float)):
            video_fps = [video_fps] * len(videos)
        if len(video_fps) != len(videos):
            raise ValueError(f"{len(video_fps)} video_fps values for {len(videos)} videos")
        return texts, images, videos, list(video_fps)

    @staticmethod
    def _check_placeholder_counts(texts: list[str], n_images: int, n_videos: int) -> None:
        for name, token, given in (("image", IMAGE_TOKEN, n_images), ("video", VIDEO_TOKEN, n_videos)):
            found = sum(t.count(token) for t in texts)
            if found != given:
                raise ValueError(f"the prompt has {found} {name} placeholder(s) ({token}) but {given} {name}(s) "
                                 f"were given; each {name} needs exactly one placeholder")

    def _process_images(self, images: list[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        arrays = [load_image(image, k) for k, image in enumerate(images)]
        ip = self.image_processor
        for k, array in enumerate(arrays):
            try:
                patches = ip.get_number_of_image_patches(*array.shape[:2])
            except ValueError as e:  # smart_resize: aspect ratio beyond 200
                raise ValueError(f"image {k} of size {array.shape[1]}x{array.shape[0]}: {e}") from e
            if patches > self.max_image_patches:
                raise ValueError(f"image {k} of size {array.shape[1]}x{array.shape[0]} becomes {patches} patches, "
                                 f"more than the configured maximum of {self.max_image_patches}")
        if self.image_resize == "torchvision":
            return self._process_images_like_torchvision(arrays)
        # Explicit channels-last: HF guesses the layout of tiny arrays (e.g. 3x3x3) otherwise.
        batch = ip(arrays, input_data_format=ChannelDimension.LAST, return_tensors="np")
        return batch["pixel_values"].astype(np.float32), batch["image_grid_thw"].astype(np.int64)

    def _process_images_like_torchvision(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """HF's Qwen2VLImageProcessor (torchvision backend): uint8 antialiased bicubic resize, fused
        normalisation, and the single frame repeated over the temporal patch (as a video of one frame)."""
        ip = self.image_processor
        all_patches, grids = [], []
        for array in arrays:
            height, width = image_smart_resize(*array.shape[:2], factor=ip.patch_size * ip.merge_size,
                                               min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
            frames_tchw = normalize_uint8(resize_bicubic_uint8(array[None], height, width), ip.image_mean,
                                          ip.image_std, ip.rescale_factor)
            patches, grid = patchify_video(frames_tchw, ip.patch_size, ip.merge_size, ip.temporal_patch_size)
            all_patches.append(patches)
            grids.append(grid)
        return np.concatenate(all_patches), np.asarray(grids, dtype=np.int64)

    def _process_videos(self, videos: list[VideoInput], video_fps: list[float | None], out: dict[str, Any]
                        ) -> list[str]:
        all_patches, grids, replacements, seconds, timestamps = [], [], [], [], []
        merge = self.video.merge_size**2
        for k, (video, fps) in enumerate(zip(videos, video_fps)):
            kept = load_video(video, k, self.video, fps)
            try:
                patches, grid = process_video_frames(self.video, kept.frames)
            except ValueError as e:
                raise ValueError(f"video {k}: {e}") from e
            all_patches.append(patches)
            grids.append(grid)
            fps, total, indices = kept.fps, kept.total_frames, kept.indices
            if self.family == "qwen2_5_vl":
                # HF: temporal_patch_size / sampled fps, sampled fps = kept fraction of the source fps (24 if unknown).
                sampled_fps = (_DEFAULT_VIDEO_FPS if fps is None else
                               fps if indices is None else len(indices) / total * fps)
                seconds.append(self.video.temporal_patch_size / sampled_fps)
                replacements.append(VIDEO_TOKEN * (int(np.prod(grid)) // merge))
            else:
                stamps = frame_timestamps(np.arange(total) if indices is None else indices,
                                          _DEFAULT_VIDEO_FPS if fps is None else fps, self.video.temporal_patch_size)
                timestamps.append(stamps)
                per_frame = VIDEO_TOKEN * (grid[1] * grid[2] // merge)
                replacements.append("".join(f"<{s:.1f} seconds>{VISION_START_TOKEN}{per_frame}{VISION_END_TOKEN}"
                                            for s in stamps))
        out["pixel_values_videos"] = np.concatenate(all_patches).astype(np.float32)
        out["video_grid_thw"] = np.asarray(grids, dtype=np.int64)
        if self.family == "qwen2_5_vl":
            out["second_per_grid_ts"] = np.asarray(seconds, dtype=np.float32)
        else:
            out["video_timestamps"] = timestamps
        return replacements

    @staticmethod
    def _expand(text: str, image_repl, video_repl) -> str:
        return _PLACEHOLDER.sub(lambda m: next(image_repl) if m.lastgroup == "image" else next(video_repl), text)


def _part_kind(part: Mapping[str, Any]) -> str | None:
    """Mirrors the chat templates' tests: ``type`` or the presence of an image/video key."""
    if part.get("type") == "image" or "image" in part or "image_url" in part:
        return "image"
    if part.get("type") == "video" or "video" in part:
        return "video"
    return None


def _part_image(part: Mapping[str, Any]) -> ImageInput:
    for key in ("image", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    if isinstance(part.get("image_url"), Mapping):
        return part["image_url"].get("url")
    if isinstance(part.get("image_url"), str):
        return part["image_url"]
    raise ValueError(f"image content part without an image: {dict(part)}")


def _part_video(part: Mapping[str, Any]) -> VideoInput:
    """HF's keys for a video part: frames or a file under ``video``, a file under ``path`` or ``url``."""
    for key in ("video", "path", "url"):
        if part.get(key) is not None:
            return part[key]
    raise ValueError(f"video content part without a video: {dict(part)}")
