"""Compiled routed-expert kernels (Triton) against the reference on the GPU at the real models' expert shapes:
fp32 at full precision, bf16 within 1e-2 relative, and no read of an expert no token routes to."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.moe_matmul import moe_experts, moe_experts_ref
from tests.test_moe_matmul import rel_err


def device_inputs(seed, num_tokens, top_k, num_experts, hidden, intermediate, dtype, routed=None):
    """Random tokens, weights and routing, made on the device; each token picks top_k distinct experts among
    `routed` (all by default)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    routed = jnp.arange(num_experts) if routed is None else jnp.asarray(routed)
    _, picks = jax.lax.top_k(jax.random.uniform(ks[0], (num_tokens, routed.size)), top_k)
    experts_nk = routed[picks].astype(jnp.int32)
    weights_nk = jax.nn.softmax(jax.random.normal(ks[1], (num_tokens, top_k)), axis=-1).astype(dtype)
    x_nd = jax.random.normal(ks[2], (num_tokens, hidden), dtype)
    gate_up_edf = (jax.random.normal(ks[3], (num_experts, hidden, 2 * intermediate)) * hidden**-0.5).astype(dtype)
    down_efd = (jax.random.normal(ks[4], (num_experts, intermediate, hidden)) * intermediate**-0.5).astype(dtype)
    return x_nd, experts_nk, weights_nk, gate_up_edf, down_efd


CASES = [  # tokens, top_k, experts, hidden (D), intermediate (F)
    (1, 8, 256, 2048, 512),  # Qwen3.5-35B-A3B decode, 16-row blocks
    (64, 8, 256, 2048, 512),
    (1000, 8, 256, 2048, 512),  # prefill: 64-row blocks
    (5, 8, 128, 2048, 768),  # Qwen3-VL-30B-A3B
    (600, 8, 128, 2048, 768),
    (3, 8, 128, 4096, 1536),  # Qwen3-VL-235B-A22B
]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens, top_k, num_experts, hidden, intermediate", CASES)
def test_kernels_match_reference(dtype, tol, num_tokens, top_k, num_experts, hidden, intermediate):
    inputs = device_inputs(num_tokens, num_tokens, top_k, num_experts, hidden, intermediate, dtype)
    with jax.default_matmul_precision("highest"):
        ref = moe_experts_ref(*inputs)
        out = jax.jit(lambda *a: moe_experts(*a, impl="pallas"))(*inputs)
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("num_tokens, block_m", [(1, None), (64, None), (64, 64), (1000, None)])
def test_unrouted_experts_are_never_read(num_tokens, block_m):
    """Qwen3.5 shapes, every token on 8 of 24 experts (never expert 0, which blocks past the end name); the
    other 232 experts' weights are NaN, so any read of them would reach the output."""
    routed = np.arange(5, 245, 10)
    x_nd, experts_nk, weights_nk, gate_up_edf, down_efd = device_inputs(
        7, num_tokens, 8, 256, 2048, 512, jnp.bfloat16, routed=routed
    )
    ref = moe_experts_ref(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd)
    unrouted = np.setdiff1d(np.arange(256), routed)
    gate_up_edf = gate_up_edf.at[unrouted].set(jnp.nan)
    down_efd = down_efd.at[unrouted].set(jnp.nan)
    out = moe_experts(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd, impl="pallas", block_m=block_m)
    assert rel_err(out, ref) < 1e-2
