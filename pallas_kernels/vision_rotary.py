"""2D rotary embedding of the Qwen ViTs (HF `Qwen2_5_VisionRotaryEmbedding` + `apply_rotary_pos_emb_vision`).

Per patch with grid position (h, w): c = concat(cos[h], cos[w]) (head_dim / 2 angles), the full cos is
concat(c, c), likewise sin, and x <- x cos + rotate_half(x) sin in fp32, cast back to x's dtype.
The tables are built once per model; the kernel gathers their rows by patch position and rotates q and k
in one pass, so cos/sin never exist as [N, head_dim] arrays in device memory.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Impl = Literal["auto", "reference", "pallas", "interpret"]


def vision_rotary_tables(head_dim: int, max_position: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each [max_position, head_dim // 4] float32: HF's VisionRotaryEmbedding(dim=head_dim // 2)."""
    if head_dim % 4:
        raise ValueError(f"vision rotary needs head_dim divisible by 4, got {head_dim}")
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
    angles = jnp.arange(max_position, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def _half_angles(table, pos_hw):
    """[N, head_dim / 2]: the row-position angles then the column-position angles."""
    return jnp.concatenate([table[pos_hw[:, 0]], table[pos_hw[:, 1]]], axis=-1)


def apply_vision_rotary_ref(
    q: jax.Array, k: jax.Array, pos_hw: jax.Array, cos_table: jax.Array, sin_table: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX reference: q, k [N, H, head_dim], pos_hw [N, 2] int (row, col)."""
    cos_nd = jnp.tile(_half_angles(cos_table, pos_hw), 2)[:, None, :]
    sin_nd = jnp.tile(_half_angles(sin_table, pos_hw), 2)[:, None, :]

    def rotate(x):
        x32 = x.astype(jnp.float32)
        half = x.shape[-1] // 2
        rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
        return (x32 * cos_nd + rotated * sin_nd).astype(x.dtype)

    return rotate(q), rotate(k)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _rotary_kernel(pos_ref, cos_ref, sin_ref, q_ref, k_ref, q_out_ref, k_out_ref, *, block_n):
    """Triton tiles must have power-of-two sizes, and ViT head dims (80, 72) and head counts are not:
    indices past the end are clamped onto the last valid element rather than masked, so the spare lanes
    re-load and re-store identical values (harmless, and no masked memory ops are needed)."""
    num_tokens, num_heads, head_dim = q_ref.shape
    half, quarter = head_dim // 2, head_dim // 4
    heads_p, half_p = _next_pow2(num_heads), _next_pow2(half)
    n_b = jnp.minimum(pl.program_id(0) * block_n + lax.broadcasted_iota(jnp.int32, (block_n,), 0), num_tokens - 1)
    d_d = jnp.minimum(lax.broadcasted_iota(jnp.int32, (half_p,), 0), half - 1)

    # The first quarter of the angles follows the patch row, the second the column.
    first = d_d[None, :] < quarter
    row_bd = jnp.where(first, pos_ref[n_b, 0][:, None], pos_ref[n_b, 1][:, None])
    col_bd = jnp.where(first, d_d[None, :], d_d[None, :] - quarter)
    cos_b1d = cos_ref[row_bd, col_bd].astype(jnp.float32)[:, None, :]
    sin_b1d = sin_ref[row_bd, col_bd].astype(jnp.float32)[:, None, :]

    shape = (block_n, heads_p, half_p)
    n_bhd = jnp.broadcast_to(n_b[:, None, None], shape)
    h_bhd = jnp.broadcast_to(jnp.minimum(lax.broadcasted_iota(jnp.int32, (heads_p,), 0), num_heads - 1)[None, :, None], shape)
    lo_bhd = jnp.broadcast_to(d_d[None, None, :], shape)
    hi_bhd = lo_bhd + half
    for x_ref, out_ref in ((q_ref, q_out_ref), (k_ref, k_out_ref)):
        x_lo = x_ref[n_bhd, h_bhd, lo_bhd].astype(jnp.float32)
        x_hi = x_ref[n_bhd, h_bhd, hi_bhd].astype(jnp.float32)
        out_ref[n_bhd, h_bhd, lo_bhd] = (x_lo * cos_b1d - x_hi * sin_b1d).astype(out_ref.dtype)
        out_ref[n_bhd, h_bhd, hi_bhd] = (x_hi * cos_b1d + x_lo * sin_b1d).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_elems", "num_warps", "interpret"))
def apply_vision_rotary_pallas(
    q: jax.Array,
    k: jax.Array,
    pos_hw: jax.Array,
    cos_table: jax.Array,
    sin_table: jax.Array,
    *,
    block_elems: int = 4096,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The fused kernel; block_elems bounds the half-tile (tokens x heads x head_dim/2) per program."""
    num_tokens, num_heads, head_dim = q.shape
    if head_dim % 4 or k.shape != q.shape:
        raise ValueError(f"q and k must match and head_dim be divisible by 4, got {q.shape}, {k.shape}")
    per_token = _next_pow2(num_heads) * _next_pow2(head_dim // 2)
    block_n = max(1, min(block_elems // per_token, _next_pow2(num_tokens)))
    return pl.pallas_call(
        functools.partial(_rotary_kernel, block_n=block_n),
        grid=(pl.cdiv(num_tokens, block_n),),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="vision_rotary",
    )(jnp.asarray(pos_hw, jnp.int32), cos_table, sin_table, q, k)


def apply_vision_rotary(
    q: jax.Array,
    k: jax.Array,
    pos_hw: jax.Array,
    cos_table: jax.Array,
    sin_table: jax.Array,
    *,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Rotate q, k [N, H, head_dim] by the patch positions pos_hw [N, 2] (row, col; any token order).

    impl: "auto" = the Pallas kernel on GPU, the reference elsewhere; "reference", "pallas", "interpret".
    """
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl == "reference":
        return apply_vision_rotary_ref(q, k, pos_hw, cos_table, sin_table)
    if impl not in ("pallas", "interpret"):
        raise ValueError(f"impl must be auto, reference, pallas or interpret, got {impl!r}")
    return apply_vision_rotary_pallas(q, k, pos_hw, cos_table, sin_table, interpret=impl == "interpret")
