"""The chunked prefill's sequential scan for Pallas' Mosaic GPU backend (Hopper): bf16 grids past one wave.

Same products and row factors as `chunk._scan_kernel`, on the committed prep's outputs: per chunk
r = diag(u) v - diag(w) k S, v_new = T r, o = diag(q_fac) q S + P v_new, S <- exp(G_C) S + k^T diag(k_fac) v_new.
One warpgroup per (row, value head, 64-wide v tile); chunks arrive by TMA through `plgpu.emit_pipeline` (two
in flight) and every wgmma reads both operands from shared memory (the CPU interpreter, which CI tests it
with, has no rule for register operands). Measured on an H200 (bench/NOTES.md item 16): where the
grid has more than two waves of 32-wide programs it takes 288 instead of 418 us at B8xT2048 and 580 instead of
864 at B32xT1024; with few programs (B1) each program's chain is what counts and it loses (486 vs 397 us at
B1xT16384), so `chunk_prefill` picks it only where the Triton scan's 32-wide programs would share SMs
(`chunk._mosaic_scan_faster`, item 18: past one wave with rows of 4096 tokens or more, past two otherwise).

Pads: tokens at or past a row's length may hold anything, even NaN, and must not reach the state or the
outputs. In the chunks that hold pads (only those: the full ones pay nothing) the pad rows of q, k and the v
tile are zeroed in shared memory before the chunk's products; with the prep's zero g, beta and scores there,
pad rows of r, v_new and o come out 0 (a product with a NaN would not, even times a zero factor), and the
chunks past a row's end leave its state unchanged.

The state is updated in place: `plgpu.kernel` takes no input/output aliases, so the state goes in as a
mutable array (`jax.new_ref`) that the kernel reads and then overwrites; discharging it aliases the state
operand to the result, and a donated state keeps its buffer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

BLOCK_V = 64
STAGES = 2
SHARED_MEMORY_BYTES = 227 * 1024  # per SM on the H100 and H200


def _swizzled(swizzle: int, itemsize: int = 2):
    """Transforms of a shared-memory buffer wgmma can read: rows tiled by 8, `swizzle` bytes per swizzled
    row. Mosaic GPU wants both operands of a wgmma swizzled alike, so every bf16 buffer here takes the same."""
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def mosaic_scan_shared_bytes(head_k: int, chunk: int) -> int:
    """Shared memory one program needs: the pipelined chunk inputs (q, k, the v tile, T, P, six per-row
    vectors) per stage, and the state in fp32 and bf16 plus four bf16 [chunk, 64] scratch tiles."""
    stage = 2 * chunk * (2 * head_k + BLOCK_V + 2 * chunk) + 6 * 4 * chunk
    return STAGES * stage + head_k * BLOCK_V * (4 + 2) + 4 * 2 * chunk * BLOCK_V


def mosaic_scan_supports(dtype, head_k: int, head_v: int, chunk: int) -> bool:
    """bf16 inputs (wgmma on fp32 would be TF32, short of the fp32 path's precision), head sizes in whole
    64-row wgmma tiles, and the program's buffers within an SM's shared memory."""
    return (dtype == jnp.bfloat16 and head_k % 64 == 0 and head_v % BLOCK_V == 0 and chunk == 64
            and mosaic_scan_shared_bytes(head_k, chunk) <= SHARED_MEMORY_BYTES - 8 * 1024)


def mosaic_chunk_scan(
    q_btk: jax.Array,
    k_btk: jax.Array,
    v_btv: jax.Array,
    prepared: tuple[jax.Array, ...],
    valid_bt: jax.Array,
    state_bhkv: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv] bf16 with T a multiple of 64; `prepared` is `chunk_prep`'s
    output; valid_bt [B, T] fp32 (1 for real tokens, 0 for pads); state [B, Hv, Dk, Dv] fp32. Returns
    (o [B, T, Hv, Dv] bf16, pad rows 0; final state fp32). interpret runs Pallas' GPU interpreter (CPU)."""
    t_mat, scores, gcum, q_fac, k_fac, w_fac, u_fac = prepared
    chunk = t_mat.shape[-1]
    batch, seq_len, num_k_heads, head_k = q_btk.shape
    num_v_heads, head_v = v_btv.shape[2:]
    group = num_v_heads // num_k_heads
    bf16 = jnp.bfloat16
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    operand = _swizzled(min(128, 2 * BLOCK_V))

    def body(q_g, k_g, v_g, t_g, p_g, gcum_g, qf_g, kf_g, wf_g, uf_g, valid_g, s_g, o_g,
             s_smem, r_smem, vn_smem, x_smem, o_smem, s32_smem, barrier):
        bh, j = lax.axis_index("bh"), lax.axis_index("j")
        b, h = bh // num_v_heads, bh % num_v_heads
        cols = pl.ds(j * BLOCK_V, BLOCK_V)
        plgpu.copy_gmem_to_smem(s_g.at[b, h, :, cols], s32_smem, barrier)
        plgpu.barrier_wait(barrier)

        def rows_of(ref, width):
            """A per-row vector broadcast over a [64, width] tile in the wgmma accumulator layout."""
            return lax.broadcast_in_dim(plgpu.load(ref, layout=row_layout), (chunk, width), [0])

        def step(indices, q_s, k_s, v_s, t_s, p_s, g_s, qf_s, kf_s, wf_s, uf_s, valid_s, s_kv):
            # Register reads of the pipeline's buffers sit before the step's last commit_smem (a proxy
            # fence): the pipeline refills them by TMA after the step, and the interpreter's race detector
            # flags a read after the fence.
            decay = jnp.exp(g_s[chunk - 1])

            @pl.when(valid_s[chunk - 1] == 0)
            def _():  # only chunks holding pads (the last row of a chunk is a pad iff any row is)
                for ref in (q_s, k_s, v_s):
                    valid = rows_of(valid_s, ref.shape[1]) > 0
                    ref[...] = jnp.where(valid, plgpu.load(ref, layout=wgmma_layout), jnp.zeros((), ref.dtype))

            s_smem[...] = s_kv.astype(bf16)
            plgpu.commit_smem()

            def state_products(ks_ref, qs_ref):  # both read S only: one wait for the two
                plgpu.wgmma(ks_ref, k_s, s_smem)
                plgpu.wgmma(qs_ref, q_s, s_smem)
                plgpu.wgmma_wait(0)
                return ks_ref[...], qs_ref[...]
            ks, qs = pl.run_scoped(state_products, plgpu.ACC((chunk, BLOCK_V), jnp.float32),
                                   plgpu.ACC((chunk, BLOCK_V), jnp.float32))
            v_cv = plgpu.load(v_s, layout=wgmma_layout).astype(jnp.float32)
            r_smem[...] = (rows_of(uf_s, BLOCK_V) * v_cv - rows_of(wf_s, BLOCK_V) * ks).astype(bf16)
            plgpu.commit_smem()

            def vnew_product(acc_ref):
                plgpu.wgmma(acc_ref, t_s, r_smem)
                plgpu.wgmma_wait(0)
                return acc_ref[...]
            vnew = pl.run_scoped(vnew_product, plgpu.ACC((chunk, BLOCK_V), jnp.float32))
            vn_smem[...] = vnew.astype(bf16)
            x_smem[...] = (rows_of(kf_s, BLOCK_V) * vnew).astype(bf16)
            qf = rows_of(qf_s, BLOCK_V)
            plgpu.commit_smem()

            def vnew_products(pv_ref, kx_ref):  # both read v_new only: one wait for the two
                plgpu.wgmma(pv_ref, p_s, vn_smem)
                plgpu.wgmma(kx_ref, k_s.transpose((1, 0)), x_smem)
                plgpu.wgmma_wait(0)
                return pv_ref[...], kx_ref[...]
            pv, kx = pl.run_scoped(vnew_products, plgpu.ACC((chunk, BLOCK_V), jnp.float32),
                                   plgpu.ACC((head_k, BLOCK_V), jnp.float32))
            # The output goes out by hand: the interpreter rejects emit_pipeline's predicated output copies.
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem[...] = (qf * qs + pv).astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_g.at[b, pl.ds(indices[0] * chunk, chunk), h, cols])
            return s_kv * decay + kx

        qk_spec = plgpu.BlockSpec((chunk, head_k), lambda c: (c, 0), transforms=operand)
        square = plgpu.BlockSpec((chunk, chunk), lambda c: (c, 0), transforms=operand)
        v_spec = plgpu.BlockSpec((chunk, BLOCK_V), lambda c: (c, j), transforms=operand)
        per_row = plgpu.BlockSpec((chunk,), lambda c: (c,))
        pipeline = plgpu.emit_pipeline(
            step, grid=(seq_len // chunk,), max_concurrent_steps=STAGES,
            init_carry=plgpu.load(s32_smem, layout=wgmma_layout),
            in_specs=[qk_spec, qk_spec, v_spec, square, square, *[per_row] * 6],
        )
        s_kv = pipeline(q_g.at[b, :, h // group], k_g.at[b, :, h // group], v_g.at[b, :, h],
                        t_g.at[b, h], p_g.at[b, h], gcum_g.at[b, h], qf_g.at[b, h], kf_g.at[b, h], wf_g.at[b, h],
                        uf_g.at[b, h], valid_g.at[b])
        s32_smem[...] = s_kv
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(s32_smem, s_g.at[b, h, :, cols])
        plgpu.wait_smem_to_gmem(0)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(v_btv.shape, v_btv.dtype),
        scratch_types=[plgpu.SMEM((head_k, BLOCK_V), bf16, transforms=operand),
                       *[plgpu.SMEM((chunk, BLOCK_V), bf16, transforms=operand) for _ in range(4)],
                       plgpu.SMEM((head_k, BLOCK_V), jnp.float32, transforms=_swizzled(128, 4)),
                       plgpu.Barrier(num_arrivals=1)],
        grid=(batch * num_v_heads, head_v // BLOCK_V), grid_names=("bh", "j"),
        interpret=plgpu.InterpretGPUParams(detect_races=True) if interpret else None,
        kernel_name="gdr_chunk_scan_mosaic",
    )
    state_ref = jax.new_ref(state_bhkv)
    o_btv = kernel(q_btk, k_btk, v_btv, t_mat, scores, gcum, q_fac, k_fac, w_fac, u_fac, valid_bt, state_ref)
    return o_btv, jax.freeze(state_ref)
