"""The public model handle: ``qwenvl_jax.load(path)`` returns a ``QwenVL``."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.models.model import QwenVLModel, multimodal_logits_fn, text_logits_fn
from qwenvl_jax.models.multimodal import prepare_multimodal
from qwenvl_jax.models.rope_index import get_rope_index

# Per image or video; the largest the hub processors make is ~16k patches (Qwen2.5-VL's 12.8 MP at 14 px).
DEFAULT_MAX_VISION_PATCHES = 32768


def _right_align(mask_bt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (start, length) of a contiguous attention mask; the model runs rows shifted to start at 0."""
    if mask_bt.ndim != 2 or not np.isin(mask_bt, (0, 1)).all():
        raise ValueError("attention_mask must be a [B, T] array of 0/1")
    lengths = mask_bt.sum(axis=1).astype(np.int32)
    starts = np.argmax(mask_bt, axis=1).astype(np.int32)
    for row, (s, n) in enumerate(zip(starts, lengths)):
        if n == 0:
            raise ValueError(f"attention_mask row {row} has no real tokens")
        if not mask_bt[row, s : s + n].all():
            raise ValueError(f"attention_mask row {row} is not contiguous (only left or right padding is supported)")
    return starts, lengths


def _shift_rows(x_bt: np.ndarray, shifts_b: np.ndarray) -> np.ndarray:
    """Rolls each row left by its shift (axis 1), trailing axes carried along."""
    t = x_bt.shape[1]
    idx = (np.arange(t)[None, :] + shifts_b[:, None]) % t
    return np.take_along_axis(x_bt, idx.reshape(idx.shape + (1,) * (x_bt.ndim - 2)), axis=1)


class QwenVL:
    """A loaded model: config, parameters on the device, and the entry points."""

    def __init__(self, cfg: ModelConfig, model: QwenVLModel, path: Path):
        self.config = cfg
        self.graphdef, self.params = nnx.split(model)
        self.path = path
        self.max_vision_patches = DEFAULT_MAX_VISION_PATCHES

    @property
    def dtype(self) -> jnp.dtype:
        return self.params["language_model"]["embed_tokens"]["weight"].get_value().dtype

    def logits(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        pixel_values: np.ndarray | None = None,
        image_grid_thw: np.ndarray | None = None,
        pixel_values_videos: np.ndarray | None = None,
        video_grid_thw: np.ndarray | None = None,
        second_per_grid_ts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Full-sequence logits [B, T, vocab] (float32); rows may be left- or right-padded.

        Images and videos come as the HF processor returns them (numpy, HF's names and layouts); the prompt holds
        one placeholder token per merged vision token. Padded positions are returned as zeros.
        """
        ids_bt = np.asarray(input_ids)
        if ids_bt.ndim != 2 or not np.issubdtype(ids_bt.dtype, np.integer):
            raise ValueError(f"input_ids must be a [B, T] integer array, got {ids_bt.dtype} {ids_bt.shape}")
        vocab = self.config.text.vocab_size
        mask_bt = np.ones_like(ids_bt) if attention_mask is None else np.asarray(attention_mask)
        if mask_bt.shape != ids_bt.shape:
            raise ValueError(f"attention_mask shape {mask_bt.shape} != input_ids shape {ids_bt.shape}")
        starts, lengths = _right_align(mask_bt)
        shifted_bt = _shift_rows(ids_bt, starts)
        real_bt = np.arange(ids_bt.shape[1])[None, :] < lengths[:, None]
        if (bad := shifted_bt[real_bt]).size and (bad.min() < 0 or bad.max() >= vocab):
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        shifted_bt = np.where(real_bt, shifted_bt, 0).astype(np.int32)

        mm = prepare_multimodal(self.config, shifted_bt, real_bt, pixel_values=pixel_values,
                                image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                                video_grid_thw=video_grid_thw, max_patches=self.max_vision_patches)
        if mm is None:  # text only: the vision tower is neither traced nor run
            # Text-only mRoPE: all three rows are the running position (HF's get_rope_index without vision).
            positions_3bt = np.broadcast_to(np.arange(ids_bt.shape[1], dtype=np.int32), (3, *ids_bt.shape))
            logits = text_logits_fn(self.graphdef, self.params, shifted_bt, positions_3bt, lengths)
        else:
            positions_3bt, _ = get_rope_index(self.config, ids_bt, image_grid_thw, video_grid_thw,
                                              second_per_grid_ts, mask_bt)
            positions_3bt = np.moveaxis(_shift_rows(np.moveaxis(positions_3bt, 0, -1), starts), -1, 0)
            logits = multimodal_logits_fn(self.graphdef, self.params, shifted_bt, positions_3bt.astype(np.int32),
                                          lengths, mm)
        logits = np.where(real_bt[..., None], np.asarray(logits), 0.0)
        return _shift_rows(logits, -starts)


def load(path: str | Path, dtype: str | None = None) -> QwenVL:
    """Loads a converted checkpoint directory, or an HF checkpoint directory (converted in memory)."""
    from convert.converter import load_params

    cfg, model = load_params(path, dtype)
    return QwenVL(cfg, model, Path(path))
