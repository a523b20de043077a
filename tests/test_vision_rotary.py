"""CPU tests of the vision rotary: the reference against HF's torch code, the kernel (Pallas interpreter, which
fills outputs with NaN before the call) against the reference."""

import numpy as np
import pytest

import jax.numpy as jnp

from pallas_kernels.vision_rotary import apply_vision_rotary, vision_rotary_tables


def make_inputs(seed, num_tokens, num_heads, head_dim, max_position, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(dtype)
    k = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(dtype)
    pos_hw = rng.integers(0, max_position, (num_tokens, 2)).astype(np.int32)
    return q, k, pos_hw


def hf_rotary(q, k, pos_hw, head_dim, theta=10000.0):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = torch.tensor(pos_hw)[..., None].float() * inv_freq  # [N, 2, head_dim/4], as HF's forward
    cos, sin = (torch.cat([f[:, 0], f[:, 1]], -1) for f in (freqs.cos(), freqs.sin()))
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    q_hf, k_hf = hf.apply_rotary_pos_emb_vision(torch.tensor(q), torch.tensor(k), cos, sin)
    return q_hf.numpy(), k_hf.numpy()


@pytest.mark.parametrize("impl", ["reference", "interpret"])
@pytest.mark.parametrize("num_tokens, num_heads, head_dim", [(37, 3, 80), (64, 16, 72), (5, 2, 16)])
def test_matches_hf(impl, num_tokens, num_heads, head_dim):
    q, k, pos_hw = make_inputs(num_tokens + head_dim, num_tokens, num_heads, head_dim, 48)
    cos, sin = vision_rotary_tables(head_dim, 48)
    assert cos.shape == (48, head_dim // 4) and cos.dtype == jnp.float32
    q_rot, k_rot = apply_vision_rotary(jnp.asarray(q), jnp.asarray(k), jnp.asarray(pos_hw), cos, sin, impl=impl)
    q_hf, k_hf = hf_rotary(q, k, pos_hw, head_dim)
    for out, ref in ((q_rot, q_hf), (k_rot, k_hf)):
        out = np.asarray(out)
        assert np.all(np.isfinite(out))
        assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bf16_kernel_matches_reference():
    q, k, pos_hw = make_inputs(1, 29, 4, 80, 32)
    q, k = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    cos, sin = vision_rotary_tables(80, 32)
    ref = apply_vision_rotary(q, k, jnp.asarray(pos_hw), cos, sin, impl="reference")
    out = apply_vision_rotary(q, k, jnp.asarray(pos_hw), cos, sin, impl="interpret")
    for o, r in zip(out, ref):
        assert o.dtype == jnp.bfloat16
        # Same fp32 math, same single rounding to bf16.
        assert np.array_equal(np.asarray(o, np.float32), np.asarray(r, np.float32))


def test_rejects_head_dim_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        vision_rotary_tables(18, 8)
