"""The one-row decode matmul kernel (pallas_kernels/skinny_matmul.py) in the Pallas interpreter against a
float32 dot, at tilings with and without split-K and rows up to the 16-row tile; where the model uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import Tiling, default_tiling, skinny_matmul, skinny_matmul_pallas, tiling_error


@pytest.mark.parametrize("rows, k, n, tiling", [
    (1, 512, 256, Tiling(64, 128, 4)),  # split-K: fp32 partial sums added after the kernel
    (1, 384, 96, Tiling(32, 64, 3)),  # a split count that is not a power of two
    (5, 256, 128, Tiling(64, 128, 1)),
    (16, 128, 64, Tiling(16, 32, 2)),
])
def test_interpreted_kernel_matches_a_float32_dot(rows, k, n, tiling):
    x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32)
    w = jax.random.normal(jax.random.key(k + n), (k, n), jnp.float32)
    assert tiling_error(tiling, rows, k, n) is None
    # The interpreter leaves unwritten output elements NaN: a skipped tile fails here.
    y = skinny_matmul_pallas(x, w, tiling=tiling, interpret=True)
    want = jnp.dot(x, w, precision="highest")
    assert y.shape == (rows, n) and not np.isnan(np.asarray(y)).any()
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))


def test_tilings_and_where_the_kernel_applies():
    assert tiling_error(Tiling(64, 128, 3), 1, 512, 256) == "block_k=128 x splits=3 does not divide K=512"
    assert tiling_error(Tiling(48, 128, 1), 1, 512, 96) == "block_n=48 must be a power of two >= 16"
    assert tiling_error(Tiling(64, 128, 1), 17, 512, 256) == "rows=17 must be 1..16"
    # Qwen3-VL-8B's k/v projections: 16 column tiles, K split 8 ways -> 128 programs of 512-row spans.
    assert default_tiling(4096, 1024) == Tiling(64, 128, 8)
    # FP8: 128-column tiles of 8 warps where the output width allows, the bf16 kernel's tiles where it does not.
    assert default_tiling(4096, 12288, fp8=True) == Tiling(128, 128, 8, num_warps=8)
    assert default_tiling(4096, 32, fp8=True) == Tiling(32, 128, 8)
    # On the CPU (and for several rows, or a weight XLA's GEMM handles) the model keeps XLA's dot.
    x, w = jnp.ones((1, 4096), jnp.bfloat16), jnp.ones((4096, 1024), jnp.bfloat16)
    assert skinny_matmul(x, w) is None


@pytest.mark.parametrize("rows, k, n, block, tiling", [
    (1, 512, 256, (128, 128), Tiling(64, 128, 2)),
    (3, 256, 192, (64, 32), Tiling(32, 32, 2)),  # several scale blocks along both axes
    (16, 384, 128, (128, 128), Tiling(64, 128, 1)),  # K = 3 blocks
])
def test_interpreted_fp8_kernel_matches_the_dequantized_dot(rows, k, n, block, tiling):
    from qwenvl_jax.models.fp8 import dequantize, scale_shape

    x = jax.random.normal(jax.random.key(rows), (rows, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(k), (k, n), jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jax.random.uniform(jax.random.key(n), scale_shape(k, n, block), jnp.float32, 0.001, 0.01)
    assert tiling_error(tiling, rows, k, n, block) is None
    y = skinny_matmul_pallas(x, w, scale, tiling=tiling, scale_block=block, interpret=True)
    want = jnp.dot(x.astype(jnp.float32), dequantize(w, scale, block, jnp.float32), precision="highest")
    assert not np.isnan(np.asarray(y, np.float32)).any()
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want), rtol=2e-2,
                               atol=1e-2 * float(jnp.abs(want).max()))


def test_fp8_tiles_must_nest_in_scale_blocks():
    assert "do not nest" in tiling_error(Tiling(64, 128, 1), 1, 512, 256, (128, 64))
