"""x [M, K] @ w [K, N] for decode's few rows (M <= 16): a weight-streaming matmul.

Used where XLA is slow: XLA rewrites a [1, K] x [K, N] dot whose operands hold under 10M elements into a
multiply that writes a weight-sized product and a reduction over it (measured on an H200 with jax 0.11.2: 19.8 us
for 4096 x 1024 against 8.0 us here; in Qwen3-VL-8B's batch-1 decode step those k/v fusions took 1.35 of 6.4 ms).
Larger weights go to XLA's GEMM, which this kernel does not beat (bench/NOTES.md).

At batch 1-16 a decode step's projections are matrix-vector products bound by reading w once. Each program
owns a column tile of w and one of S contiguous spans of K (split-K, so that narrow outputs such as a down
projection to 4096 columns still give every SM several programs) and streams its [span, block_n] slab
through a software-pipelined loop of [block_k, block_n] tiles. The rows of x are gathered into a 16-row tile
(Triton's smallest matrix-product tile; rows past M repeat row M-1 and are dropped). With S > 1 the partial
sums leave in fp32 and XLA adds them (that sum fuses into the consumer). Lowered through Triton on GPU, or run by
the Pallas interpreter on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.device_info import multiprocessors

TILE_M = 16


@dataclasses.dataclass(frozen=True)
class Tiling:
    block_n: int
    block_k: int
    splits: int
    num_warps: int = 4
    num_stages: int = 4


def tiling_error(tiling: Tiling, rows: int, k: int, n: int, scale_block: tuple[int, int] | None = None
                 ) -> str | None:
    """Why the kernel cannot take [rows, k] @ [k, n] (FP8 with ``scale_block``) at this tiling, or None."""
    if not 1 <= rows <= TILE_M:
        return f"rows={rows} must be 1..{TILE_M}"
    for name, size in (("block_n", tiling.block_n), ("block_k", tiling.block_k)):
        if size < 16 or size & (size - 1):
            return f"{name}={size} must be a power of two >= 16"
    if n % tiling.block_n:
        return f"block_n={tiling.block_n} does not divide N={n}"
    if k % (tiling.block_k * tiling.splits):
        return f"block_k={tiling.block_k} x splits={tiling.splits} does not divide K={k}"
    if scale_block is not None and (scale_block[1] % tiling.block_k or scale_block[0] % tiling.block_n):
        return (f"tiles of {tiling.block_k} x {tiling.block_n} do not nest in FP8 scale blocks of "
                f"{scale_block[1]} x {scale_block[0]} (input x output)")
    return None


def default_tiling(k: int, n: int, fp8: bool = False) -> Tiling | None:
    """64-column tiles of 128-deep steps; K split until there are at least 4 programs per SM (two fit at once
    in shared memory at 4 stages, so loads of one hide the other's tail). None if no tiling fits.

    FP8 weights take 128-column tiles and 8 warps: converting each tile to bf16 in registers, not the bytes,
    bounds that kernel, and more warps a tile hide it better (H100, bba457f: 4096 x 12288 49.3 -> 40.2 us,
    12288 x 4096 44.2 -> 38.5, 4096 x 4096 19.4 -> 16.6; bench/NOTES.md)."""
    widths = (128, 64, 32, 16) if fp8 else (64, 32, 16)
    block_n = next((b for b in widths if n % b == 0), None)
    block_k = next((b for b in (128, 64, 32, 16) if k % b == 0), None)
    if block_n is None or block_k is None:
        return None
    splits = 1
    while (n // block_n) * splits < 4 * multiprocessors() and k % (block_k * splits * 2) == 0 \
            and k // (splits * 2) >= 4 * block_k:
        splits *= 2
    return Tiling(block_n=block_n, block_k=block_k, splits=splits, num_warps=8 if fp8 and block_n == 128 else 4)


def _kernel(x_ref, w_ref, *refs, block_k: int, span: int, rows: int, scale_block: tuple[int, int] | None):
    scale_ref, o_ref = refs if scale_block is not None else (None, refs[0])
    j, s = pl.program_id(0), pl.program_id(1)
    block_n = o_ref.shape[-1]
    row_m = jnp.minimum(lax.broadcasted_iota(jnp.int32, (TILE_M,), 0), rows - 1)
    cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)

    def step(i, acc_mn):
        start = s * span + i * block_k
        ks = pl.ds(pl.multiple_of(start, block_k), block_k)
        x_mk = x_ref[row_m, ks]
        if scale_block is None:
            return acc_mn + jnp.dot(x_mk, w_ref[ks, cols], preferred_element_type=jnp.float32)
        # FP8 weights: the tile lies in one scale block (block_k divides its rows, block_n its columns), so
        # its scale multiplies the tile's product (float8_e4m3fn values are exact in bf16).
        block_out, block_in = scale_block
        scale = scale_ref[start // block_in, (j * block_n) // block_out]
        product = jnp.dot(x_mk, w_ref[ks, cols].astype(x_mk.dtype), preferred_element_type=jnp.float32)
        return acc_mn + scale * product

    acc_mn = lax.fori_loop(0, span // block_k, step, jnp.zeros((TILE_M, block_n), jnp.float32))
    o_ref[...] = acc_mn.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "scale_block", "interpret"))
def skinny_matmul_pallas(x_mk: jax.Array, w_kn: jax.Array, scale_inv: jax.Array | None = None, *, tiling: Tiling,
                         scale_block: tuple[int, int] | None = None, interpret: bool = False) -> jax.Array:
    """x [rows, K] @ w [K, N]; with ``scale_inv`` (FP8 weights, models.fp8's layout [K blocks, N blocks] of
    ``scale_block`` = (output rows, input columns)) w is float8_e4m3fn times its block scales."""
    rows, k = x_mk.shape
    n = w_kn.shape[1]
    span = k // tiling.splits
    partial_dtype = x_mk.dtype if tiling.splits == 1 else jnp.float32
    whole = pl.BlockSpec(memory_space=None)
    scales = () if scale_inv is None else (scale_inv.astype(jnp.float32),)
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=tiling.block_k, span=span, rows=rows, scale_block=scale_block),
        grid=(n // tiling.block_n, tiling.splits),
        in_specs=[whole] * (2 + len(scales)),
        out_specs=pl.BlockSpec((None, TILE_M, tiling.block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((tiling.splits, TILE_M, n), partial_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
        name="skinny_matmul",
    )(x_mk, w_kn, *scales)
    return out.sum(axis=0).astype(x_mk.dtype)[:rows] if tiling.splits > 1 else out[0, :rows]


# XLA's GPU pipeline (DotStrengthReduction) rewrites a vector-matrix dot into multiply + reduce when its operands
# and result hold fewer elements than this (IsMatrixMultiplicationTooSmallForRewriting's threshold). 4096 x 1024
# is rewritten, 4096 x 4096 becomes a GEMM; 2048 x 4096 is rewritten too: the 70 weight copies counted in
# Qwen3.5-35B-A3B's batch-1 decode program (H200) match its 60 GDN z/out and 10 attention o projections.
XLA_REWRITE_ELEMENTS = 10_000_000


def skinny_matmul(x: jax.Array, w_kn: jax.Array) -> jax.Array | None:
    """x [..., K] @ w [K, N] through the kernel where XLA is slow (a GPU, one row, a dot XLA would rewrite into
    multiply + reduce: below XLA_REWRITE_ELEMENTS, half-precision operands of one dtype, a tiling that fits),
    else None (the caller's XLA dot). ``QWENVL_XLA_MATMUL=1`` turns it off (benchmark baselines)."""
    rows = math.prod(x.shape[:-1])
    k, n = w_kn.shape
    if (os.environ.get("QWENVL_XLA_MATMUL") == "1" or jax.default_backend() != "gpu" or rows != 1
            or k + k * n + n >= XLA_REWRITE_ELEMENTS or x.dtype != w_kn.dtype
            or x.dtype not in (jnp.bfloat16, jnp.float16)):
        return None
    tiling = default_tiling(k, n)
    if tiling is None or tiling_error(tiling, rows, k, n) is not None:
        return None
    return skinny_matmul_pallas(x.reshape(rows, k), w_kn, tiling=tiling).reshape(*x.shape[:-1], n)


def skinny_matmul_fp8(x: jax.Array, w_kn: jax.Array, scale_inv: jax.Array, block: tuple[int, int]
                      ) -> jax.Array | None:
    """x [..., K] @ (FP8 w [K, N] times its block scales) through the kernel for decode's rows (a GPU, at most
    16 rows, half-precision x, a tiling nested in the scale blocks), else None (the caller dequantizes: XLA
    then writes the whole dequantized weight every call, measured 2.6x slower than bf16 on an H200). The
    weights stream at one byte each."""
    rows = math.prod(x.shape[:-1])
    k, n = w_kn.shape
    if (os.environ.get("QWENVL_XLA_MATMUL") == "1" or jax.default_backend() != "gpu" or rows > TILE_M
            or x.dtype not in (jnp.bfloat16, jnp.float16)):
        return None
    tiling = default_tiling(k, n, fp8=True)
    if tiling is None or tiling_error(tiling, rows, k, n, block) is not None:
        return None
    return skinny_matmul_pallas(x.reshape(rows, k), w_kn, scale_inv, tiling=tiling, scale_block=block).reshape(
        *x.shape[:-1], n)
