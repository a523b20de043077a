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


def test_kernel_is_used_for_one_row_and_narrow_weights_only():
    w = jnp.zeros((4096, 1024), jnp.bfloat16)
    assert skinny_matmul(jnp.zeros((2, 4096), jnp.bfloat16), w) is None
    assert skinny_matmul(jnp.zeros((1, 4096), jnp.bfloat16), jnp.zeros((4096, 4096), jnp.bfloat16)) is None
    assert skinny_matmul(jnp.zeros((1, 4096), jnp.float32), w.astype(jnp.float32)) is None
    assert not np.isnan(np.asarray(skinny_matmul(jnp.ones((1, 1, 4096), jnp.bfloat16), w), np.float32)).any()
