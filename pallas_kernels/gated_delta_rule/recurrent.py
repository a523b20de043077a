"""Pallas T=1 decode kernel for the gated delta rule: the state is read once and written back in place.

Grid (B, Hv, Dv / block_v): each program owns a [Dk, block_v] fp32 tile of one head's state, which is all
the arithmetic needs (the update and the read-out are column-wise in Dv), so no program waits on another.
Many narrow tiles fill the SMs at small batch; the decode step is a pure state stream at large batch.
The q/k L2-norm, the scale and the gates are fused in. Lowered through Triton on GPU (Pallas' default GPU
backend), or run by the Pallas interpreter on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.device_info import multiprocessors
from pallas_kernels.gated_delta_rule.reference import L2NORM_EPS


def _normalise(x_k, use_qk_l2norm):
    x_k = x_k.astype(jnp.float32)
    if use_qk_l2norm:
        x_k = x_k * lax.rsqrt(jnp.sum(x_k * x_k) + L2NORM_EPS)
    return x_k


def decode_tile(read_state, q_k, k_k, v_v, g, beta, valid, *, scale, use_qk_l2norm):
    """One head's [Dk, block_v] state tile advanced by one token: (new state tile fp32, output tile fp32).
    read_state() reads the tile; it is called after the q/k norms, so a caller that wants the state read
    issued first reads it before and passes `lambda: tile`."""
    q_k = _normalise(q_k, use_qk_l2norm) * scale
    k_k = _normalise(k_k, use_qk_l2norm)
    # A padded row must leave the state bit-identical, so gate with `where`: NaN/inf in pad slots stays out.
    decay = jnp.where(valid, jnp.exp(g.astype(jnp.float32)), 1.0)
    s_kv = read_state() * decay
    predicted_v = jnp.sum(s_kv * k_k[:, None], axis=0)
    delta_v = jnp.where(valid, (v_v.astype(jnp.float32) - predicted_v) * beta.astype(jnp.float32), 0.0)
    s_kv = s_kv + k_k[:, None] * delta_v[None, :]
    return s_kv, jnp.where(valid, jnp.sum(s_kv * q_k[:, None], axis=0), 0.0)


def _decode_kernel(
    lengths_ref, g_ref, beta_ref, q_ref, k_ref, v_ref, state_in_ref, o_ref, state_ref,
    *, scale, use_qk_l2norm, state_first,
):
    b, h = pl.program_id(0), pl.program_id(1)
    valid, q_k, k_k, g, beta = lengths_ref[b] > 0, q_ref[...], k_ref[...], g_ref[b, h], beta_ref[b, h]
    # state_in_ref is the same buffer as state_ref on GPU (aliased).
    if state_first:
        state_kv = state_in_ref[...]
        read_state = lambda: state_kv
    else:
        read_state = lambda: state_in_ref[...]
    s_kv, o_v = decode_tile(read_state, q_k, k_k, v_ref[...], g, beta, valid,
                            scale=scale, use_qk_l2norm=use_qk_l2norm)
    state_ref[...] = s_kv
    o_ref[...] = o_v.astype(o_ref.dtype)


def state_read_first(num_programs: int) -> bool:
    """Whether each program issues its state read before the q/k norms. Measured on H200s (bf16, Qwen3.5
    heads, 64-wide tiles; bench/NOTES.md item 13): at B8 (4 programs per SM, one wave) reading it
    after was faster in three runs out of three (4-18%); at B256 (124 per SM) reading it first was 2.6%
    faster; at B64 (31 per SM) the two orders differed by less than the run-to-run spread. B16-B32 not
    measured: the switch sits at 8 programs per SM."""
    return num_programs > 8 * multiprocessors()


def state_tiles(batch: int, num_v_heads: int, head_v: int, block_v: int | None) -> tuple[int, tuple[int, int, int]]:
    """(block_v, grid (B, Hv, Dv / block_v)): one program per [Dk, block_v] state tile. None picks 64-wide tiles
    (measured best once the state streams from HBM, B >= 8 on an H100) unless that leaves fewer than 256
    programs, then 32."""
    if block_v is None:
        block_v = 64 if batch * num_v_heads * head_v // 64 >= 256 else 32
    block_v = min(block_v, head_v)
    return block_v, (batch, num_v_heads, head_v // block_v)


@functools.partial(
    jax.jit, static_argnames=("scale", "use_qk_l2norm", "block_v", "num_warps", "state_first", "interpret")
)
def recurrent_decode(
    q_bhk: jax.Array,
    k_bhk: jax.Array,
    v_bhv: jax.Array,
    g_bh: jax.Array,
    beta_bh: jax.Array,
    state_bhkv: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    block_v: int | None = None,
    num_warps: int = 4,
    state_first: bool | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One decode step. q/k [B, Hk, Dk], v [B, Hv, Dv], g/beta [B, Hv], state [B, Hv, Dk, Dv] fp32 (aliased
    to the returned state: donate it at the jit boundary for a true in-place update), lengths [B] (0 = pad).
    block_v None: `state_tiles` picks. state_first None picks by `state_read_first`.
    """
    batch, num_v_heads, head_v = v_bhv.shape
    num_k_heads, head_k = q_bhk.shape[1:]
    group = num_v_heads // num_k_heads
    block_v, grid = state_tiles(batch, num_v_heads, head_v, block_v)
    if state_first is None:
        state_first = state_read_first(math.prod(grid))
    kernel = functools.partial(_decode_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm, state_first=state_first)
    whole = pl.BlockSpec(memory_space=None)
    qk_spec = pl.BlockSpec((None, None, head_k), lambda b, h, j: (b, h // group, 0))
    v_spec = pl.BlockSpec((None, None, block_v), lambda b, h, j: (b, h, j))
    state_spec = pl.BlockSpec((None, None, head_k, block_v), lambda b, h, j: (b, h, 0, j))
    o_bhv, state_bhkv = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole, whole, whole, qk_spec, qk_spec, v_spec, state_spec],
        out_specs=[v_spec, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct(v_bhv.shape, v_bhv.dtype),
            jax.ShapeDtypeStruct(state_bhkv.shape, jnp.float32),
        ],
        input_output_aliases={6: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdr_recurrent_decode",
    )(lengths_b, g_bh, beta_bh, q_bhk, k_bhk, v_bhv, state_bhkv)
    return o_bhv, state_bhkv


def _tokens_kernel(lengths_ref, g_ref, beta_ref, q_ref, k_ref, v_ref, state_in_ref, *out_refs, scale,
                   use_qk_l2norm, tokens, group, outputs, advance):
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    block_v = state_in_ref.shape[-1]
    cols = pl.ds(pl.multiple_of(j * block_v, block_v), block_v)
    s_kv = state_in_ref[...]
    # A few tokens (a speculative verify pass): unrolled, the state tile stays in registers. The token rows are
    # indexed in the whole arrays (T is not a power of two: no block may span it).
    for t in range(tokens):
        tile = s_kv
        s_kv, o_v = decode_tile(lambda: tile, q_ref[b, t, h // group, :], k_ref[b, t, h // group, :],
                                v_ref[b, t, h, cols], g_ref[b, t, h], beta_ref[b, t, h], t < lengths_ref[b],
                                scale=scale, use_qk_l2norm=use_qk_l2norm)
        if outputs:
            out_refs[0][b, t, h, cols] = o_v.astype(out_refs[0].dtype)
    if advance:
        out_refs[-1][...] = s_kv


@functools.partial(jax.jit, static_argnames=("scale", "use_qk_l2norm", "advance", "outputs", "block_v", "num_warps",
                                             "interpret"))
def recurrent_tokens(
    q_bthk: jax.Array,
    k_bthk: jax.Array,
    v_bthv: jax.Array,
    g_bth: jax.Array,
    beta_bth: jax.Array,
    state_shkv: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    advance: bool,
    outputs: bool,
    block_v: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array | None, jax.Array | None]:
    """T tokens per row (T small) from slot b of the state pool [S >= B, Hv, Dk, Dv] fp32, the first lengths[b]
    of them applied. Returns (o [B, T, Hv, Dv] if ``outputs``, the pool with rows [0, B) advanced if ``advance``:
    aliased to the input pool, so a donated pool is updated in place). Each program reads its state tile once."""
    batch, tokens, num_v_heads, head_v = v_bthv.shape
    num_k_heads, head_k = q_bthk.shape[2:]
    group = num_v_heads // num_k_heads
    block_v, grid = state_tiles(batch, num_v_heads, head_v, block_v)
    kernel = functools.partial(_tokens_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm, tokens=tokens,
                               group=group, outputs=outputs, advance=advance)
    whole = pl.BlockSpec(memory_space=None)
    state_spec = pl.BlockSpec((None, None, head_k, block_v), lambda b, h, j: (b, h, 0, j))
    out_specs, out_shape = [], []
    if outputs:
        out_specs.append(whole)
        out_shape.append(jax.ShapeDtypeStruct(v_bthv.shape, v_bthv.dtype))
    if advance:
        out_specs.append(state_spec)
        out_shape.append(jax.ShapeDtypeStruct(state_shkv.shape, jnp.float32))
    results = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole, whole, whole, whole, whole, whole, state_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={6: len(out_shape) - 1} if advance else {},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdr_recurrent_tokens",
    )(lengths_b, g_bth, beta_bth, q_bthk, k_bthk, v_bthv, state_shkv)
    return (results[0] if outputs else None), (results[-1] if advance else None)
