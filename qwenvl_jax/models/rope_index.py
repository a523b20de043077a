"""3-row mRoPE position ids (temporal, height, width) for a prompt holding text, images and videos.

Host-side numpy twin of HF's ``get_rope_index`` (modeling_qwen2_5_vl.py, modeling_qwen3_vl.py,
modeling_qwen3_5.py): text tokens advance all three rows together; a run of vision tokens gets a (t, h, w) grid
of positions starting at the current position, after which text resumes at ``current + max(h, w) // merge``.
Qwen2.5-VL spaces a video's temporal positions by ``tokens_per_second * second_per_grid_ts``; Qwen3-VL and
Qwen3.5 give every frame its own placeholder run (separated by timestamp text), so each frame is a t=1 grid.
"""

from __future__ import annotations

import numpy as np

from qwenvl_jax.config import ModelConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


def modality_types(input_ids: np.ndarray, image_token_id: int, video_token_id: int) -> np.ndarray:
    """Per-token modality (0 text, 1 image, 2 video), as HF processors' ``mm_token_type_ids``."""
    types = np.zeros(input_ids.shape, dtype=np.int32)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def _runs(types_t: np.ndarray) -> list[tuple[int, int, int]]:
    """(modality, start, end) of each maximal run of equal modality."""
    if types_t.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, types_t[1:] != types_t[:-1]])
    ends = np.r_[starts[1:], types_t.size]
    return [(int(types_t[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _vision_positions(start: int, grid_thw: np.ndarray, merge: int, time_interval: np.float32) -> np.ndarray:
    """[3, t*h*w/merge^2] positions of one image/video grid placed at ``start``."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    # HF multiplies in float32 (torch promotes the int arange by a float32 scalar), then truncates.
    temporal = (np.arange(t, dtype=np.float32) * time_interval).astype(np.int64)
    pos_thw = np.empty((3, t, h, w), dtype=np.int64)
    pos_thw[0] = (temporal + start)[:, None, None]
    pos_thw[1] = (np.arange(h) + start)[None, :, None]
    pos_thw[2] = (np.arange(w) + start)[None, None, :]
    return pos_thw.reshape(3, -1)


def get_rope_index(
    config: ModelConfig,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """mRoPE positions for a (possibly padded) batch.

    input_ids, attention_mask: [B, T]; image_grid_thw: [num_images, 3] and video_grid_thw: [num_videos, 3] over
    the whole batch in order of appearance; second_per_grid_ts: [num_videos] (Qwen2.5-VL only).
    Returns ``position_ids`` [3, B, T] int64 (padding positions 0, as HF) and ``rope_deltas`` [B] int64: a token
    appended after n real tokens of row b sits at position ``n + rope_deltas[b]`` on all three rows.
    """
    if config.vision is None or config.image_token_id is None or config.video_token_id is None:
        raise ValueError(f"{config.model_type} has no vision config or image/video token ids; mRoPE positions "
                         "of a text-only model are plain aranges")
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask_bt = (np.ones((batch, length), dtype=bool) if attention_mask is None
               else np.asarray(attention_mask).astype(bool))
    merge = config.vision.spatial_merge_size
    types_bt = modality_types(input_ids, config.image_token_id, config.video_token_id)

    image_grids = iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    video_grids_np = (np.asarray(video_grid_thw).reshape(-1, 3) if video_grid_thw is not None
                      else np.zeros((0, 3), dtype=np.int64))
    qwen2_5 = config.family == "qwen2_5_vl"
    if qwen2_5:
        seconds = (np.ones(len(video_grids_np), dtype=np.float32) if second_per_grid_ts is None
                   else np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1))
        if len(seconds) != len(video_grids_np):
            raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {len(video_grids_np)} videos")
        intervals = iter(np.float32(config.vision.tokens_per_second) * seconds)
    else:
        # Frames are separated by timestamp text, so each frame is its own t=1 grid.
        video_grids_np = np.repeat(video_grids_np, video_grids_np[:, 0].astype(np.int64), axis=0)
        video_grids_np[:, 0] = 1
    video_grids = iter(video_grids_np)

    position_ids = np.zeros((3, batch, length), dtype=np.int64)
    rope_deltas = np.zeros((batch,), dtype=np.int64)
    counts = {IMAGE: 0, VIDEO: 0}
    for b in range(batch):
        types_t = types_bt[b][mask_bt[b]]
        if types_t.size == 0:
            raise ValueError(f"row {b} of the batch has no unmasked tokens")
        pieces, current = [], 0
        for modality, start, end in _runs(types_t):
            if modality == TEXT:
                pieces.append(np.broadcast_to(np.arange(current, current + end - start), (3, end - start)))
                current += end - start
                continue
            grid = next(image_grids if modality == IMAGE else video_grids, None)
            name = "image" if modality == IMAGE else "video"
            if grid is None:
                raise ValueError(f"row {b} holds more {name} placeholder runs than {name} grids were given "
                                 f"({counts[modality]})")
            counts[modality] += 1
            interval = next(intervals) if modality == VIDEO and qwen2_5 else np.float32(1)
            pos = _vision_positions(current, grid, merge, interval)
            if pos.shape[1] != end - start:
                raise ValueError(f"row {b}: a run of {end - start} {name} tokens does not match its grid "
                                 f"{[int(g) for g in grid]} ({pos.shape[1]} tokens after {merge}x{merge} merge)")
            pieces.append(pos)
            current += max(int(grid[1]), int(grid[2])) // merge
        positions = np.concatenate(pieces, axis=1)
        position_ids[:, b, mask_bt[b]] = positions
        rope_deltas[b] = positions.max() + 1 - types_t.size
    for name, rest in (("image", image_grids), ("video", video_grids)):
        if next(rest, None) is not None:
            raise ValueError(f"more {name} grids were given than the prompt has {name} placeholder runs")
    return position_ids, rope_deltas
