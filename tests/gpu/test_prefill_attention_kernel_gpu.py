"""The compiled prefill-attention kernel (Triton, over the cache in place) against the pure-JAX reference on the
GPU: fp32 at full precision (1e-4 relative still fails a TF32 product), bf16 within 1e-2, at the head layouts
of every family; ragged starts and lengths, rows reading slots in scrambled order, caches poisoned with NaN
wherever a row must not read (other slots, and from start + length on)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.prefill_attention import prefill_attention, prefill_attention_ref
from tests.test_prefill_attention import assert_padding_is_zero, make_inputs, rel_err

CASES = [  # kv heads, group, head_dim, seq_len, max_len, starts, lengths, slots, num_slots
    (4, 7, 128, 512, 3000, [1000, 0, 2487, 40], [512, 300, 1, 0], [3, 0, 4, 1], 5),  # Qwen2.5-VL-7B: 28 / 4
    (4, 4, 256, 1024, 4200, [3000, 0], [1024, 999], [1, 2], 3),  # Qwen3.5-9B: 16 / 4, D = 256
    (4, 6, 256, 256, 1000, [700, 333, 5], [256, 100, 0], [2, 0, 1], 4),  # Qwen3.5-27B: 24 / 4
    (8, 4, 128, 384, 2000, [1500, 77], [384, 200], [0, 2], 3),  # Qwen3-VL-8B: 32 / 8
    (4, 8, 128, 300, 900, [599, 1], [300, 129], [1, 0], 2),  # Qwen3-VL-30B-A3B: 32 / 4
    (4, 16, 128, 256, 800, [500, 0], [256, 129], [2, 1], 3),  # Qwen3-VL-235B: 64 / 4
    (2, 1, 64, 128, 300, [100, 3], [128, 64], [1, 0], 2),
]


def check_against_reference(seed, num_kv, group, head_dim, seq_len, max_len, starts, lengths, slots, num_slots,
                            dtype, tol, **tiling):
    q, k, v, slots, starts, lengths = make_inputs(
        seed, starts, lengths, slots, num_slots, max_len, seq_len, num_kv, group, head_dim, dtype
    )
    with jax.default_matmul_precision("highest"):
        # The reference sees the same (rounded) inputs, upcast: only the kernel's arithmetic is compared.
        ref = prefill_attention_ref(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                    slots, starts, lengths)
        out = prefill_attention(q, k, v, slots, starts, lengths, impl="pallas", **tiling)
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    assert_padding_is_zero(out, lengths)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_kv, group, head_dim, seq_len, max_len, starts, lengths, slots, num_slots", CASES)
def test_kernel_matches_reference(dtype, tol, num_kv, group, head_dim, seq_len, max_len, starts, lengths, slots,
                                  num_slots):
    check_against_reference(seq_len + group, num_kv, group, head_dim, seq_len, max_len, starts, lengths, slots,
                            num_slots, dtype, tol)


@pytest.mark.parametrize(
    "head_dim, block_q, block_k, num_warps, num_stages",
    [(128, 64, 32, 4, 2), (128, 128, 64, 8, 3), (128, 128, 128, 8, 2), (128, 32, 64, 4, 1), (256, 64, 64, 8, 2),
     (256, 32, 32, 4, 3)],
)
def test_kernel_tilings(head_dim, block_q, block_k, num_warps, num_stages):
    check_against_reference(
        5, 4, 7, head_dim, 300, 1000, [611, 0, 99], [300, 257, 1], [2, 3, 0], 4, jnp.bfloat16, 1e-2,
        block_q=block_q, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
    )


def test_long_prefix_chunk():
    """A 2048-token chunk of Qwen3.5-9B's attention after a 30K prefix, in a 32K cache with a spare slot."""
    check_against_reference(7, 4, 4, 256, 2048, 32768 + 64, [30000], [2048], [1], 2, jnp.bfloat16, 1e-2)


def test_result_does_not_depend_on_cache_size():
    """The same rows in a 1000- and an 8192-position cache with more slots (NaN past the rows) run the same
    blocks."""
    q, k, v, slots, starts, lengths = make_inputs(9, [600, 0], [400, 333], [1, 0], 2, 1000, 400, 4, 4, 256)
    pad = ((0, 3), (0, 8192 - 1000), (0, 0), (0, 0))
    k_big, v_big = (jnp.pad(x, pad, constant_values=jnp.nan) for x in (k, v))
    small = prefill_attention(q, k, v, slots, starts, lengths, impl="pallas")
    big = prefill_attention(q, k_big, v_big, slots, starts, lengths, impl="pallas")
    assert rel_err(big, small) < 1e-6
