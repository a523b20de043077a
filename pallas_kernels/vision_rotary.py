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


def _vector_width(head_dim: int) -> int:
    """Elements per unit: the largest power of two (at most 8, i.e. 16 bytes of bf16) dividing head_dim / 2,
    so that no unit straddles the two halves that rotate_half pairs up."""
    half = head_dim // 2
    return min(8, half & -half)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _rotary_kernel(pos_ref, cos_ref, sin_ref, q_ref, k_ref, q_out_ref, k_out_ref, *, block_heads, num_heads, head_dim):
    """q/k are viewed as rows of `width` contiguous elements ("units"), so every load and store is one
    contiguous vector even though ViT head dims (80, 72) are not powers of two, which Triton's tiles must be.
    A program owns whole (token, head) pairs, both halves, [block_heads, units_per_half] units each: it reads
    nothing another program writes, which makes the in-place (aliased) update race-free. Indices past the end
    (the power-of-two padding of the tile) are clamped onto the last valid unit or head: those lanes reload and
    rewrite identical values."""
    num_units, width = q_ref.shape
    units_per_half = head_dim // 2 // width
    quarter = head_dim // 4
    heads_total = num_units // (2 * units_per_half)
    head_h = jnp.minimum(
        pl.program_id(0) * block_heads + lax.broadcasted_iota(jnp.int32, (block_heads,), 0), heads_total - 1
    )
    unit_j = jnp.minimum(lax.broadcasted_iota(jnp.int32, (_next_pow2(units_per_half),), 0), units_per_half - 1)
    lane_w = lax.broadcasted_iota(jnp.int32, (width,), 0)
    shape = (block_heads, unit_j.shape[0], width)

    # Angle index within the half: the first quarter of head_dim follows the patch row, the next the column.
    token_h = head_h // num_heads
    d_jw = unit_j[:, None] * width + lane_w[None, :]
    row_first = d_jw < quarter
    table_row = jnp.where(row_first[None], pos_ref[token_h, 0][:, None, None], pos_ref[token_h, 1][:, None, None])
    table_col = jnp.broadcast_to(jnp.where(row_first, d_jw, d_jw - quarter)[None], shape)
    cos_hjw = cos_ref[table_row, table_col].astype(jnp.float32)
    sin_hjw = sin_ref[table_row, table_col].astype(jnp.float32)

    lo_rows = jnp.broadcast_to((head_h * (2 * units_per_half))[:, None, None] + unit_j[None, :, None], shape)
    hi_rows = lo_rows + units_per_half
    lanes = jnp.broadcast_to(lane_w[None, None, :], shape)
    for x_ref, out_ref in ((q_ref, q_out_ref), (k_ref, k_out_ref)):
        x_lo = x_ref[lo_rows, lanes].astype(jnp.float32)
        x_hi = x_ref[hi_rows, lanes].astype(jnp.float32)
        out_ref[lo_rows, lanes] = (x_lo * cos_hjw - x_hi * sin_hjw).astype(out_ref.dtype)
        out_ref[hi_rows, lanes] = (x_hi * cos_hjw + x_lo * sin_hjw).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_elems", "num_warps", "interpret"))
def apply_vision_rotary_pallas(
    q: jax.Array,
    k: jax.Array,
    pos_hw: jax.Array,
    cos_table: jax.Array,
    sin_table: jax.Array,
    *,
    block_elems: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The fused kernel. q and k are rotated in place (aliased outputs): inside a jit where they are
    intermediates no memory is allocated, and a caller that still needs the originals gets a copy from XLA.
    block_elems (a power of two) bounds the padded half-tile, heads x units x width, per program. None:
    16384 / width, i.e. 2048 at head_dim 80 (16-byte units) and 4096 at 72 (8-byte units), the best of
    1024 / 2048 / 4096 at each on an H100 (at 72, 4096 beat 2048 by 4-12%; at 80 it lost by 7-9%)."""
    num_tokens, num_heads, head_dim = q.shape
    if head_dim % 4 or k.shape != q.shape:
        raise ValueError(f"q and k must match and head_dim be divisible by 4, got {q.shape}, {k.shape}")
    width = _vector_width(head_dim)
    block_elems = block_elems or 16384 // width
    num_units = q.size // width
    per_head = _next_pow2(head_dim // 2 // width) * width
    block_heads = max(1, min(block_elems // per_head, _next_pow2(num_tokens * num_heads)))
    kernel = functools.partial(_rotary_kernel, block_heads=block_heads, num_heads=num_heads, head_dim=head_dim)
    q_rot, k_rot = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens * num_heads, block_heads),),
        out_shape=[jax.ShapeDtypeStruct((num_units, width), q.dtype), jax.ShapeDtypeStruct((num_units, width), k.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="vision_rotary",
    )(jnp.asarray(pos_hw, jnp.int32), cos_table, sin_table, q.reshape(num_units, width), k.reshape(num_units, width))
    return q_rot.reshape(q.shape), k_rot.reshape(k.shape)


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
