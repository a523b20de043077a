"""CPU tests of prefill attention over the cache: the reference against float64 numpy, the kernel (Pallas
interpreter) against the reference. Rows read slots in scrambled order from a cache with more slots than rows,
and every cache position a row must not read is NaN: the slots no row reads, and in each read slot everything
from start + length on, so a read that leaks into the output shows up as NaN. The interpreter fills kernel
outputs with NaN before the call, so an output the kernel never writes fails too."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.prefill_attention import default_tiling, prefill_attention, prefill_attention_ref
from tests.test_decode_attention import rel_err

jax.config.update("jax_default_matmul_precision", "highest")


def make_inputs(seed, starts, lengths, slots, num_slots, max_len, seq_len, num_kv_heads, group, head_dim,
                dtype=jnp.float32):
    """q [B, T, H, D]; k/v caches [S, L, KV, D], random in [0, start + length) of each row's slot, NaN
    elsewhere; slots, starts, lengths [B] int32."""
    batch = len(starts)
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (batch, seq_len, num_kv_heads * group, head_dim), dtype)
    ends = np.zeros(num_slots, np.int64)
    ends[np.asarray(slots)] = np.asarray(starts) + np.asarray(lengths)
    valid_sl = np.arange(max_len)[None, :] < ends[:, None]
    shape = (num_slots, max_len, num_kv_heads, head_dim)
    k, v = (jnp.where(valid_sl[:, :, None, None], jax.random.normal(key, shape, dtype), jnp.nan) for key in ks[1:])
    rows = (jnp.asarray(x, jnp.int32) for x in (slots, starts, lengths))
    return (q, k, v, *rows)


def numpy_attention(q, k, v, slots, starts, lengths):
    """float64, one row, new token and query head at a time, over the positions that token sees only."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, seq_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    out = np.zeros_like(q)
    for b, (slot, start, length) in enumerate(zip(*(np.asarray(x) for x in (slots, starts, lengths)))):
        for t in range(length):
            for h in range(num_heads):
                keys, values = k[slot, : start + t + 1, h // group], v[slot, : start + t + 1, h // group]
                scores = keys @ q[b, t, h] * head_dim**-0.5
                weights = np.exp(scores - scores.max())
                out[b, t, h] = weights @ values / weights.sum()
    return out


def assert_padding_is_zero(out, lengths):
    out = np.asarray(out)
    for b, length in enumerate(np.asarray(lengths)):
        assert np.all(out[b, length:] == 0.0), f"row {b}: padding queries must give zeros"


@pytest.mark.parametrize("group, head_dim", [(7, 128), (4, 256)])
def test_reference_matches_float64(group, head_dim):
    # Rows: a continued sequence, a fresh one (start 0), an empty one, a single token; slots out of order.
    inputs = make_inputs(group, [37, 0, 5, 90], [24, 19, 0, 1], [4, 0, 2, 5], 6, 96, 24, 2, group, head_dim)
    out = prefill_attention_ref(*inputs)
    assert rel_err(out, numpy_attention(*inputs)) < 1e-5
    assert_padding_is_zero(out, inputs[-1])


KERNEL_CASES = [  # kv heads, group, head_dim, dtype, seq_len, max_len, starts, lengths, slots, num_slots, tiling
    # T = 40 is no multiple of block_q (the last query block runs past T, masked); starts cut blocks anywhere.
    (2, 1, 128, jnp.float32, 40, 120, [17, 0, 50, 77], [40, 23, 0, 1], [3, 0, 2, 5], 6, dict(block_q=16, block_k=16)),
    # The fullest row ends at L = 130, no multiple of block_k: its last key block runs past L (masked).
    (1, 4, 256, jnp.bfloat16, 48, 130, [82, 3], [48, 30], [1, 2], 3, dict(block_q=16, block_k=32)),
    (2, 7, 128, jnp.float32, 33, 100, [0, 66, 31], [33, 17, 33], [2, 0, 3], 5, dict(block_q=32, block_k=16)),
    (1, 16, 128, jnp.bfloat16, 32, 96, [64, 1], [32, 31], [0, 1], 3, dict(block_q=16, block_k=64)),
    # The default tiling (one query block, one or two key blocks) and fp32 at D = 256.
    (2, 4, 256, jnp.float32, 40, 100, [45, 0], [40, 12], [1, 3], 4, {}),
]


@pytest.mark.parametrize(
    "num_kv, group, head_dim, dtype, seq_len, max_len, starts, lengths, slots, num_slots, tiling", KERNEL_CASES
)
def test_kernel_matches_reference(
    num_kv, group, head_dim, dtype, seq_len, max_len, starts, lengths, slots, num_slots, tiling
):
    q, k, v, slots, starts, lengths = make_inputs(
        seq_len + group, starts, lengths, slots, num_slots, max_len, seq_len, num_kv, group, head_dim, dtype
    )
    # The reference sees the same (rounded) inputs, upcast: only the kernel's arithmetic is compared.
    ref = prefill_attention_ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                slots, starts, lengths)
    out = prefill_attention(q, k, v, slots, starts, lengths, impl="interpret", **tiling)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < (1e-4 if dtype == jnp.float32 else 1e-2)
    assert_padding_is_zero(out, lengths)


def test_kernel_result_does_not_depend_on_cache_size():
    """Key loops follow each row's start and length, not L or S: the same rows in a bigger cache (more slots,
    more positions, all NaN) run the same blocks and give the same bits."""
    inputs = make_inputs(3, [20, 45], [30, 19], [1, 0], 2, 80, 32, 2, 4, 128)
    q, k, v, slots, starts, lengths = inputs
    pad = ((0, 3), (0, 320 - 80), (0, 0), (0, 0))
    k_big, v_big = (jnp.pad(x, pad, constant_values=jnp.nan) for x in (k, v))
    run = lambda k, v: np.asarray(
        prefill_attention(q, k, v, slots, starts, lengths, impl="interpret", block_q=16, block_k=16)
    )
    np.testing.assert_array_equal(run(k, v), run(k_big, v_big))


def test_auto_is_the_reference_on_cpu():
    inputs = make_inputs(4, [3], [8], [1], 2, 16, 8, 1, 2, 64)
    np.testing.assert_array_equal(np.asarray(prefill_attention(*inputs)), np.asarray(prefill_attention_ref(*inputs)))


def test_bad_arguments_are_refused():
    q, k, v, slots, starts, lengths = make_inputs(5, [0], [4], [0], 1, 16, 4, 2, 2, 64)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        prefill_attention(q[:, :, :3], k, v, slots, starts, lengths)
    with pytest.raises(ValueError, match="slots must have shape"):
        prefill_attention(q, k, v, slots[:0], starts, lengths)
    with pytest.raises(ValueError, match="block_q must be a power of two"):
        prefill_attention(q, k, v, slots, starts, lengths, impl="interpret", block_q=24)
    with pytest.raises(ValueError, match="power-of-two head size"):
        prefill_attention(q[..., :48], k[..., :48], v[..., :48], slots, starts, lengths, impl="interpret")


def test_default_tiling():
    assert default_tiling(128, 2) == (128, 64, 8)
    assert default_tiling(256, 2) == (64, 64, 8)
    assert default_tiling(256, 4) == (64, 32, 8)
    assert default_tiling(64, 2) == (128, 64, 4)
