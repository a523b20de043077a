"""CPU tests of decode attention: the reference against float64 numpy, the kernel (Pallas interpreter) against the
reference. Every cache is poisoned where it must not be read: NaN past each row's length and in the slots past
the batch, so a read that leaks into the output shows up as NaN. The interpreter fills kernel outputs with NaN
before the call, so an unwritten partial fails too."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import decode_attention, decode_attention_ref, default_tiling
from pallas_kernels.device_info import multiprocessors

jax.config.update("jax_default_matmul_precision", "highest")


def make_inputs(seed, lengths, num_slots, max_len, num_kv_heads, group, head_dim, dtype=jnp.float32):
    """q [B, H, D], k/v caches [S, L, KV, D] (random where valid, NaN elsewhere), lengths [B] int32."""
    batch = len(lengths)
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (batch, num_kv_heads * group, head_dim), dtype)
    shape = (num_slots, max_len, num_kv_heads, head_dim)
    lengths = jnp.asarray(lengths, jnp.int32)
    valid = jnp.arange(max_len)[None, :] < jnp.pad(lengths, (0, num_slots - batch))[:, None]
    k, v = (jnp.where(valid[:, :, None, None], jax.random.normal(key, shape, dtype), jnp.nan) for key in ks[1:])
    return q, k, v, lengths


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite values (a poisoned read, or an unwritten partial)"
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def numpy_attention(q, k, v, lengths):
    """float64, one row and query head at a time, over the valid positions only."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    out = np.zeros_like(q)
    for b, length in enumerate(np.asarray(lengths)):
        for h in range(num_heads if length else 0):
            keys, values = k[b, :length, h // group], v[b, :length, h // group]
            scores = keys @ q[b, h] * head_dim**-0.5
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values / weights.sum()
    return out


@pytest.mark.parametrize("group, head_dim", [(7, 128), (4, 256)])
def test_reference_matches_float64(group, head_dim):
    q, k, v, lengths = make_inputs(group, [0, 1, 45, 64, 20], 7, 64, 2, group, head_dim)
    out = decode_attention_ref(q, k, v, lengths)
    assert rel_err(out, numpy_attention(q, k, v, lengths)) < 1e-5
    assert np.all(np.asarray(out[0]) == 0.0)


KERNEL_CASES = [  # kv heads, group, head_dim, dtype, max_len, lengths, num_splits, block_k
    # L = 200 is no multiple of 64: the full row's last block runs past L (masked).
    (2, 1, 128, jnp.float32, 200, [0, 1, 100, 200, 37], 3, None),
    (1, 4, 256, jnp.bfloat16, 130, [130, 65, 0], None, None),
    (2, 7, 128, jnp.float32, 96, [96, 50, 1], 2, 32),
    (1, 8, 256, jnp.float32, 64, [64, 17], 4, None),
    (1, 16, 128, jnp.bfloat16, 300, [300, 129, 0], 2, 128),
]


@pytest.mark.parametrize("num_kv, group, head_dim, dtype, max_len, lengths, num_splits, block_k", KERNEL_CASES)
def test_kernel_matches_reference(num_kv, group, head_dim, dtype, max_len, lengths, num_splits, block_k):
    q, k, v, lengths = make_inputs(max_len + group, lengths, len(lengths) + 2, max_len, num_kv, group, head_dim, dtype)
    # The reference sees the same (rounded) inputs, upcast: only the kernel's arithmetic is compared.
    ref = decode_attention_ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lengths)
    out = decode_attention(q, k, v, lengths, impl="interpret", num_splits=num_splits, block_k=block_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < (1e-4 if dtype == jnp.float32 else 1e-2)
    assert np.all(np.asarray(out)[np.asarray(lengths) == 0] == 0.0)


def test_kernel_result_does_not_depend_on_cache_length():
    """Split ranges follow each row's length, not L: the same rows in a 96- and a 320-position cache (NaN
    past the lengths) run the same blocks and give the same bits."""
    q, k, v, lengths = make_inputs(3, [96, 70, 5], 4, 96, 2, 4, 128)
    pad = ((0, 0), (0, 320 - 96), (0, 0), (0, 0))
    k_long, v_long = (jnp.pad(x, pad, constant_values=jnp.nan) for x in (k, v))
    run = lambda k, v: np.asarray(decode_attention(q, k, v, lengths, impl="interpret", num_splits=3, block_k=32))
    np.testing.assert_array_equal(run(k, v), run(k_long, v_long))


def test_default_tiling():
    sms = multiprocessors()
    splits, block_k = default_tiling(1, 4, 256, 2)
    assert splits == min(64, -(-2 * sms // 4)) and block_k == 64
    splits, block_k = default_tiling(256, 8, 128, 2)
    assert splits == 1 and block_k == 64
    assert default_tiling(64, 4, 256, 4)[1] == 32
