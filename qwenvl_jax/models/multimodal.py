"""Fusing vision tokens into the LM input (HF: ``get_placeholder_mask`` + ``masked_scatter`` and DeepStack's
``visual_pos_masks``).

The host checks the processor's arrays against the prompt and works out, once, where each merged vision token
goes: its flat index b * T + t in the (right-aligned) batch, images first then videos, row-major within each,
exactly the order in which HF's ``masked_scatter`` consumes the concatenated features. The device then only
scatters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.models.vision import VisionInputs, check_grids, prepare_vision_inputs


class MultimodalInputs(NamedTuple):
    """Everything the multimodal forward needs beyond the text inputs."""

    pixel_patches_np: np.ndarray  # [N, patch_dim] images' patches then videos'
    vision: VisionInputs
    dest_m: np.ndarray  # int32 [M]: flat batch position of each merged vision token


def _patches(pixels, grids: np.ndarray, patch_dim: int, pixels_name: str, grid_name: str) -> np.ndarray:
    pixels_np = np.asarray(pixels)
    if pixels_np.ndim != 2 or pixels_np.shape[1] != patch_dim or not np.issubdtype(pixels_np.dtype, np.floating):
        raise ValueError(f"{pixels_name} must be a float array [num_patches, {patch_dim}] "
                         f"(channels x temporal_patch x patch x patch), got {pixels_np.dtype} {pixels_np.shape}")
    expected = int(grids.prod(axis=1).sum())
    if pixels_np.shape[0] != expected:
        raise ValueError(f"{pixels_name} has {pixels_np.shape[0]} patches but {grid_name} {grids.tolist()} "
                         f"describes {expected}")
    return pixels_np


class PackedVision(NamedTuple):
    """A request's images and videos, checked against its prompt: the engine's input (its tables are made per
    patch bucket, with the vision call)."""

    pixel_patches_np: np.ndarray  # [N, patch_dim] images' patches then videos'
    grids_thw: np.ndarray  # int64 [n, 3], images then videos
    dest_m: np.ndarray  # int32 [M]: flat batch position of each merged vision token


def pack_vision(
    cfg: ModelConfig,
    input_ids_bt: np.ndarray,
    real_bt: np.ndarray,
    *,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    pixel_values_videos: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    max_patches: int | None = None,
) -> PackedVision | None:
    """Validates HF-named processor outputs against a right-aligned batch (``real_bt`` marks real tokens) and
    packs them for one vision call; None for a text-only request. Raises ValueError naming the first problem."""
    given = [a is not None for a in (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)]
    vision = cfg.vision
    if vision is None:
        if any(given):
            raise ValueError(f"{cfg.model_type} has no vision tower; pass text only")
        return None
    patches, grids, dests = [], [], []
    for kind, pixels, grid, token_id in (("image", pixel_values, image_grid_thw, cfg.image_token_id),
                                         ("video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
        pixels_name = "pixel_values" if kind == "image" else "pixel_values_videos"
        grid_name = f"{kind}_grid_thw"
        placeholders = np.flatnonzero((input_ids_bt == token_id) & real_bt)
        if (pixels is None) != (grid is None):
            raise ValueError(f"{pixels_name} and {grid_name} must be given together")
        if pixels is None:
            if placeholders.size:
                raise ValueError(f"input_ids hold {placeholders.size} {kind} placeholder tokens but no {pixels_name} "
                                 "were given")
            continue
        grid_np = check_grids(vision, grid, grid_name, max_patches)
        patches.append(_patches(pixels, grid_np, vision.patch_dim, pixels_name, grid_name))
        n_tokens = int(grid_np.prod(axis=1).sum()) // vision.spatial_merge_size**2
        if placeholders.size != n_tokens:
            raise ValueError(f"input_ids hold {placeholders.size} {kind} placeholder tokens but {grid_name} "
                             f"{grid_np.tolist()} makes {n_tokens} {kind} tokens")
        grids.append(grid_np)
        dests.append(placeholders)
    if not patches:
        return None
    return PackedVision(
        # One array is passed on as given, not copied: the engine's padded upload buffer is the one copy (a
        # 1024 x 1024 image's float32 patches are 25 MB; four of them, a copy of ~10 ms on the host).
        pixel_patches_np=patches[0] if len(patches) == 1 else np.concatenate(patches),
        grids_thw=np.concatenate(grids),
        dest_m=np.concatenate(dests).astype(np.int32),
    )


def prepare_multimodal(cfg: ModelConfig, input_ids_bt: np.ndarray, real_bt: np.ndarray,
                       **arrays: np.ndarray | int | None) -> MultimodalInputs | None:
    """``pack_vision`` (same arguments) and the tower's tables: the inputs of one unbucketed forward."""
    packed = pack_vision(cfg, input_ids_bt, real_bt, **arrays)
    if packed is None:
        return None
    return MultimodalInputs(packed.pixel_patches_np, prepare_vision_inputs(cfg.vision, packed.grids_thw),
                            packed.dest_m)


def fuse_vision(embeds_btd: jax.Array, visual_md: jax.Array, deepstack_kmd: jax.Array | None,
                dest_m: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(token embeddings with the vision tokens in place, DeepStack features as the decoder's ``deepstack_lbtd``:
    [k, B, T, D], zero away from vision tokens; None without DeepStack). Tokens whose destination is out of range
    (>= B * T: bucket padding, or tokens of another prefill chunk) are dropped."""
    b, t, d = embeds_btd.shape
    embeds = embeds_btd.reshape(b * t, d).at[dest_m].set(visual_md.astype(embeds_btd.dtype), mode="drop")
    embeds = embeds.reshape(b, t, d)
    if deepstack_kmd is None:
        return embeds, None
    k = deepstack_kmd.shape[0]
    deep = jnp.zeros((k, b * t, d), embeds_btd.dtype).at[:, dest_m].set(deepstack_kmd.astype(embeds_btd.dtype),
                                                                          mode="drop")
    return embeds, deep.reshape(k, b, t, d)
