"""Decode-step attention (one query token per row) over the engine's contiguous per-slot KV cache: flash-decoding.

The cache of one layer is [S, L, KV, D] (S slots, L = max_len positions); row b of the batch reads slot b and
only its first lengths[b] positions. Grid (B, KV, num_splits): a program owns one row, one kv head with all G
of its query heads (GQA: K/V are read once per group), and one contiguous range of the row's context. The
ranges are cut at run time from the row's length, so a row's cost follows its length, not L, and short rows
still spread over many SMs. Each program writes an unnormalised partial output with its running max and sum
(fp32); a second small kernel merges the splits (log-sum-exp), one program per row and query head. The cache
goes to the kernel whole (a slice before the call would make XLA copy it); BlockSpecs pick slot b and kv head
h, masked loads the positions. Lowered through Triton on GPU, or run by the Pallas interpreter on CPU.

The online-softmax step, the tile rules and the impl dispatch here are shared with prefill_attention.py.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.device_info import multiprocessors

__all__ = [
    "decode_attention", "decode_attention_ref", "default_tiling", "kernel_supports", "key_block", "check_tile",
    "flash_init", "flash_step", "resolve_impl",
]

Impl = Literal["auto", "reference", "pallas", "interpret"]

# Triton's smallest matrix-product tile is 16 in every dimension: the query group is padded up to it.
MIN_DOT = 16
MAX_SPLITS = 64
# Shared memory for one pipeline stage of K (or V): 64 keys of bf16 at D=256. Twice that (128 keys, or fp32)
# would put two stages of K and V at 256 KiB, past the 227 KiB a Hopper block can have.
TILE_BYTES = 32 * 1024


def kernel_supports(head_dim: int) -> bool:
    """Triton tiles need power-of-two sizes of at least 16 (its smallest matrix-product tile)."""
    return head_dim >= MIN_DOT and head_dim & (head_dim - 1) == 0


def resolve_impl(impl: Impl, num_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """Checks the head layout and picks the implementation: "auto" is the kernel when the default backend is
    GPU and D suits it, the reference otherwise. Returns "reference", "pallas" or "interpret"; an unknown impl,
    or the kernel asked for at a D it cannot tile, is refused."""
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" and kernel_supports(head_dim) else "reference"
    if impl not in ("reference", "pallas", "interpret"):
        raise ValueError(f"impl must be auto, reference, pallas or interpret, got {impl!r}")
    if impl != "reference" and not kernel_supports(head_dim):
        raise ValueError(f"the Pallas kernel needs a power-of-two head size >= 16, got D={head_dim}")
    return impl


def key_block(head_dim: int, itemsize: int) -> int:
    """Keys per loop step: 64, fewer where a stage of K would pass TILE_BYTES (fp32 at D=256)."""
    return max(MIN_DOT, min(64, TILE_BYTES // (head_dim * itemsize)))


def check_tile(name: str, size: int) -> None:
    """A tile edge Triton can take: a power of two of at least its smallest matrix-product tile."""
    if size < MIN_DOT or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_DOT}, got {size}")


def flash_init(rows: int, head_dim: int):
    """The online softmax's empty state (o [M, D], m [M], l [M], fp32): m = -inf, so a row that never sees a
    key keeps l = 0 and o = 0."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def flash_step(carry, q_md, k_kd, v_kd, *, scale: float, mask_mk=None):
    """One key block of the online softmax: carry (o [M, D] unnormalised, m [M] running max, l [M] running sum),
    all fp32; q, k, v in the cache's dtype (bf16 tensor cores for a bf16 cache), products accumulated in fp32;
    mask_mk (broadcastable to [M, K]) the keys each row may see, None for all. A row's first block must hold a
    key it sees: m is then finite from there on, so exp(m - m_new) and exp(-inf - m_new) are never NaN."""
    o_md, m_m, l_m = carry
    s_mk = lax.dot_general(q_md, k_kd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    if mask_mk is not None:
        s_mk = jnp.where(mask_mk, s_mk, -jnp.inf)
    m_new = jnp.maximum(m_m, jnp.max(s_mk, axis=1))
    correction = jnp.exp(m_m - m_new)
    p_mk = jnp.exp(s_mk - m_new[:, None])
    pv_md = jnp.dot(p_mk.astype(v_kd.dtype), v_kd, preferred_element_type=jnp.float32)
    return correction[:, None] * o_md + pv_md, m_new, correction * l_m + jnp.sum(p_mk, axis=1)


def _padded_group(group: int) -> int:
    return max(MIN_DOT, 1 << (group - 1).bit_length())


def default_tiling(batch: int, num_kv_heads: int, head_dim: int, itemsize: int) -> tuple[int, int]:
    """(num_splits, block_k). num_splits: enough splits that the B * KV * splits programs make about two
    waves over the SMs (a program is one row's kv head: at B1 that is 4-8 programs for a whole GPU), capped
    at MAX_SPLITS since the fp32 partials the merge reads grow with it. block_k: 64 keys, fewer where a
    stage of K would pass TILE_BYTES (fp32 at D=256)."""
    num_splits = min(MAX_SPLITS, max(1, pl.cdiv(2 * multiprocessors(), batch * num_kv_heads)))
    return num_splits, key_block(head_dim, itemsize)


def decode_attention_ref(
    q_bhd: jax.Array,
    k_cache_sltd: jax.Array,
    v_cache_sltd: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Pure-JAX reference: a masked fp32 softmax over all L positions of slots [0, B). Rows of length 0 give
    zeros; positions past a row's length may hold anything (NaN included) and are selected away, keys and
    values both (a zero weight times NaN is still NaN)."""
    batch, num_heads, head_dim = q_bhd.shape
    max_len, num_kv_heads = k_cache_sltd.shape[1:3]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    valid_bl = jnp.arange(max_len)[None, :] < lengths_b[:, None]
    keep_bl11 = valid_bl[:, :, None, None]
    k_bltd = jnp.where(keep_bl11, k_cache_sltd[:batch].astype(jnp.float32), 0.0)
    v_bltd = jnp.where(keep_bl11, v_cache_sltd[:batch].astype(jnp.float32), 0.0)
    q_btgd = q_bhd.astype(jnp.float32).reshape(batch, num_kv_heads, group, head_dim)
    s_btgl = jnp.einsum("btgd,bltd->btgl", q_btgd, k_bltd) * scale
    s_btgl = jnp.where(valid_bl[:, None, None, :], s_btgl, -jnp.inf)
    m_btg1 = jnp.max(s_btgl, axis=-1, keepdims=True)
    p_btgl = jnp.exp(s_btgl - jnp.where(jnp.isfinite(m_btg1), m_btg1, 0.0))
    l_btg1 = jnp.sum(p_btgl, axis=-1, keepdims=True)
    o_btgd = jnp.einsum("btgl,bltd->btgd", p_btgl, v_bltd) / jnp.where(l_btg1 > 0, l_btg1, 1.0)
    return o_btgd.reshape(batch, num_heads, head_dim).astype(q_bhd.dtype)


def _decode_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, scale, group, block_k, num_splits):
    """q_ref [H, D] (row b); k_ref, v_ref [L, D] (slot b, kv head h); o_ref [H, D], m_ref, l_ref [H] (row b,
    split s). The program reads and writes query heads h*G .. h*G + G - 1."""
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_len = k_ref.shape[0]
    length = jnp.clip(lengths_ref[b], 0, max_len)
    # Chunks are whole blocks, so only a range's last block is partial; lo..hi depend on the length alone.
    chunk = jnp.maximum(pl.cdiv(pl.cdiv(length, num_splits), block_k) * block_k, block_k)
    lo = s * chunk
    hi = jnp.minimum(lo + chunk, length)
    num_blocks = pl.cdiv(jnp.maximum(hi - lo, 0), block_k)
    head_dim = q_ref.shape[1]
    # The group is padded to a power of two >= 16 rows for the dot. The padding rows are the next kv head's
    # query heads (or past H): masked on load, and on store, where they would race with that head's program.
    group_pad = _padded_group(group)
    heads = pl.ds(h * group, group_pad)
    valid_g = lax.broadcasted_iota(jnp.int32, (group_pad,), 0) < group
    # Both dot operands in the cache's dtype (bf16 tensor cores for a bf16 cache), accumulation in fp32.
    q_gd = plgpu.load(q_ref.at[heads, :], mask=valid_g[:, None], other=0.0).astype(k_ref.dtype)
    offsets_k = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def body(i, carry):
        start = lo + i * block_k
        valid_k = start + offsets_k < hi
        rows = pl.ds(start, block_k)
        # Masked loads: positions past the length are neither read (they may be past L, or NaN) nor used.
        k_kd = plgpu.load(k_ref.at[rows, :], mask=valid_k[:, None], other=0.0)
        v_kd = plgpu.load(v_ref.at[rows, :], mask=valid_k[:, None], other=0.0)
        # Every block holds a valid key, so m_new is finite and exp(-inf - m_new) = 0 on the first block.
        return flash_step(carry, q_gd, k_kd, v_kd, scale=scale, mask_mk=valid_k[None, :])

    # An empty range (a short row's trailing splits, a row of length 0) writes the neutral partial.
    o_gd, m_g, l_g = lax.fori_loop(0, num_blocks, body, flash_init(group_pad, head_dim))
    plgpu.store(o_ref.at[heads, :], o_gd, mask=valid_g[:, None])
    plgpu.store(m_ref.at[heads], m_g, mask=valid_g)
    plgpu.store(l_ref.at[heads], l_g, mask=valid_g)


def _merge_kernel(o_ref, m_ref, l_ref, out_ref, *, num_splits):
    """Program (b, j): query head j of row b, the log-sum-exp merge of its splits' partials. o_ref [S', D],
    m_ref, l_ref [S'] (row b, head j; S' = num_splits padded to a power of two), fp32; out_ref [D]: zeros where
    nothing was attended.

    One kernel: the same merge in plain JAX was three (max, weighted sums, divide), ~1.7 us each at batch 1
    whatever they move (bench/NOTES.md, kernel census)."""
    splits = pl.ds(0, o_ref.shape[0])
    valid_s = lax.broadcasted_iota(jnp.int32, (o_ref.shape[0],), 0) < num_splits
    m_s = plgpu.load(m_ref.at[splits], mask=valid_s, other=-jnp.inf)
    l_s = plgpu.load(l_ref.at[splits], mask=valid_s, other=0.0)
    o_sd = plgpu.load(o_ref.at[splits, :], mask=valid_s[:, None], other=0.0)
    m = jnp.max(m_s)
    # All splits empty (length 0): m = -inf everywhere; shift by 0 so the weights are exp(-inf) = 0, not NaN.
    w_s = jnp.exp(m_s - jnp.where(m > -jnp.inf, m, 0.0))
    l = jnp.sum(w_s * l_s)
    o_d = jnp.sum(w_s[:, None] * o_sd, axis=0)
    out_ref[...] = (o_d / jnp.where(l > 0, l, 1.0)).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "num_splits", "block_k", "num_warps", "num_stages", "interpret"))
def decode_attention_pallas(
    q_bhd: jax.Array,
    k_cache_sltd: jax.Array,
    v_cache_sltd: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    num_splits: int,
    block_k: int,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """The kernel and the merge kernel; shapes as `decode_attention`, tiling explicit."""
    batch, num_heads, head_dim = q_bhd.shape
    max_len, num_kv_heads = k_cache_sltd.shape[1:3]
    kernel = functools.partial(
        _decode_kernel, scale=scale, group=num_heads // num_kv_heads, block_k=block_k, num_splits=num_splits
    )
    whole = pl.BlockSpec(memory_space=None)
    # A row's H query heads, and its partials, as one block: kv head h's program picks its G heads within.
    q_spec = pl.BlockSpec((None, num_heads, head_dim), lambda b, h, s: (b, 0, 0))
    # Slot b, kv head h, all L positions as one block: only a ref, the kernel loads the positions it needs.
    cache_spec = pl.BlockSpec((None, max_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    o_spec = pl.BlockSpec((None, None, num_heads, head_dim), lambda b, h, s: (b, s, 0, 0))
    ml_spec = pl.BlockSpec((None, None, num_heads), lambda b, h, s: (b, s, 0))
    # Split axis padded to a power of two for the merge kernel's tiles; the padding is never written nor read.
    padded_splits = pl.next_power_of_2(num_splits)
    partial_shape = (batch, padded_splits, num_heads)
    o_bshd, m_bsh, l_bsh = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[whole, q_spec, cache_spec, cache_spec],
        out_specs=[o_spec, ml_spec, ml_spec],
        out_shape=[
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(lengths_b.astype(jnp.int32), q_bhd, k_cache_sltd, v_cache_sltd)
    partial_spec = pl.BlockSpec((None, padded_splits, None), lambda b, j: (b, 0, j))
    return pl.pallas_call(
        functools.partial(_merge_kernel, num_splits=num_splits),
        grid=(batch, num_heads),
        in_specs=[pl.BlockSpec((None, padded_splits, None, head_dim), lambda b, j: (b, 0, j, 0)), partial_spec,
                  partial_spec],
        out_specs=pl.BlockSpec((None, None, head_dim), lambda b, j: (b, j, 0)),
        out_shape=jax.ShapeDtypeStruct(q_bhd.shape, q_bhd.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="decode_attention_merge",
    )(o_bshd, m_bsh, l_bsh)


def decode_attention(
    q_bhd: jax.Array,
    k_cache_sltd: jax.Array,
    v_cache_sltd: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float | None = None,
    impl: Impl = "auto",
    num_splits: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Attention of one query token per row over its slot of the cache.

    q [B, H, D] (rotary applied; row b reads slot b); k/v cache [S, L, KV, D] with S >= B and H a multiple of
    KV; lengths [B] int32, the valid positions of each row (0 gives a zero output). Only slots [0, B) and
    positions [0, lengths[b]) are read. Returns [B, H, D] in q's dtype; softmax in fp32, scale D**-0.5 unless
    given.

    impl: "auto" = the kernel when the default backend is GPU and D suits it, the reference otherwise;
    "reference", "pallas" (compiled kernel), "interpret" (kernel in the Pallas interpreter).
    Tiling (kernel only; None = `default_tiling`, 4 warps, 2 stages): num_splits ranges per row and kv head,
    block_k keys per loop step (a power of two >= 16: 32, 64, 128).
    """
    batch, num_heads, head_dim = q_bhd.shape
    num_slots, _, num_kv_heads, _ = k_cache_sltd.shape
    impl = resolve_impl(impl, num_heads, num_kv_heads, head_dim)
    if num_slots < batch:
        raise ValueError(f"the cache has {num_slots} slots for a batch of {batch}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    if impl == "reference":
        return decode_attention_ref(q_bhd, k_cache_sltd, v_cache_sltd, lengths_b, scale=scale)
    default_splits, default_block = default_tiling(
        batch, num_kv_heads, head_dim, jnp.dtype(k_cache_sltd.dtype).itemsize
    )
    block_k = default_block if block_k is None else block_k
    check_tile("block_k", block_k)
    return decode_attention_pallas(
        q_bhd, k_cache_sltd, v_cache_sltd, lengths_b,
        scale=scale,
        num_splits=default_splits if num_splits is None else num_splits,
        block_k=block_k,
        num_warps=4 if num_warps is None else num_warps,
        num_stages=2 if num_stages is None else num_stages,
        interpret=impl == "interpret",
    )
