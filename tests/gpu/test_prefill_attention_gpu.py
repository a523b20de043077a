"""Prefill attention on the GPU: cuDNN's flash attention (the bf16 path of ``causal_attention``) against XLA's
masked attention in fp32 on the same rounded inputs, at the head layouts of every family, over right-padded rows.
Only the real query rows are compared (pad rows are never read)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from qwenvl_jax.models.attention import causal_attention, flash_attention_available


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(28, 4, 128), (32, 8, 128), (16, 4, 256), (16, 2, 256)])
def test_flash_prefill_attention_matches_masked_attention(heads, kv_heads, head_dim):
    assert flash_attention_available(jnp.bfloat16)
    t, lengths = 640, np.array([640, 1, 333, 517])
    ks = jax.random.split(jax.random.key(heads * head_dim), 3)
    q = jax.random.normal(ks[0], (len(lengths), t, heads, head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(key, (len(lengths), t, kv_heads, head_dim), jnp.bfloat16) for key in ks[1:])
    flash = jax.jit(causal_attention)(q, k, v, jnp.asarray(lengths, jnp.int32))
    with jax.default_matmul_precision("highest"):
        masked = jax.jit(causal_attention)(*(x.astype(jnp.float32) for x in (q, k, v)), jnp.asarray(lengths))
    assert flash.dtype == jnp.bfloat16
    for row, n in enumerate(lengths):
        got, want = np.asarray(flash[row, :n], np.float64), np.asarray(masked[row, :n], np.float64)
        assert np.isfinite(got).all()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2, row
