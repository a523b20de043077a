"""The chunked prefill's parallel stage for Pallas' Mosaic GPU backend (Hopper), bf16 inputs.

Same outputs as `chunk.chunk_prep` (T = (I + A)^-1, the masked scores P, G and the q, k, w, u row factors), so
either scan reads them. One warpgroup per (row, key head, chunk) forms q k^T and k k^T once for the value
heads that read that key head, then per value head gates them and inverts the chunk's whole 64 x 64 system
by doubling, (I + A)^-1 = (I - A)(I + A^2)(I + A^4)..., with every product a wgmma on shared-memory operands
(the CPU interpreter, which CI tests it with, has no rule for register operands). Each doubling issues the
next power's square alongside the inverse's update, so the dependent chain is six products long.

The chunk-local cumulative log-decay G and the masked beta are formed by XLA (tiny [B, Hv, T] arrays) and
read here; q, k are read once. Tokens at or past a row's length may hold anything, even NaN: in the chunks
that hold pads their q, k rows are zeroed in shared memory before any product, and G, beta are 0 there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.gated_delta_rule.chunk_scan_mosaic import swizzled
from pallas_kernels.gated_delta_rule.reference import L2NORM_EPS


def mosaic_prep_supports(dtype, head_k: int, chunk: int) -> bool:
    """bf16 q, k (wgmma on fp32 would be TF32, short of the fp32 path's precision), whole 64-row chunks and
    a key head size in 64s, up to 256 so one [64, Dk] fp32 tile stays within 128 registers a thread."""
    return dtype == jnp.bfloat16 and chunk == 64 and head_k % 64 == 0 and head_k <= 256


def mosaic_chunk_prep(
    q_btk: jax.Array,
    k_btk: jax.Array,
    gcum_bht: jax.Array,
    beta_bht: jax.Array,
    valid_bt: jax.Array,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    chunk: int = 64,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """q, k [B, T, Hk, Dk] bf16 with T a multiple of `chunk`; gcum [B, Hv, T] fp32 the chunk-local cumulative
    log-decay and beta [B, Hv, T] fp32, both 0 at pads; valid [B, T] fp32 (1 for real tokens). Returns
    `chunk.chunk_prep`'s tuple: T and P [B, Hv, T, chunk] bf16, then G, q, k, w, u factors [B, Hv, T] fp32."""
    batch, seq_len, num_k_heads, head_k = q_btk.shape
    num_v_heads = gcum_bht.shape[1]
    group = num_v_heads // num_k_heads
    bf16, f32 = jnp.bfloat16, jnp.float32
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout, col_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
    operand = swizzled(128)
    square_shape = (chunk, chunk)
    doublings = chunk.bit_length() - 2  # A^2 ... A^(chunk/2)

    def body(q_g, k_g, gcum_g, beta_g, valid_g, t_g, p_g, qf_g, kf_g, wf_g, q_s, k_s, gcum_s, gcum_col_s,
             beta_s, valid_s, power_s, power_b_s, inverse_s, t_out_s, p_out_s, factors_s, barrier):
        bk, c = lax.axis_index("bk"), lax.axis_index("c")
        b, kh = bk // num_k_heads, bk % num_k_heads
        rows = pl.ds(c * chunk, chunk)
        heads = pl.ds(kh * group, group)
        plgpu.copy_gmem_to_smem(q_g.at[b, rows, kh], q_s, barrier)
        plgpu.copy_gmem_to_smem(k_g.at[b, rows, kh], k_s, barrier)
        plgpu.copy_gmem_to_smem(gcum_g.at[b, heads, rows], gcum_s, barrier)
        # A second copy for the column-broadcast reads: Mosaic's layout inference finds no solution when one
        # buffer is read in both the row and the column layout.
        plgpu.copy_gmem_to_smem(gcum_g.at[b, heads, rows], gcum_col_s, barrier)
        plgpu.copy_gmem_to_smem(beta_g.at[b, heads, rows], beta_s, barrier)
        plgpu.copy_gmem_to_smem(valid_g.at[b, rows], valid_s, barrier)
        plgpu.barrier_wait(barrier)

        def rows_of(vector, width):
            return lax.broadcast_in_dim(vector, (chunk, width), [0])

        def row_vector(ref):
            return plgpu.load(ref, layout=row_layout)

        @pl.when(valid_s[chunk - 1] == 0)
        def _():  # only chunks holding pads (the last row of a chunk is a pad iff any row is)
            valid = rows_of(row_vector(valid_s), head_k) > 0
            for ref in (q_s, k_s):
                ref[...] = jnp.where(valid, plgpu.load(ref, layout=wgmma_layout), jnp.zeros((), bf16))

        def normalise(ref, factor):
            """Rows L2-normalised and times `factor` in place (one tile in registers at a time); returns the
            inverse norms. The products then need no column factors."""
            x_ck = plgpu.load(ref, layout=wgmma_layout).astype(f32)
            if use_qk_l2norm:
                inv_norm = lax.rsqrt(jnp.sum(x_ck * x_ck, axis=1) + L2NORM_EPS)
            else:
                inv_norm = plgpu.layout_cast(jnp.ones((chunk,), f32), row_layout)
            ref[...] = (x_ck * rows_of(inv_norm * factor, head_k)).astype(bf16)
            return inv_norm

        q_inv = normalise(q_s, scale)
        k_inv = normalise(k_s, 1.0)
        plgpu.commit_smem()

        def key_products(qk_ref, kk_ref):  # both depend on the key head only: formed once for the group
            plgpu.wgmma(qk_ref, q_s, k_s.transpose((1, 0)))
            plgpu.wgmma(kk_ref, k_s, k_s.transpose((1, 0)))
            plgpu.wgmma_wait(0)
            return qk_ref[...], kk_ref[...]
        qk, kk = pl.run_scoped(key_products, plgpu.ACC(square_shape, f32), plgpu.ACC(square_shape, f32))

        i_nn = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, square_shape, 0), wgmma_layout)
        j_nn = plgpu.layout_cast(lax.broadcasted_iota(jnp.int32, square_shape, 1), wgmma_layout)
        identity = jnp.where(i_nn == j_nn, 1.0, 0.0)

        def store_power(power):
            # Twice: Mosaic cannot lower a wgmma that reads one buffer as both operands.
            power_s[...] = power_b_s[...] = power.astype(bf16)

        def first_square(acc_ref):
            plgpu.wgmma(acc_ref, power_s, power_b_s)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        def doubling(power_ref, update_ref, inverse, square_power):
            """inverse (I + power) and, if asked, power^2: both read power only, so one wait."""
            plgpu.wgmma(update_ref, inverse_s, power_s)
            if square_power:
                plgpu.wgmma(power_ref, power_s, power_b_s)
            plgpu.wgmma_wait(0)
            return inverse + update_ref[...], power_ref[...] if square_power else None

        for head in range(group):
            gcum_row = row_vector(gcum_s.at[head])
            gcum_col = plgpu.load(gcum_col_s.at[head], layout=col_layout)
            beta_row = row_vector(beta_s.at[head])
            # Masked before exp: G_i - G_j <= 0 for i >= j, so no overflow; the masked part is discarded.
            log_decay = rows_of(gcum_row, chunk) - lax.broadcast_in_dim(gcum_col, square_shape, [1])
            decay = jnp.exp(jnp.where(i_nn >= j_nn, log_decay, 0.0))
            exp_g = jnp.exp(gcum_row)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous head's outputs have left
            # The scores and row factors go to shared memory now, so their registers are free for the inverse.
            p_out_s[...] = jnp.where(i_nn >= j_nn, qk * decay, 0.0).astype(bf16)
            factors_s[0] = q_inv * scale * exp_g
            factors_s[1] = k_inv * jnp.exp(gcum_s[head, chunk - 1] - gcum_row)
            factors_s[2] = beta_row * k_inv * exp_g
            a_nn = jnp.where(i_nn > j_nn, rows_of(beta_row, chunk) * kk * decay, 0.0)

            inverse, power = identity - a_nn, a_nn
            store_power(power)
            plgpu.commit_smem()
            power = pl.run_scoped(first_square, plgpu.ACC(square_shape, f32))
            for step in range(doublings):
                store_power(power)
                inverse_s[...] = inverse.astype(bf16)
                plgpu.commit_smem()
                last = step == doublings - 1
                inverse, power = pl.run_scoped(
                    lambda p_ref, u_ref: doubling(p_ref, u_ref, inverse, not last),
                    plgpu.ACC(square_shape, f32), plgpu.ACC(square_shape, f32))

            t_out_s[...] = inverse.astype(bf16)
            plgpu.commit_smem()
            hv = kh * group + head
            plgpu.copy_smem_to_gmem(t_out_s, t_g.at[b, hv, rows])
            plgpu.copy_smem_to_gmem(p_out_s, p_g.at[b, hv, rows])
            for i, out_g in enumerate((qf_g, kf_g, wf_g)):
                plgpu.copy_smem_to_gmem(factors_s.at[i], out_g.at[b, hv, rows])
        plgpu.wait_smem_to_gmem(0)

    square_out = jax.ShapeDtypeStruct((batch, num_v_heads, seq_len, chunk), bf16)
    row_out = jax.ShapeDtypeStruct((batch, num_v_heads, seq_len), f32)
    kernel = plgpu.kernel(
        body,
        out_type=(square_out, square_out, row_out, row_out, row_out),
        scratch_types=[
            plgpu.SMEM((chunk, head_k), bf16, transforms=operand),
            plgpu.SMEM((chunk, head_k), bf16, transforms=operand),
            *[plgpu.SMEM((group, chunk), f32) for _ in range(3)],
            plgpu.SMEM((chunk,), f32),
            *[plgpu.SMEM(square_shape, bf16, transforms=operand) for _ in range(5)],
            plgpu.SMEM((3, chunk), f32),
            plgpu.Barrier(num_arrivals=6),
        ],
        grid=(batch * num_k_heads, seq_len // chunk), grid_names=("bk", "c"),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
        kernel_name="gdr_chunk_prep_mosaic",
    )
    t_mat, scores, q_fac, k_fac, w_fac = kernel(q_btk, k_btk, gcum_bht, beta_bht, valid_bt)
    return t_mat, scores, gcum_bht, q_fac, k_fac, w_fac, beta_bht
