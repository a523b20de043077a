"""The one-row decode matmul on the GPU against XLA's dot, bf16, at Qwen's narrow projection shapes; and the
Linear layer takes it for one row only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import skinny_matmul


@pytest.mark.parametrize("k, n", [(4096, 1024), (4096, 32), (3584, 512), (2048, 256)])
def test_kernel_matches_xla_in_bf16(k, n):
    x = jax.random.normal(jax.random.key(0), (1, k), jnp.float32).astype(jnp.bfloat16)
    w = (0.02 * jax.random.normal(jax.random.key(1), (k, n), jnp.float32)).astype(jnp.bfloat16)
    y = skinny_matmul(x, w)
    assert y is not None and y.shape == (1, n) and y.dtype == jnp.bfloat16
    want = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
    assert err < 1e-2


def test_kernel_is_used_for_one_row_and_weights_xla_would_rewrite_only():
    w = jnp.zeros((4096, 1024), jnp.bfloat16)
    assert skinny_matmul(jnp.zeros((2, 4096), jnp.bfloat16), w) is None
    assert skinny_matmul(jnp.zeros((1, 4096), jnp.bfloat16), jnp.zeros((4096, 4096), jnp.bfloat16)) is None
    assert skinny_matmul(jnp.zeros((1, 2048), jnp.bfloat16), jnp.zeros((2048, 4096), jnp.bfloat16)) is not None
    assert skinny_matmul(jnp.zeros((1, 4096), jnp.float32), w.astype(jnp.float32)) is None
    assert not np.isnan(np.asarray(skinny_matmul(jnp.ones((1, 1, 4096), jnp.bfloat16), w), np.float32)).any()


@pytest.mark.parametrize("rows, k, n", [(1, 4096, 12288), (8, 12288, 4096), (16, 4096, 1024)])
def test_fp8_kernel_matches_the_dequantized_dot(rows, k, n):
    from pallas_kernels.skinny_matmul import skinny_matmul_fp8
    from qwenvl_jax.models.fp8 import dequantize, scale_shape

    x = jax.random.normal(jax.random.key(0), (rows, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (k, n), jnp.float32).astype(jnp.float8_e4m3fn)
    scale = jax.random.uniform(jax.random.key(2), scale_shape(k, n, (128, 128)), jnp.float32, 1e-3, 1e-2)
    y = skinny_matmul_fp8(x, w, scale, (128, 128))
    assert y is not None and y.shape == (rows, n)
    want = jnp.dot(x.astype(jnp.float32), dequantize(w, scale, (128, 128), jnp.float32), precision="highest")
    assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want))) < 1e-2
