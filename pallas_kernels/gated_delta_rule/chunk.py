"""Pallas chunked (WY/UT) gated delta rule for prefill: two kernels.

1. `_prep_kernel`, grid (B, Hv / heads, chunks), fully parallel: per 64-token chunk it L2-normalises q/k and
   forms q k^T, k k^T once for the value heads that share a key head; per value head it takes the
   cumulative log-decay G, and inverts the chunk's unit-lower-triangular system, T = (I + A)^-1 with
   A = tril(diag(beta) k k^T exp(G_i - G_j), -1), writing T, the masked intra-chunk scores
   P = tril(q k^T exp(G_i - G_j)), G, and per-row factors that turn raw q/k/v rows into normalised,
   decayed, beta-weighted ones (so the serial scan does no row reductions or exponentials). The inverse is
   blocked in two 32-row halves, each half's from the nilpotent product (I + A)^-1 = (I - A)(I + A^2)...,
   i.e. matrix products on the tensor cores instead of a 64-step serial substitution.
2. `_scan_kernel`, grid (B, Hv, Dv / block_v): walks the chunks in order with the [Dk, block_v] state tile in
   registers (Dv tiles are independent, and narrow ones give B=1 enough programs to fill the GPU):
   r = diag(beta) (v - diag(exp(G)) k S), v_new = T r, o = (q exp(G)) S + P v_new,
   S <- exp(G_C) S + (k exp(G_C - G))^T v_new. W = T diag(beta exp(G)) k and U = T diag(beta) v are never
   stored: the scan reads raw q, k, v and the two 64-wide matrices. The state is read once from the
   (aliased) initial state and written once. The step is latency-bound (a chain of dependent products per
   chunk), so nothing else may sit on it: chunks wholly inside the row's length skip the pad masking, and
   the row factors are read one chunk ahead.

bf16 inputs run their large products with bf16 operands and fp32 accumulation, as FLA does; fp32 inputs use
full-precision products so the interpreter and GPU tests can hold 1e-5. Lowered through Triton on GPU; where
the 32-wide scan programs would share SMs, the scan of bf16 inputs is `chunk_scan_mosaic`'s instead (Pallas'
Mosaic GPU backend, faster there, `_mosaic_scan_faster`; a Mosaic GPU prep was slower than the Triton one,
item 17). Measured on an H100 and an H200 against FLA, with the variants tried: bench/NOTES.md.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.device_info import multiprocessors
from pallas_kernels.gated_delta_rule.chunk_scan_mosaic import mosaic_chunk_scan, mosaic_scan_supports
from pallas_kernels.gated_delta_rule.reference import L2NORM_EPS

CHUNK = 64


HALF = CHUNK // 2


def _scan_programs(batch: int, num_v_heads: int, head_v: int, width: int) -> int:
    """Programs of the scan's grid: one per (row, value head, v tile of `width` columns)."""
    return batch * num_v_heads * -(-head_v // width)


def _wide_grid(batch: int, num_v_heads: int, head_v: int) -> bool:
    """More than two waves of 32-wide scan programs: every SM is busy, and what counts is the work each program
    repeats for its tile rather than its serial chain. There 64-wide tiles win on Triton (bench/NOTES.md
    item 10); below it 32-wide ones do."""
    return _scan_programs(batch, num_v_heads, head_v, 32) > 2 * multiprocessors()


def _mosaic_scan_faster(batch: int, num_v_heads: int, head_v: int, padded_len: int) -> bool:
    """Where the Mosaic scan (64-wide programs, one per SM) measured faster than the Triton one on an H200
    (bench/NOTES.md items 16 and 18): past two waves of 32-wide programs, and past one wave where rows
    hold 64 chunks or more. While the 32-wide programs fit one per SM, the Triton scan's shorter chunk step
    wins (B1xT16384 583 vs 741 us at Qwen3.5's heads); past that the Triton programs share SMs, and the
    Mosaic ones win from 4096 tokens a row (B2xT8192 545 vs 471 us, B2xT4096 299 vs 240) but not at 2048
    (115 vs 134)."""
    past_one_wave = _scan_programs(batch, num_v_heads, head_v, 32) > multiprocessors()
    return _wide_grid(batch, num_v_heads, head_v) or (past_one_wave and padded_len >= 64 * CHUNK)


def _scan_backend(scan, qk_dtype, v_dtype, batch, num_v_heads, head_k, head_v, padded_len) -> str:
    """The caller's scan ("triton" or "mosaic") checked, or for None the faster one measured on an H200: Mosaic
    for bf16 inputs it supports where `_mosaic_scan_faster`, Triton otherwise."""
    mosaic_fits = qk_dtype == v_dtype and mosaic_scan_supports(v_dtype, head_k, head_v, CHUNK)
    if scan is None:
        return "mosaic" if mosaic_fits and _mosaic_scan_faster(batch, num_v_heads, head_v, padded_len) else "triton"
    if scan not in ("triton", "mosaic"):
        raise ValueError(f"scan must be triton, mosaic or None, got {scan!r}")
    if scan == "mosaic" and not mosaic_fits:
        raise ValueError(f"the Mosaic GPU scan needs bf16 q, k, v and head sizes in 64s that fit shared memory, "
                         f"got {qk_dtype}/{v_dtype}, Dk={head_k}, Dv={head_v}")
    return scan


def _scan_tiling(batch, num_v_heads, head_k, head_v, itemsize, block_v, num_stages) -> tuple[int, int]:
    """(block_v, num_stages) for the scan where the caller leaves them None; measured on an H100
    (bench/NOTES.md, fifth session). Up to two waves of 32-wide programs, each program's serial chain
    is what counts, and more, narrower programs win (at B2xT8192, 356 us vs 398 us with 64-wide tiles). Past
    two waves every SM is busy anyway and what counts is the work each program repeats for its tile (reading
    q, k, T and the scores, applying the row factors): 64-wide tiles halve it, 13-23% faster from B3xT4096 to
    B32xT1024. Three stages (deeper prefetch of the next chunks) while the programs fit the SMs at once or
    when tiles are 64 wide; two for 32-wide tiles past one wave (three lost 9-10% there, plausibly because two
    2-stage 32-wide programs share an SM's shared memory and three stages do not)."""
    # The H100's 227 KiB of shared memory per SM, less room for the compiler's own use.
    shared_budget = 192 * 1024

    def stage_bytes(width):  # one chunk of q, k, the v tile and the two 64-wide matrices
        return itemsize * CHUNK * (2 * head_k + width + 2 * CHUNK)

    if block_v is None:
        wide_fits = head_v % 64 == 0 and 2 * stage_bytes(64) <= shared_budget
        block_v = 64 if _wide_grid(batch, num_v_heads, head_v) and wide_fits else 32
    block_v = min(block_v, head_v)
    if num_stages is None:
        deep = _scan_programs(batch, num_v_heads, head_v, block_v) <= multiprocessors() or block_v >= 64
        num_stages = 3 if deep and 3 * stage_bytes(block_v) <= shared_budget else 2
    return block_v, num_stages


def _dot(a, b, *, low_precision: bool, contract_a: int = 1, contract_b: int = 0):
    """fp32-accumulated product; bf16 operands on the fast path, IEEE fp32 otherwise."""
    if low_precision:
        a, b, precision = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), lax.Precision.DEFAULT
    else:
        precision = lax.Precision.HIGHEST
    dims = (((contract_a,), (contract_b,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _masked(x, valid_rows):
    """Pad rows zeroed by `where` (in the input's dtype), so whatever they hold (even NaN) stays out."""
    return jnp.where(valid_rows[:, None], x, jnp.zeros((), x.dtype))


def _inverse_norm(x_ck, use_qk_l2norm):
    if not use_qk_l2norm:
        return jnp.ones((x_ck.shape[0],), jnp.float32)
    return lax.rsqrt(jnp.sum(x_ck * x_ck, axis=1) + L2NORM_EPS)


def _unit_lower_inverse(a_nn, low_precision):
    """(I + A)^-1 for strictly lower A: A is nilpotent (A^n = 0), so the series sum_i (-A)^i is finite and
    factors into log2(n) doublings, (I - A)(I + A^2)(I + A^4)... Entries of A are bounded by 1 (unit keys,
    beta <= 1, decays <= 1). On the bf16 path the products take bf16 operands, as the inverse is rounded to
    bf16 where it is used anyway."""
    size = a_nn.shape[0]
    rows, cols = lax.broadcasted_iota(jnp.int32, a_nn.shape, 0), lax.broadcasted_iota(jnp.int32, a_nn.shape, 1)
    inverse_nn, power_nn = jnp.where(rows == cols, 1.0, 0.0) - a_nn, a_nn
    for _ in range(int(math.log2(size)) - 1):
        power_nn = _dot(power_nn, power_nn, low_precision=low_precision)
        inverse_nn = inverse_nn + _dot(inverse_nn, power_nn, low_precision=low_precision)
    return inverse_nn


class _Half(NamedTuple):
    """32 rows of a chunk in the prep kernel: q, k L2-normalised (q also scaled), fp32."""

    rows: pl.Slice
    valid_n: jax.Array
    q_nk: jax.Array
    k_nk: jax.Array
    q_inv_n: jax.Array  # inverse L2 norms
    k_inv_n: jax.Array


def _prep_kernel(
    lengths_ref, q_ref, k_ref, g_ref, beta_ref,
    t_ref, scores_ref, gcum_ref, q_fac_ref, k_fac_ref, w_fac_ref, u_fac_ref,
    *, scale, use_qk_l2norm, low_precision,
):
    """One (row, group of value heads that read the same key head, chunk). q k^T and k k^T depend on the key
    head only, so the group forms them once (they are ~80% of the prep's products) and reads q, k once; each
    value head then applies its own gates and inverts its own system. The chunk is handled as two 32-row
    halves: the system (I + A) is block lower-triangular, so its inverse needs two 32x32 inverses and one
    off-diagonal block, X10 = -X11 A10 X00 (ten 32^3 products instead of ten 64^3 ones), and the upper-right
    blocks of the inverse and of the scores are zero by construction."""
    b, c = pl.program_id(0), pl.program_id(2)
    dot = functools.partial(_dot, low_precision=low_precision)
    halves = []
    for i in range(2):
        rows = pl.ds(i * HALF, HALF)
        t_n = c * CHUNK + i * HALF + lax.broadcasted_iota(jnp.int32, (HALF,), 0)
        valid_n = t_n < lengths_ref[b]
        q_nk = _masked(q_ref[rows, :], valid_n).astype(jnp.float32)
        k_nk = _masked(k_ref[rows, :], valid_n).astype(jnp.float32)
        q_inv_n, k_inv_n = _inverse_norm(q_nk, use_qk_l2norm), _inverse_norm(k_nk, use_qk_l2norm)
        halves.append(_Half(rows, valid_n, q_nk * (q_inv_n * scale)[:, None], k_nk * k_inv_n[:, None],
                            q_inv_n, k_inv_n))
    lower = [(0, 0), (1, 0), (1, 1)]
    kk = {(i, j): dot(halves[i].k_nk, halves[j].k_nk, contract_b=1) for i, j in lower}
    qk = {(i, j): dot(halves[i].q_nk, halves[j].k_nk, contract_b=1) for i, j in lower}

    i_nn = lax.broadcasted_iota(jnp.int32, (HALF, HALF), 0)
    j_nn = lax.broadcasted_iota(jnp.int32, (HALF, HALF), 1)
    zeros = jnp.zeros((HALF, HALF), t_ref.dtype)
    for head in range(t_ref.shape[0]):
        # g = beta = 0 on padding: pad rows of the system, the scores and the row factors come out neutral.
        g_before = jnp.float32(0.0)
        gcum, beta = [], []
        for h in halves:
            g_n = jnp.where(h.valid_n, g_ref[h.rows, head].astype(jnp.float32), 0.0)
            beta.append(jnp.where(h.valid_n, beta_ref[h.rows, head].astype(jnp.float32), 0.0))
            gcum.append(g_before + jnp.cumsum(g_n))
            g_before = g_before + jnp.sum(g_n)

        a, scores = {}, {}
        for i, j in lower:
            causal = i_nn >= j_nn if i == j else i_nn >= 0
            # Masked before exp: G_r - G_s <= 0 for r >= s, so no overflow; the masked part is discarded.
            decay_nn = jnp.exp(jnp.where(causal, gcum[i][:, None] - gcum[j][None, :], 0.0))
            strict = i_nn > j_nn if i == j else causal
            a[i, j] = jnp.where(strict, beta[i][:, None] * kk[i, j] * decay_nn, 0.0)
            scores[i, j] = jnp.where(causal, qk[i, j] * decay_nn, 0.0)

        x00 = _unit_lower_inverse(a[0, 0], low_precision)
        x11 = _unit_lower_inverse(a[1, 1], low_precision)
        inverse = {(0, 0): x00, (1, 0): -dot(x11, dot(a[1, 0], x00)), (1, 1): x11}
        for i, j in lower:
            t_ref[head, pl.ds(i * HALF, HALF), pl.ds(j * HALF, HALF)] = inverse[i, j].astype(t_ref.dtype)
            scores_ref[head, pl.ds(i * HALF, HALF), pl.ds(j * HALF, HALF)] = scores[i, j].astype(scores_ref.dtype)
        t_ref[head, pl.ds(0, HALF), pl.ds(HALF, HALF)] = zeros
        scores_ref[head, pl.ds(0, HALF), pl.ds(HALF, HALF)] = zeros

        # Row factors that let the scan multiply raw (unnormalised, undecayed) q, k, v rows: it then needs no
        # row reductions or exponentials on its serial path.
        for h, gcum_n, beta_n in zip(halves, gcum, beta):
            gcum_ref[head, h.rows] = gcum_n
            q_fac_ref[head, h.rows] = h.q_inv_n * scale * jnp.exp(gcum_n)
            k_fac_ref[head, h.rows] = h.k_inv_n * jnp.exp(g_before - gcum_n)
            w_fac_ref[head, h.rows] = beta_n * h.k_inv_n * jnp.exp(gcum_n)
            u_fac_ref[head, h.rows] = beta_n


def _scan_kernel(
    lengths_ref, q_ref, k_ref, v_ref, t_ref, scores_ref, gcum_ref, q_fac_ref, k_fac_ref, w_fac_ref, u_fac_ref,
    state_in_ref, o_ref, state_ref, *, low_precision, chunk,
):
    length = lengths_ref[pl.program_id(0)]
    dot = functools.partial(_dot, low_precision=low_precision)
    num_chunks = q_ref.shape[0] // chunk

    def row_factors(c):
        """The chunk's per-row factors and its state decay exp(G_C), read one chunk ahead and carried: read
        where they are used, their latency sat on the serial path (the G_C read's consumer alone held 18% of
        the scan's stall samples, per ncu)."""
        rows = pl.ds(c * chunk, chunk)
        return (q_fac_ref[rows], w_fac_ref[rows], u_fac_ref[rows], k_fac_ref[rows],
                jnp.exp(gcum_ref[c * chunk + chunk - 1]))

    def one_chunk(c, carry, *, masked):
        s_kv, (q_fac_c, w_fac_c, u_fac_c, k_fac_c, decay) = carry
        factors_next = row_factors(jnp.minimum(c + 1, num_chunks - 1))
        start = pl.multiple_of(c * chunk, chunk)
        rows = pl.ds(start, chunk)
        valid_c = (start + lax.broadcasted_iota(jnp.int32, (chunk,), 0) < length) if masked else None

        def load(ref):
            return _masked(ref[rows, :], valid_c) if masked else ref[rows, :]

        q_ck, k_ck, v_cv = load(q_ref), load(k_ref), load(v_ref).astype(jnp.float32)
        # v_new = T diag(beta) (v - diag(exp(G)) k_normalised S): the WY form with W and U never stored.
        residual_cv = u_fac_c[:, None] * v_cv - w_fac_c[:, None] * dot(k_ck, s_kv)
        vnew_cv = dot(t_ref[rows, :], residual_cv)
        o_cv = q_fac_c[:, None] * dot(q_ck, s_kv) + dot(scores_ref[rows, :], vnew_cv)
        o_ref[rows, :] = o_cv.astype(o_ref.dtype)
        return s_kv * decay + dot(k_ck, k_fac_c[:, None] * vnew_cv, contract_a=0), factors_next

    # Chunks wholly inside the row's length skip the masking: masked q, k tiles went through registers
    # (select, repack, store) on their way to the tensor cores, and waits on that path held ~18% of the
    # scan's stall samples (ncu; without it the scan took 512 instead of 628 us at B1xT16384). Only the
    # chunks from the first partial one on need it.
    full_chunks = jnp.minimum(length // chunk, num_chunks)
    carry = (state_in_ref[...], row_factors(0))
    carry = lax.fori_loop(0, full_chunks, functools.partial(one_chunk, masked=False), carry)
    state_ref[...], _ = lax.fori_loop(full_chunks, num_chunks, functools.partial(one_chunk, masked=True), carry)


def _prep_heads(batch: int, num_v_heads: int, group: int, num_chunks: int) -> int:
    """Value heads per prep program: a power of two (a Triton block size) dividing the group of value heads
    that read one key head, so the program's heads share their q, k and products. Sharing halves the grid,
    which pays only while the grid still fills the GPU; measured on an H200 (bench/NOTES.md, sixth
    session): two heads per program won by 5-8% from B1xT4096 (1024 programs) up and lost at B1xT512 (128
    programs: 34.7 vs 29.3 us). So the largest power of two that leaves four (two-warp) programs per SM."""
    heads = group & -group
    while heads > 1 and batch * (num_v_heads // heads) * num_chunks < 4 * multiprocessors():
        heads //= 2
    return heads


@functools.partial(jax.jit, static_argnames=("scale", "use_qk_l2norm", "heads_per_program", "num_warps", "interpret"))
def chunk_prep(
    q_btk: jax.Array,
    k_btk: jax.Array,
    g_bth: jax.Array,
    beta_bth: jax.Array,
    lengths_b: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    heads_per_program: int | None = None,
    num_warps: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """The parallel stage on whole chunks (T a multiple of 64): per chunk the inverse T = (I + A)^-1 and the
    masked scores, each [B, Hv, T, 64] (bf16 for bf16 inputs, else fp32), and fp32 [B, Hv, T] G and the q, k,
    w, u row factors. heads_per_program (a power of two dividing Hv / Hk) value heads of one key head share a
    program; None picks by the grid's size (`_prep_heads`)."""
    batch, padded_len, num_k_heads, head_k = q_btk.shape
    num_v_heads = g_bth.shape[2]
    group = num_v_heads // num_k_heads
    heads = heads_per_program
    if heads is None:
        heads = _prep_heads(batch, num_v_heads, group, padded_len // CHUNK)
    if group % heads or heads & (heads - 1):
        raise ValueError(f"heads_per_program must be a power of two dividing Hv / Hk = {group}, got {heads}")
    low_precision = q_btk.dtype == jnp.bfloat16
    inter_dtype = jnp.bfloat16 if low_precision else jnp.float32
    qk_chunk = pl.BlockSpec((None, CHUNK, None, head_k), lambda b, h, c: (b, c, h * heads // group, 0))
    gate_chunk = pl.BlockSpec((None, CHUNK, heads), lambda b, h, c: (b, c, h))
    square = pl.BlockSpec((None, heads, CHUNK, CHUNK), lambda b, h, c: (b, h, c, 0))
    row_spec = pl.BlockSpec((None, heads, CHUNK), lambda b, h, c: (b, h, c))
    square_shape = jax.ShapeDtypeStruct((batch, num_v_heads, padded_len, CHUNK), inter_dtype)
    row_shape = jax.ShapeDtypeStruct((batch, num_v_heads, padded_len), jnp.float32)
    kernel = functools.partial(_prep_kernel, scale=scale, use_qk_l2norm=use_qk_l2norm, low_precision=low_precision)
    return pl.pallas_call(
        kernel,
        grid=(batch, num_v_heads // heads, padded_len // CHUNK),
        in_specs=[pl.BlockSpec(memory_space=None), qk_chunk, qk_chunk, gate_chunk, gate_chunk],
        out_specs=[square, square, *[row_spec] * 5],
        out_shape=[square_shape, square_shape, *[row_shape] * 5],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gdr_chunk_prep",
    )(lengths_b, q_btk, k_btk, g_bth, beta_bth)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale", "use_qk_l2norm", "scan", "block_v", "num_warps", "num_stages", "prep_heads", "prep_warps",
        "interpret",
    ),
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
    scan: Literal["triton", "mosaic"] | None = None,
    block_v: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    prep_heads: int | None = None,
    prep_warps: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q/k [B, T, Hk, Dk], v [B, T, Hv, Dv], g/beta [B, T, Hv], state [B, Hv, Dk, Dv] fp32 (aliased to the
    returned state), lengths [B]. Returns (o [B, T, Hv, Dv] v.dtype, final state).
    scan picks the sequential scan: "triton" (`_scan_kernel`), "mosaic" (`chunk_scan_mosaic`, bf16 only) or
    None, the faster one measured for the grid (`_scan_backend`). block_v, num_warps, num_stages tune the
    Triton scan, prep_heads (value heads per program) and prep_warps the parallel stage; block_v and
    num_stages None pick what measured fastest on an H100 for the grid (`_scan_tiling`), prep_heads None by
    the prep grid's size (`_prep_heads`)."""
    batch, seq_len, num_k_heads, head_k = q_btk.shape
    num_v_heads, head_v = v_btv.shape[2:]
    group = num_v_heads // num_k_heads
    pad = -seq_len % CHUNK
    scan = _scan_backend(scan, q_btk.dtype, v_btv.dtype, batch, num_v_heads, head_k, head_v, seq_len + pad)
    block_v, num_stages = _scan_tiling(batch, num_v_heads, head_k, head_v, q_btk.dtype.itemsize, block_v, num_stages)
    if pad:  # whole chunks only; the pad tokens sit past every row's length, so they are neutral
        q_btk, k_btk, v_btv = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_btk, k_btk, v_btv))
        g_bth, beta_bth = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (g_bth, beta_bth))
    padded_len = seq_len + pad
    prepared = chunk_prep(
        q_btk, k_btk, g_bth, beta_bth, lengths_b,
        scale=scale, use_qk_l2norm=use_qk_l2norm, heads_per_program=prep_heads, num_warps=prep_warps,
        interpret=interpret,
    )
    if scan == "mosaic":
        valid_bt = (jnp.arange(padded_len)[None, :] < lengths_b[:, None]).astype(jnp.float32)
        o_btv, state_bhkv = mosaic_chunk_scan(q_btk, k_btk, v_btv, prepared, valid_bt, state_bhkv, interpret=interpret)
        return o_btv[:, :seq_len], state_bhkv

    qk_all = pl.BlockSpec((None, padded_len, None, head_k), lambda b, h, j: (b, 0, h // group, 0))
    v_tile = pl.BlockSpec((None, padded_len, None, block_v), lambda b, h, j: (b, 0, h, j))
    square = pl.BlockSpec((None, None, padded_len, CHUNK), lambda b, h, j: (b, h, 0, 0))
    per_row = pl.BlockSpec((None, None, padded_len), lambda b, h, j: (b, h, 0))
    state_spec = pl.BlockSpec((None, None, head_k, block_v), lambda b, h, j: (b, h, 0, j))
    kernel = functools.partial(_scan_kernel, low_precision=v_btv.dtype == jnp.bfloat16, chunk=CHUNK)
    o_btv, state_bhkv = pl.pallas_call(
        kernel,
        grid=(batch, num_v_heads, head_v // block_v),
        in_specs=[pl.BlockSpec(memory_space=None), qk_all, qk_all, v_tile, square, square, *[per_row] * 5, state_spec],
        out_specs=[v_tile, state_spec],
        out_shape=[
            jax.ShapeDtypeStruct((batch, padded_len, num_v_heads, head_v), v_btv.dtype),
            jax.ShapeDtypeStruct(state_bhkv.shape, jnp.float32),
        ],
        input_output_aliases={11: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="gdr_chunk_scan",
    )(lengths_b, q_btk, k_btk, v_btv, *prepared, state_bhkv)
    return o_btv[:, :seq_len], state_bhkv
