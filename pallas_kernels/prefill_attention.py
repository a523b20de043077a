"""Prefill attention over the engine's contiguous per-slot KV cache, read where it lives: flash attention for
new tokens that continue a cached sequence (chunked prefill, or a prompt after a cached prefix).

The cache of one layer is [S, L, KV, D] (S slots, L = max_len positions). Row b of the batch is slot slots[b]
(any slot, in any order); its T new tokens sit at cache positions starts[b] + t for t < lengths[b], and their
keys and values are already in the cache there (the model writes first, then attends). Query t sees cache
positions j <= starts[b] + t: the cached prefix and the new tokens up to itself.

Grid (B, H, T / block_q): a program owns one row, one query head and block_q consecutive new tokens, and walks
the key blocks from position 0 to the last one its queries see, a bound computed at run time from the row's
start, so a program's cost follows its prefix and no [T, L] mask or score matrix exists. Blocks wholly before
the block's first query are read without any mask; only the last one or two (the diagonal, where causality
and the row's end cut in) are masked, on the loads too, so positions past starts[b] + lengths[b] are never
read (they may hold NaN, or be past L). One query head per program, not a kv head's whole group: a program's
arithmetic per key read is its row count either way, and with 64-128 rows a program is already as tall as
its accumulator allows; the G heads of a kv head then read the same K/V blocks at about the same time, from L2.

The whole cache goes to the kernel (a slice or gather before the call would make XLA copy it); the BlockSpec
picks kv head h // G, the kernel the slot, from slots[b] (the Triton backend's index maps cannot read arrays).
Lowered through Triton on GPU, or run by the Pallas interpreter on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode_attention import (
    Impl, check_tile, flash_init, flash_step, kernel_supports, key_block, resolve_impl,
)

__all__ = ["prefill_attention", "prefill_attention_ref", "default_tiling", "kernel_supports"]


def default_tiling(head_dim: int, itemsize: int) -> tuple[int, int, int]:
    """(block_q, block_k, num_warps). block_k: 64 keys, 32 for fp32 at D=256, so a pipeline stage of K (or V)
    stays within decode attention's TILE_BYTES. block_q: 128 queries up to D=128; 64 at D=256, where the fp32
    accumulator of 128 rows (128 KiB) would leave 8 warps no registers, and the q tile plus two stages of K
    and V would pass the 227 KiB of shared memory a Hopper block can have in fp32. num_warps: 8 (the
    accumulator spread over 256 threads), 4 for D <= 64 as jax's Triton flash attention does."""
    block_q = 128 if head_dim <= 128 else 64
    return block_q, key_block(head_dim, itemsize), 4 if head_dim <= 64 else 8


def prefill_attention_ref(
    q_bthd: jax.Array,
    k_cache_sltd: jax.Array,
    v_cache_sltd: jax.Array,
    slots_b: jax.Array,
    starts_b: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Pure-JAX reference: gathers the rows' slots and runs a masked fp32 softmax over all L positions. Padding
    queries (t >= lengths[b]) give zeros; cache positions a query must not see may hold anything (NaN
    included) and are selected away, keys and values both (a zero weight times NaN is still NaN)."""
    batch, seq_len, num_heads, head_dim = q_bthd.shape
    max_len, num_kv_heads = k_cache_sltd.shape[1:3]
    group = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    pos_q_bt = starts_b[:, None] + jnp.arange(seq_len)[None, :]
    valid_q_bt = jnp.arange(seq_len)[None, :] < lengths_b[:, None]
    pos_l = jnp.arange(max_len)
    valid_bl = pos_l[None, :] < (starts_b + lengths_b)[:, None]
    keep_bl11 = valid_bl[:, :, None, None]
    k_bltd = jnp.where(keep_bl11, k_cache_sltd[slots_b].astype(jnp.float32), 0.0)
    v_bltd = jnp.where(keep_bl11, v_cache_sltd[slots_b].astype(jnp.float32), 0.0)
    q_btkgd = q_bthd.astype(jnp.float32).reshape(batch, seq_len, num_kv_heads, group, head_dim)
    s_bkgtl = jnp.einsum("btkgd,blkd->bkgtl", q_btkgd, k_bltd) * scale
    sees_btl = (pos_l[None, None, :] <= pos_q_bt[:, :, None]) & valid_bl[:, None, :] & valid_q_bt[:, :, None]
    s_bkgtl = jnp.where(sees_btl[:, None, None], s_bkgtl, -jnp.inf)
    m_bkgt1 = jnp.max(s_bkgtl, axis=-1, keepdims=True)
    p_bkgtl = jnp.exp(s_bkgtl - jnp.where(jnp.isfinite(m_bkgt1), m_bkgt1, 0.0))
    l_bkgt1 = jnp.sum(p_bkgtl, axis=-1, keepdims=True)
    o_bkgtd = jnp.einsum("bkgtl,blkd->bkgtd", p_bkgtl, v_bltd) / jnp.where(l_bkgt1 > 0, l_bkgt1, 1.0)
    o_btkgd = jnp.transpose(o_bkgtd, (0, 3, 1, 2, 4))
    return o_btkgd.reshape(batch, seq_len, num_heads, head_dim).astype(q_bthd.dtype)


def _prefill_kernel(slots_ref, starts_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, *, scale, block_q, block_k):
    """q_ref, o_ref [T, D] (row b, query head h); k_ref, v_ref [S, L, D] (every slot, kv head h // G). The
    program owns new tokens i*block_q .. i*block_q + block_q - 1 of the row."""
    seq_len, head_dim = q_ref.shape
    num_slots, max_len = k_ref.shape[:2]
    b = pl.program_id(0)
    # The last query blocks see the most keys: run them first, so the short ones fill the tail of the grid.
    i = pl.cdiv(seq_len, block_q) - 1 - pl.program_id(2)
    # Clipped as XLA's indexing would: a bad slot or start must not send the loads outside the cache.
    slot = jnp.clip(slots_ref[b], 0, num_slots - 1)
    start = jnp.clip(starts_ref[b], 0, max_len)
    length = jnp.clip(lengths_ref[b], 0, jnp.minimum(seq_len, max_len - start))
    first = i * block_q
    pos_q = first + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    real_q = pos_q < length
    has_queries = first < length
    # One past the last position a real query of the block sees; a block of padding queries reads nothing.
    hi = start + jnp.minimum(first + block_q, length)
    num_blocks = jnp.where(has_queries, pl.cdiv(hi, block_k), 0)
    # Blocks ending at or before the first query's own position hold only keys every query sees, all written.
    num_full = jnp.where(has_queries, lax.div(start + first + 1, block_k), 0)
    # Both dot operands in the cache's dtype (bf16 tensor cores for a bf16 cache), accumulation in fp32.
    # Padding queries load zeros (past T there is no q to read); their outputs are zeroed below.
    q_qd = plgpu.load(q_ref.at[pl.ds(first, block_q), :], mask=real_q[:, None], other=0.0).astype(k_ref.dtype)
    offsets_k = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def full_block(j, carry):
        keys = pl.ds(j * block_k, block_k)
        k_kd = plgpu.load(k_ref.at[slot, keys, :])
        v_kd = plgpu.load(v_ref.at[slot, keys, :])
        return flash_step(carry, q_qd, k_kd, v_kd, scale=scale)

    def diagonal_block(j, carry):
        pos_k = j * block_k + offsets_k
        keys = pl.ds(j * block_k, block_k)
        # Masked loads: positions from hi on are neither read (they may be past L, or NaN) nor used.
        valid_k = pos_k < hi
        k_kd = plgpu.load(k_ref.at[slot, keys, :], mask=valid_k[:, None], other=0.0)
        v_kd = plgpu.load(v_ref.at[slot, keys, :], mask=valid_k[:, None], other=0.0)
        sees_qk = (pos_k[None, :] <= start + pos_q[:, None]) & valid_k[None, :]
        return flash_step(carry, q_qd, k_kd, v_kd, scale=scale, mask_mk=sees_qk)

    # Every query sees position 0, in the first block whichever loop runs it, so each row's running max is
    # finite from the first block on, and a row that sees nothing of a later diagonal block adds exp(-inf) = 0.
    carry = lax.fori_loop(0, num_full, full_block, flash_init(block_q, head_dim))
    o_qd, _, l_q = lax.fori_loop(num_full, num_blocks, diagonal_block, carry)
    o_qd = o_qd / jnp.where(l_q > 0, l_q, 1.0)[:, None]
    # Padding queries (and a block with no real query, which ran no loop) write zeros: every output is written.
    o_qd = jnp.where(real_q[:, None], o_qd, 0.0)
    plgpu.store(o_ref.at[pl.ds(first, block_q), :], o_qd.astype(o_ref.dtype), mask=(pos_q < seq_len)[:, None])


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "block_k", "num_warps", "num_stages", "interpret"))
def prefill_attention_pallas(
    q_bthd: jax.Array,
    k_cache_sltd: jax.Array,
    v_cache_sltd: jax.Array,
    slots_b: jax.Array,
    starts_b: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    block_q: int,
    block_k: int,
    num_warps: int = 8,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """The kernel; shapes as `prefill_attention`, tiling explicit."""
    batch, seq_len, num_heads, head_dim = q_bthd.shape
    num_slots, max_len, num_kv_heads, _ = k_cache_sltd.shape
    group = num_heads // num_kv_heads
    kernel = functools.partial(_prefill_kernel, scale=scale, block_q=block_q, block_k=block_k)
    whole = pl.BlockSpec(memory_space=None)
    # Row b, query head h, all T tokens as one block: only a ref, the kernel loads its block_q rows.
    q_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, h, i: (b, 0, h, 0))
    # Every slot and all L positions of kv head h // G as one block: the kernel picks the slot and positions.
    cache_spec = pl.BlockSpec((num_slots, max_len, None, head_dim), lambda b, h, i: (0, 0, lax.div(h, group), 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, num_heads, pl.cdiv(seq_len, block_q)),
        in_specs=[whole, whole, whole, q_spec, cache_spec, cache_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_bthd.shape, q_bthd.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="prefill_attention",
    )(slots_b.astype(jnp.int32), starts_b.astype(jnp.int32), lengths_b.astype(jnp.int32),
      q_bthd, k_cache_sltd, v_cache_sltd)


def prefill_attention(
    q_bthd: jax.Array,
    k_cache_sltd: jax.Array,
    v_cache_sltd: jax.Array,
    slots_b: jax.Array,
    starts_b: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float | None = None,
    impl: Impl = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Causal attention of new tokens over their slot of the cache, the cached prefix included.

    q [B, T, H, D] (rotary applied): row b's token t sits at cache position starts[b] + t, for t < lengths[b];
    later t are padding. k/v cache [S, L, KV, D] with H a multiple of KV, the new tokens' keys and values
    already written. slots, starts, lengths [B] int32: row b reads slot slots[b] (any slot, any order), and
    query t attends to positions j <= starts[b] + t. Only slots[b] and positions [0, starts[b] + lengths[b])
    are read; positions past them may hold anything, NaN included. Returns [B, T, H, D] in q's dtype, zeros
    for padding queries (so a row of length 0 gives zeros); softmax in fp32, scale D**-0.5 unless given.

    impl: "auto" = the kernel when the default backend is GPU and D suits it, the reference otherwise;
    "reference", "pallas" (compiled kernel), "interpret" (kernel in the Pallas interpreter).
    Tiling (kernel only; None = `default_tiling`, 2 stages): block_q queries per program, block_k keys per
    loop step (powers of two >= 16), num_warps, num_stages (Triton's pipelining of the key loop).
    """
    batch, _, num_heads, head_dim = q_bthd.shape
    num_kv_heads = k_cache_sltd.shape[2]
    impl = resolve_impl(impl, num_heads, num_kv_heads, head_dim)
    for name, x in (("slots", slots_b), ("starts", starts_b), ("lengths", lengths_b)):
        if jnp.shape(x) != (batch,):
            raise ValueError(f"{name} must have shape ({batch},) for a batch of {batch}, got {jnp.shape(x)}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    if impl == "reference":
        return prefill_attention_ref(q_bthd, k_cache_sltd, v_cache_sltd, slots_b, starts_b, lengths_b, scale=scale)
    default_q, default_k, default_warps = default_tiling(head_dim, jnp.dtype(k_cache_sltd.dtype).itemsize)
    block_q = default_q if block_q is None else block_q
    block_k = default_k if block_k is None else block_k
    check_tile("block_q", block_q)
    check_tile("block_k", block_k)
    return prefill_attention_pallas(
        q_bthd, k_cache_sltd, v_cache_sltd, slots_b, starts_b, lengths_b,
        scale=scale,
        block_q=block_q,
        block_k=block_k,
        num_warps=default_warps if num_warps is None else num_warps,
        num_stages=2 if num_stages is None else num_stages,
        interpret=impl == "interpret",
    )
