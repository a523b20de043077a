"""CPU tests of the routed-expert grouped matmuls: the reference against a float64 loop over tokens and experts,
the kernels (Pallas interpreter) against the reference. The interpreter fills kernel outputs with NaN before the
call, so a slot the kernels should have written and did not fails as a non-finite output."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.moe_matmul import _route, default_tiling, moe_experts, moe_experts_ref

jax.config.update("jax_default_matmul_precision", "highest")

HIDDEN, INTERMEDIATE, EXPERTS = 64, 32, 16


def make_inputs(seed, num_tokens, top_k, dtype=jnp.float32, experts=range(EXPERTS)):
    """Random tokens, weights and routing; each token picks top_k distinct experts among `experts`."""
    experts = np.asarray(experts)
    rng = np.random.default_rng(seed)
    x_nd = rng.standard_normal((num_tokens, HIDDEN))
    picks = np.argsort(rng.random((num_tokens, experts.size)), axis=-1)[:, :top_k]
    experts_nk = experts[picks].astype(np.int32)
    logits = rng.standard_normal((num_tokens, top_k))
    weights_nk = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    gate_up_edf = rng.standard_normal((EXPERTS, HIDDEN, 2 * INTERMEDIATE)) / HIDDEN**0.5
    down_efd = rng.standard_normal((EXPERTS, INTERMEDIATE, HIDDEN)) / INTERMEDIATE**0.5
    cast = lambda a: jnp.asarray(a, dtype)
    return cast(x_nd), jnp.asarray(experts_nk), cast(weights_nk), cast(gate_up_edf), cast(down_efd)


def numpy_experts(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd):
    """Float64, one (token, expert) pair at a time."""
    x_nd, weights_nk, gate_up_edf, down_efd = (np.asarray(a, np.float64)
                                               for a in (x_nd, weights_nk, gate_up_edf, down_efd))
    out_nd = np.zeros_like(x_nd)
    for n, row in enumerate(np.asarray(experts_nk)):
        for k, e in enumerate(row):
            gate_up = x_nd[n] @ gate_up_edf[e]
            gate, up = gate_up[:INTERMEDIATE], gate_up[INTERMEDIATE:]
            out_nd[n] += weights_nk[n, k] * ((gate / (1 + np.exp(-gate)) * up) @ down_efd[e])
    return out_nd


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite values (unwritten output?)"
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens, top_k", [(1, 4), (3, 2), (64, 4), (200, 4)])
def test_reference_matches_float64_loop(dtype, tol, num_tokens, top_k):
    inputs = make_inputs(num_tokens, num_tokens, top_k, dtype)
    out = moe_experts_ref(*inputs)
    assert out.dtype == dtype
    assert rel_err(out, numpy_experts(*inputs)) < tol


# N=1, 3, 64 are decode (16-row blocks: the default below 8 pairs per expert, forced at 64); N=200 prefill
# (the default past it, 64-row blocks; 50 pairs per expert on average, so experts span several blocks).
KERNEL_CASES = [  # num_tokens, top_k, block_m
    (1, 2, None),  # 2 pairs of 16 experts: one block per pair, no sort
    (1, 4, None),
    (3, 2, None),
    (64, 4, 16),
    (200, 4, None),
]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens, top_k, block_m", KERNEL_CASES)
def test_kernels_match_reference(dtype, tol, num_tokens, top_k, block_m):
    inputs = make_inputs(100 + num_tokens, num_tokens, top_k, dtype)
    out = moe_experts(*inputs, impl="interpret", block_m=block_m)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert rel_err(out, moe_experts_ref(*inputs)) < tol


@pytest.mark.parametrize("num_tokens, top_k, routed, block_m", [
    (1, 2, [5, 9], None),  # one block per pair
    (3, 4, [2, 5, 6, 9, 11, 12, 15], None),  # at most 7 of 16 experts, none of them 0 (what unused blocks name)
    (64, 2, [3, 7], 16),  # two experts take every token: 64 pairs each, four full blocks apiece
    (200, 3, [1, 4, 8], None),  # 200 pairs each at 64-row blocks: three full blocks and a padded one
])
def test_unrouted_experts_are_never_read(num_tokens, top_k, routed, block_m):
    """Experts no token picks have NaN weights: any read of them would reach the output."""
    x_nd, experts_nk, weights_nk, gate_up_edf, down_efd = make_inputs(num_tokens, num_tokens, top_k, experts=routed)
    ref = moe_experts_ref(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd)
    unrouted = np.setdiff1d(np.arange(EXPERTS), np.asarray(experts_nk))
    assert 0 in unrouted and unrouted.size >= EXPERTS - len(routed)
    gate_up_edf = gate_up_edf.at[unrouted].set(jnp.nan)
    down_efd = down_efd.at[unrouted].set(jnp.nan)
    out = moe_experts(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd, impl="interpret", block_m=block_m)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("num_tokens, block_m", [(3, 16), (100, 16), (200, 16), (200, 64)])
def test_live_blocks_name_only_routed_experts(num_tokens, block_m):
    """The kernels read the weights of block_expert[b] for b < num_blocks and nothing else: those blocks are
    each routed expert's cdiv(pairs, block_m), in expert order, and every pair has its own slot in one of its
    expert's blocks, recording its token. Up to 512 pairs (3 and 100 tokens of 4) the tables come from
    comparisons, past it (200) from scatters."""
    _, experts_nk, *_ = make_inputs(num_tokens, num_tokens, 4, experts=range(3, 12))
    num_blocks, block_expert, slot_token, pair_slot = map(np.asarray, _route(experts_nk, EXPERTS, block_m))
    experts = np.asarray(experts_nk).reshape(-1)
    blocks_per_expert = -(-np.bincount(experts, minlength=EXPERTS) // block_m)
    assert num_blocks[0] == blocks_per_expert.sum() <= block_expert.size
    np.testing.assert_array_equal(block_expert[:num_blocks[0]], np.repeat(np.arange(EXPERTS), blocks_per_expert))
    assert np.unique(pair_slot).size == pair_slot.size
    np.testing.assert_array_equal(block_expert[pair_slot // block_m], experts)
    np.testing.assert_array_equal(slot_token.reshape(-1)[pair_slot], np.arange(experts.size) // 4)


def test_auto_is_the_reference_off_gpu_and_bad_tiles_raise():
    inputs = make_inputs(7, 5, 4)
    assert jax.default_backend() != "gpu"
    np.testing.assert_array_equal(moe_experts(*inputs), moe_experts_ref(*inputs))
    with pytest.raises(ValueError, match="power of two"):
        moe_experts(*inputs, impl="interpret", gate_up_block_n=24)
    x_nd, experts_nk, weights_nk, gate_up_edf, down_efd = inputs
    # F = 48: the 32-wide gate/up column tiles do not divide it; "auto" falls back to the reference.
    gate_up_edf = jnp.concatenate([gate_up_edf[..., :48], gate_up_edf[..., :48]], axis=-1)
    down_efd = jnp.concatenate([down_efd, down_efd[:, :16]], axis=1)
    with pytest.raises(ValueError, match="does not divide F=48"):
        moe_experts(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd, impl="interpret")
    with pytest.raises(ValueError, match="share a dtype"):
        moe_experts(x_nd.astype(jnp.bfloat16), *inputs[1:], impl="interpret")


def test_default_tiling_switches_to_64_row_blocks_past_8_pairs_per_expert():
    """Qwen3.5-35B-A3B (top-8 of 256): decode up to 256 tokens takes 16-row blocks, prefill 64-row ones."""
    assert default_tiling(1, 8, 256).block_m == 16
    assert default_tiling(256, 8, 256).block_m == 16
    assert default_tiling(257, 8, 256).block_m == 64


def test_batches_of_few_pairs_give_each_pair_its_own_block():
    """At most E/8 pairs: block b is pair b (its expert, its token in every row), no sort."""
    _, experts_nk, *_ = make_inputs(5, 1, 2)
    num_blocks, block_expert, slot_token, pair_slot = map(np.asarray, _route(experts_nk, EXPERTS, 16))
    assert num_blocks[0] == block_expert.size == 2
    np.testing.assert_array_equal(block_expert, np.asarray(experts_nk).reshape(-1))
    assert (slot_token == 0).all()
    np.testing.assert_array_equal(pair_slot, [0, 16])


@pytest.mark.parametrize("num_tokens, top_k, block", [(1, 4, (32, 32)), (3, 2, (16, 32)), (64, 4, (32, 64))])
def test_interpreted_fp8_kernels_match_the_dequantized_reference(num_tokens, top_k, block):
    """FP8 experts (float8_e4m3fn, block scales: gate's blocks then up's on gate_up's last axis) against the
    reference on the dequantized weights; several blocks along every axis of the tiny experts."""
    from pallas_kernels.moe_matmul import Tiling, fp8_tiling_error, moe_experts_pallas
    from qwenvl_jax.models.fp8 import dequantize, scale_shape

    x, experts, weights, gate_up, down = make_inputs(7 + num_tokens, num_tokens, top_k, jnp.bfloat16)
    rng = np.random.default_rng(num_tokens)
    gate_up8, down8 = (w.astype(jnp.float8_e4m3fn) for w in (gate_up * 8, down * 8))
    gate_blocks = scale_shape(HIDDEN, INTERMEDIATE, block)
    gate_up_s = jnp.asarray(rng.uniform(0.05, 0.2, (EXPERTS, gate_blocks[0], 2 * gate_blocks[1])), jnp.float32)
    down_s = jnp.asarray(rng.uniform(0.05, 0.2, (EXPERTS, *scale_shape(INTERMEDIATE, HIDDEN, block))), jnp.float32)
    tiling = Tiling(block_m=16, gate_up_block_n=16, gate_up_block_k=32, down_block_n=16, down_block_k=16,
                    num_warps=4, num_stages=2)
    assert fp8_tiling_error(tiling, block) is None
    out = moe_experts_pallas(x, experts, weights, gate_up8, down8, (gate_up_s, down_s), tiling=tiling,
                             scale_block=block, interpret=True)
    deq = jax.vmap(lambda w, s: dequantize(w, s, block, jnp.float32))
    half = gate_blocks[1]
    gate_up_f = jnp.concatenate([deq(gate_up8[..., :INTERMEDIATE], gate_up_s[..., :half]),
                                 deq(gate_up8[..., INTERMEDIATE:], gate_up_s[..., half:])], axis=-1)
    want = moe_experts_ref(x.astype(jnp.float32), experts, weights.astype(jnp.float32), gate_up_f,
                           deq(down8, down_s))
    assert rel_err(out, want) < 2e-2
