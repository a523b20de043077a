"""Text multimodal RoPE (mRoPE): three position rows (t, h, w) share the rotary frequencies.

Qwen2.5-VL gives each row a contiguous section of the frequencies; Qwen3-VL and Qwen3.5 interleave them
(t, h, w, t, h, w, ...). Both are one static "which row feeds frequency i" table, computed once per config.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import TextConfig


@functools.lru_cache(maxsize=None)
def mrope_row_of_frequency(section: tuple[int, int, int], interleaved: bool) -> np.ndarray:
    """For each of the rotary_dim/2 frequencies, the position row (0=t, 1=h, 2=w) that drives it."""
    half = sum(section)
    if not interleaved:
        return np.repeat(np.arange(3), section)
    rows = np.zeros(half, np.int32)
    for row in (1, 2):  # HF: freqs[..., row:3*section[row]:3] come from row `row`
        rows[row : 3 * section[row] : 3] = row
    return rows


def inverse_frequencies(cfg: TextConfig) -> np.ndarray:
    dim = cfg.rotary_dim
    return 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def mrope_cos_sin(positions_3bt: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] in fp32 for 3-row positions [3, B, T]."""
    rows = mrope_row_of_frequency(cfg.mrope_section, cfg.mrope_interleaved)
    inv_freq = jnp.asarray(inverse_frequencies(cfg), jnp.float32)
    pos_fbt = jnp.take(positions_3bt, jnp.asarray(rows), axis=0).astype(jnp.float32)  # [half, B, T]
    freqs_btf = jnp.moveaxis(pos_fbt, 0, -1) * inv_freq
    emb = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x_bthd: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim features of every head; the rest pass through (partial rotary)."""
    r = cos_btr.shape[-1]
    cos = cos_btr[:, :, None, :].astype(x_bthd.dtype)
    sin = sin_btr[:, :, None, :].astype(x_bthd.dtype)
    x_rot, x_pass = x_bthd[..., :r], x_bthd[..., r:]
    out = x_rot * cos + rotate_half(x_rot) * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out
