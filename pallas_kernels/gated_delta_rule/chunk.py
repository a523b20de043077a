"""Pallas chunked (WY/UT) gated delta rule for prefill: two kernels.

1. `_prep_kernel`, grid (B, Hv, chunks), fully parallel: per 64-token chunk it L2-normalises q/k, takes the
   cumulative log-decay G, and solves the chunk's unit-lower-triangular system (I + A) once, writing
   W = (I + A)^-1 (beta exp(G) k), U = (I + A)^-1 (beta v), the masked intra-chunk scores
   tril(q k^T exp(G_i - G_j)), G, and per-row factors that turn raw q/k rows into normalised, decayed ones
   (so the serial scan does no row reductions or exponentials). The inverse comes from the nilpotent product
   (I + A)^-1 = (I - A)(I + A^2)(I + A^4)...(I + A^32): ten 64x64 matrix products on the tensor cores
   instead of a 64-step serial substitution.
2. `_scan_kernel`, grid (B, Hv, Dv / block_v): walks the chunks in order with the [Dk, block_v] state tile in
   registers (Dv tiles are independent, and narrow ones give B=1 enough programs to fill the GPU):
   v_new = U - W S, o = (q exp(G)) S + scores v_new, S <- exp(G_C) S + (k exp(G_C - G))^T v_new.
   The state is read once from the (aliased) initial state and written once.

bf16 inputs run their large products with bf16 operands and fp32 accumulation, as FLA does; fp32 inputs use
full-precision products so the interpreter and GPU tests can hold 1e-5. Lowered through Triton on GPU.
Measured on an H100 against FLA: bench/KERNELS_NOTES.md.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gated_delta_rule.reference import L2NORM_EPS

CHUNK = 64


def _dot(a, b, *, low_precision: bool, contract_a: int = 1, contract_b: int = 0):
    """fp32-accumulated product; bf16 operands on the fast path, IEEE fp32 otherwise."""
    if low_precision:
        a, b, precision = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), lax.Precision.DEFAULT
    else:
        precision = lax.Precision.HIGHEST
    dims = (((contract_a,), (contract_b,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _masked_rows(ref, rows, valid_c):
    """Rows of q/k/v in fp32 with pad rows zeroed by `where`, so whatever they hold (even NaN) stays out."""
    return jnp.where(valid_c[:, None], ref[rows, :].astype(jnp.float32), 0.0)


def _inverse_norm(x_ck, use_qk_l2norm):
    if not use_qk_l2norm:
        return jnp.ones((x_ck.shape[0],), jnp.float32)
    return lax.rsqrt(jnp.sum(x_ck * x_ck, axis=1) + L2NORM_EPS)


def _unit_lower_inverse(a_cc, low_precision):
    """(I + A)^-1 for strictly lower A: A is nilpotent (A^C = 0), so the series sum_n (-A)^n is finite and
    factors into log2(C) doublings, (I - A)(I + A^2)(I + A^4)... Entries of A are bounded by 1 (unit keys,
    beta <= 1, decays <= 1). On the bf16 path the products take bf16 operands: the inverse is rounded to bf16
    for W and U anyway, and on random Qwen3.5-sized inputs the output error did not move (4.29e-3 both ways,
    CPU interpreter), while the ten products cost half of what tf32 ones do."""
    chunk = a_cc.shape[0]
    rows, cols = lax.broadcasted_iota(jnp.int32, a_cc.shape, 0), lax.broadcasted_iota(jnp.int32, a_cc.shape, 1)
    inverse_cc, power_cc = jnp.where(rows == cols, 1.0, 0.0) - a_cc, a_cc
    for _ in range(int(math.log2(chunk)) - 1):
        power_cc = _dot(power_cc, power_cc, low_precision=low_precision)
        inverse_cc = inverse_cc + _dot(inverse_cc, power_cc, low_precision=low_precision)
    return inverse_cc


def _prep_kernel(
    lengths_ref, q_ref, k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, scores_ref, gcum_ref, q_scale_ref, k_scale_ref,
    *, scale, use_qk_l2norm, low_precision,
):
    b, c = pl.program_id(0), pl.program_id(2)
    chunk = q_ref.shape[0]
    t_c = c * chunk + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    valid_c = t_c < lengths_ref[b]
    q_ck, k_ck = _masked_rows(q_ref, slice(None), valid_c), _masked_rows(k_ref, slice(None), valid_c)
    q_inv_c, k_inv_c = _inverse_norm(q_ck, use_qk_l2norm), _inverse_norm(k_ck, use_qk_l2norm)
    q_ck, k_ck = q_ck * (q_inv_c * scale)[:, None], k_ck * k_inv_c[:, None]
    v_cv = _masked_rows(v_ref, slice(None), valid_c)
    # g = beta = 0 on padding: the pad rows of W, U and the scores come out exactly 0.
    g_c = jnp.where(valid_c, g_ref[...].astype(jnp.float32), 0.0)
    beta_c = jnp.where(valid_c, beta_ref[...].astype(jnp.float32), 0.0)
    gcum_c = jnp.cumsum(g_c)
    glast = jnp.sum(jnp.where(t_c == c * chunk + chunk - 1, gcum_c, 0.0))

    i_cc = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j_cc = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    # Masked before exp: G_i - G_j <= 0 for i >= j, so no overflow; the upper half is discarded.
    decay_cc = jnp.exp(jnp.where(i_cc >= j_cc, gcum_c[:, None] - gcum_c[None, :], 0.0))
    dot = functools.partial(_dot, low_precision=low_precision)
    kk_cc = dot(k_ck, k_ck, contract_b=1)
    a_cc = jnp.where(i_cc > j_cc, beta_c[:, None] * kk_cc * decay_cc, 0.0)
    scores_cc = jnp.where(i_cc >= j_cc, dot(q_ck, k_ck, contract_b=1) * decay_cc, 0.0)
    inverse_cc = _unit_lower_inverse(a_cc, low_precision)

    w_ref[...] = dot(inverse_cc, k_ck * (beta_c * jnp.exp(gcum_c))[:, None]).astype(w_ref.dtype)
    u_ref[...] = dot(inverse_cc, v_cv * beta_c[:, None]).astype(u_ref.dtype)
    scores_ref[...] = scores_cc.astype(scores_ref.dtype)
    gcum_ref[...] = gcum_c
    # Per-row factors that turn raw q/k rows into the decayed, normalised rows the scan multiplies with:
    # the scan then needs no row reductions or exponentials on its serial path.
    q_scale_ref[...] = q_inv_c * scale * jnp.exp(gcum_c)
    k_scale_ref[...] = k_inv_c * jnp.exp(glast - gcum_c)


def _scan_kernel(
    lengths_ref, q_ref, k_ref, w_ref, u_ref, scores_ref, gcum_ref, q_scale_ref, k_scale_ref, state_in_ref,
    o_ref, state_ref, *, low_precision, chunk,
):
    length = lengths_ref[pl.program_id(0)]
    dot = functools.partial(_dot, low_precision=low_precision)

    def one_chunk(c, s_kv):
        start = pl.multiple_of(c * chunk, chunk)
        rows = pl.ds(start, chunk)
        valid_c = start + lax.broadcasted_iota(jnp.int32, (chunk,), 0) < length
        q_ck = _masked_rows(q_ref, rows, valid_c) * q_scale_ref[rows][:, None]
        k_ck = _masked_rows(k_ref, rows, valid_c) * k_scale_ref[rows][:, None]
        vnew_cv = u_ref[rows, :].astype(jnp.float32) - dot(w_ref[rows, :], s_kv)
        o_cv = dot(q_ck, s_kv) + dot(scores_ref[rows, :], vnew_cv)
        o_ref[rows, :] = o_cv.astype(o_ref.dtype)
        return s_kv * jnp.exp(gcum_ref[start + chunk - 1]) + dot(k_ck, vnew_cv, contract_a=0)

    num_chunks = q_ref.shape[0] // chunk
    state_ref[...] = lax.fori_loop(0, num_chunks, one_chunk, state_in_ref[...])


@functools.partial(jax.jit, static_argnames=("scale", "use_qk_l2norm", "num_warps", "interpret"))
def chunk_prep(
    q_btk: jax.Array,
    k_btk: jax.Array,
    v_btv: jax.Array,
    g_bth: jax.Array,
    beta_bth: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """The parallel stage on whole chunks (T a multiple of 64): W [B, Hv, T, Dk], U [B, Hv, T, Dv],
    scores [B, Hv, T, 64] (bf16 for bf16 inputs, else fp32), and fp32 [B, Hv, T] G, q row scales, k row scales."""
    batch, padded_len, num_k_heads, head_k = q_btk.shape
    num_v_heads, head_v = v_btv.shape[2:]
    group = num_v_heads // num_k_heads
    low_precision = v_btv.dtype == jnp.bfloat16
    inter_dtype = jnp.bfloat16 if low_precision else jnp.float32
    qk_chunk = pl.BlockSpec((None, CHUNK, None, head_k), lambda b, h, c: (b, c, h // group, 0))
    gate_chunk = pl.BlockSpec((None, CHUNK, None), lambda b, h, c: (b, c, h))
    per_head = lambda width: pl.BlockSpec((None, None, CHUNK, width), lambda b, h, c: (b, h, c, 0))
    row_spec = pl.BlockSpec((None, None, CHUNK), lambda b, h, c: (b, h, c))
    per_head_shape = lambda width, dtype: jax.ShapeDtypeStruct((batch, num_v_heads, padded_len, width), dtype)
    kernel = functools.partial(_prep_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm, low_precision=low_precision)
    return pl.pallas_call(
        kernel,
        grid=(batch, num_v_heads, padded_len // CHUNK),
        in_specs=[
            pl.BlockSpec(memory_space=None), qk_chunk, qk_chunk,
            pl.BlockSpec((None, CHUNK, None, head_v), lambda b, h, c: (b, c, h, 0)), gate_chunk, gate_chunk,
        ],
        out_specs=[
            per_head(head_k), per_head(head_v), per_head(CHUNK), *[row_spec] * 3,
        ],
        out_shape=[
            per_head_shape(head_k, inter_dtype), per_head_shape(head_v, inter_dtype),
            per_head_shape(CHUNK, inter_dtype), *[jax.ShapeDtypeStruct((batch, num_v_heads, padded_len), jnp.float32)] * 3,
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdr_chunk_prep",
    )(lengths_b, q_btk, k_btk, v_btv, g_bth, beta_bth)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "use_qk_l2norm", "block_v", "num_warps", "num_stages", "prep_warps", "interpret"),
)
def chunk_prefill(
    q_btk: jax.Array,
    k_btk: jax.Array,
    v_btv: jax.Array,
    g_bth: jax.Array,
    beta_bth: jax.Array,
    state_bhkv: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    block_v: int = 32,
    num_warps: int = 4,
    num_stages: int = 2,
    prep_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q/k [B, T, Hk, Dk], v [B, T, Hv, Dv], g/beta [B, T, Hv], state [B, Hv, Dk, Dv] fp32 (aliased to the
    returned state), lengths [B]. Returns (o [B, T, Hv, Dv] v.dtype, final state).
    block_v, num_warps, num_stages tune the sequential scan, prep_warps the parallel stage."""
    batch, seq_len, num_k_heads, head_k = q_btk.shape
    num_v_heads, head_v = v_btv.shape[2:]
    group = num_v_heads // num_k_heads
    block_v = min(block_v, head_v)
    pad = -seq_len % CHUNK
    if pad:  # whole chunks only; the pad tokens sit past every row's length, so they are neutral
        q_btk, k_btk, v_btv = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_btk, k_btk, v_btv))
        g_bth, beta_bth = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (g_bth, beta_bth))
    padded_len = seq_len + pad
    w, u, scores, gcum, q_scale, k_scale = chunk_prep(
        q_btk, k_btk, v_btv, g_bth, beta_bth, lengths_b,
        scale=scale, use_qk_l2norm=use_qk_l2norm, num_warps=prep_warps, interpret=interpret,
    )

    whole = pl.BlockSpec(memory_space=None)
    qk_all = pl.BlockSpec((None, padded_len, None, head_k), lambda b, h, j: (b, 0, h // group, 0))
    state_spec = pl.BlockSpec((None, None, head_k, block_v), lambda b, h, j: (b, h, 0, j))
    kernel = functools.partial(_scan_kernel, low_precision=v_btv.dtype == jnp.bfloat16, chunk=CHUNK)
    per_row = pl.BlockSpec((None, None, padded_len), lambda b, h, j: (b, h, 0))
    o_btv, state_bhkv = pl.pallas_call(
        kernel,
        grid=(batch, num_v_heads, head_v // block_v),
        in_specs=[
            whole, qk_all, qk_all,
            pl.BlockSpec((None, None, padded_len, head_k), lambda b, h, j: (b, h, 0, 0)),
            pl.BlockSpec((None, None, padded_len, block_v), lambda b, h, j: (b, h, 0, j)),
            pl.BlockSpec((None, None, padded_len, CHUNK), lambda b, h, j: (b, h, 0, 0)),
            per_row, per_row, per_row, state_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, padded_len, None, block_v), lambda b, h, j: (b, 0, h, j)),
            state_spec,
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, padded_len, num_v_heads, head_v), v_btv.dtype),
            jax.ShapeDtypeStruct(state_bhkv.shape, jnp.float32),
        ],
        input_output_aliases={9: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdr_chunk_scan",
    )(lengths_b, q_btk, k_btk, w, u, scores, gcum, q_scale, k_scale, state_bhkv)
    return o_btv[:, :seq_len], state_bhkv
