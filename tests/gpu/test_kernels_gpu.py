"""Compiled kernels (Triton; Mosaic GPU for the wide-grid chunk scan) against the pure-JAX references on the
GPU: fp32 at full precision, bf16 within 1e-2 relative, and the decode/prefill state updated in place through a
donated buffer."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import (
    chunk_gated_delta_rule_ref,
    gated_delta_rule,
    recurrent_gated_delta_rule_ref,
)
from pallas_kernels.device_info import multiprocessors
from pallas_kernels.gated_delta_rule.chunk import _scan_backend, _scan_tiling, chunk_prefill
from pallas_kernels.gated_delta_rule.recurrent import recurrent_decode
from pallas_kernels.vision_rotary import apply_vision_rotary, vision_rotary_tables
from tests.test_gated_delta_rule import (
    check_chunk_kernel_keeps_nan_pads_out,
    check_mosaic_scan_keeps_nan_pads_out,
    make_inputs,
    rel_err,
)


CASES = [  # batch, seq_len, Hk, Hv, ragged
    (3, 1, 16, 32, True),
    (2, 200, 2, 4, True),
    (1, 256, 4, 12, False),
    (4, 65, 2, 2, True),
]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("batch, seq_len, num_k, num_v, ragged", CASES)
def test_gated_delta_rule_matches_reference(dtype, tol, batch, seq_len, num_k, num_v, ragged):
    q, k, v, g, beta, state = make_inputs(seq_len * 7 + batch, batch, seq_len, num_k, num_v, 128, 128, dtype)
    lengths = None
    if ragged:
        lengths = jnp.asarray(np.random.default_rng(seq_len).integers(0, seq_len + 1, batch), jnp.int32)
    ref = recurrent_gated_delta_rule_ref if seq_len == 1 else chunk_gated_delta_rule_ref
    with jax.default_matmul_precision("highest"):
        # The reference sees the same (rounded) inputs, upcast: only the kernel's arithmetic is compared.
        up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        o_ref, s_ref = ref(*up, initial_state=state, lengths=lengths)
        o, s = jax.jit(functools.partial(gated_delta_rule, impl="pallas"))(
            q, k, v, g, beta, initial_state=state, lengths=lengths
        )
    assert o.dtype == dtype and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < tol
    assert rel_err(s, s_ref) < tol


@pytest.mark.parametrize("scan", ["triton", "mosaic"])
def test_chunk_kernel_with_the_wide_grids_of_large_batches(scan):
    """Past two waves of 32-wide programs the Triton scan takes 64-wide tiles and the default scan is the
    Mosaic GPU one (bf16): both, at Qwen3.5's heads on ragged rows."""
    batch = 2 * multiprocessors() // 128 + 1
    assert _scan_tiling(batch, 32, 128, 128, 2, None, None)[0] == 64
    assert _scan_backend(None, jnp.bfloat16, jnp.bfloat16, batch, 32, 128, 128, 256) == "mosaic"
    q, k, v, g, beta, state = make_inputs(11, batch, 200, 16, 32, 128, 128, jnp.bfloat16)
    lengths = jnp.asarray(np.random.default_rng(3).integers(0, 201, batch), jnp.int32)
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        o_ref, s_ref = chunk_gated_delta_rule_ref(*up, initial_state=state, lengths=lengths)
        o, s = jax.jit(functools.partial(chunk_prefill, scale=128**-0.5, scan=scan))(
            q, k, v, g, beta, state, lengths
        )
    assert rel_err(s, s_ref) < 1e-2
    for b, length in enumerate(np.asarray(lengths)):
        if length:
            assert rel_err(o[b, :length], o_ref[b, :length]) < 1e-2


def test_mosaic_scan_keeps_nan_pads_out():
    with jax.default_matmul_precision("highest"):
        check_mosaic_scan_keeps_nan_pads_out(interpret=False)


@pytest.mark.parametrize("dtype, tol, prep_heads", [(jnp.float32, 1e-5, 2), (jnp.bfloat16, 1e-2, 2),
                                                    (jnp.float32, 1e-5, 4)])
def test_chunk_prep_shared_by_value_heads_of_a_key_head(dtype, tol, prep_heads):
    """Prep programs that serve two or four value heads of one key head (what large grids get), compiled."""
    q, k, v, g, beta, state = make_inputs(13, 2, 200, 2, 8, 128, 128, dtype)
    lengths = jnp.asarray([200, 131], jnp.int32)
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        o_ref, s_ref = chunk_gated_delta_rule_ref(*up, initial_state=state, lengths=lengths)
        o, s = jax.jit(functools.partial(chunk_prefill, scale=128**-0.5, prep_heads=prep_heads))(
            q, k, v, g, beta, state, lengths
        )
    assert rel_err(s, s_ref) < tol
    assert rel_err(o[0], o_ref[0]) < tol and rel_err(o[1, :131], o_ref[1, :131]) < tol
    assert np.all(np.asarray(o[1, 131:]) == 0.0)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_chunk_kernel_keeps_nan_pads_out(dtype, tol):
    with jax.default_matmul_precision("highest"):
        check_chunk_kernel_keeps_nan_pads_out("pallas", 128, 128, dtype, tol)


@pytest.mark.parametrize("seq_len, batch", [(1, 4), (128, 1), (128, 4)])
def test_state_updated_in_place_when_donated(seq_len, batch):
    """Decode, and prefill through either scan: B1 takes the Triton one (aliased outputs), B4 the Mosaic GPU
    one (the state passed as a mutable array)."""
    q, k, v, g, beta, state = make_inputs(seq_len, batch, seq_len, 16, 32, 128, 128, jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        ref = recurrent_gated_delta_rule_ref if seq_len == 1 else chunk_gated_delta_rule_ref
        _, s_ref = ref(*up, initial_state=state)
    step = jax.jit(
        lambda s, *xs: gated_delta_rule(*xs, initial_state=s, impl="pallas")[1], donate_argnums=0
    )
    donated = jnp.array(state)
    pointer = donated.unsafe_buffer_pointer()
    new_state = step(donated, q, k, v, g, beta)
    assert donated.is_deleted()
    assert new_state.unsafe_buffer_pointer() == pointer, "state was copied, not updated in place"
    assert rel_err(new_state, s_ref) < 1e-2


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("state_first", [False, True])
def test_decode_kernel_with_either_state_read_order(state_first, dtype, tol):
    """Qwen3.5 heads at a batch whose grid is past the state_read_first switch, pad rows included."""
    batch = 40
    q, k, v, g, beta, state = make_inputs(batch, batch, 1, 16, 32, 128, 128, dtype)
    lengths = jnp.asarray(np.arange(batch) % 5 != 0, jnp.int32)
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
        o_ref, s_ref = recurrent_gated_delta_rule_ref(*up, initial_state=state, lengths=lengths)
        o, s = recurrent_decode(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], jnp.array(state), lengths,
                                scale=128**-0.5, state_first=state_first)
    assert rel_err(o, o_ref[:, 0]) < tol and rel_err(s, s_ref) < tol
    assert np.array_equal(np.asarray(s[::5]), np.asarray(state[::5]))  # pad rows: state bit-identical


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_tokens, num_heads, head_dim", [(1000, 16, 80), (333, 16, 72), (64, 4, 64)])
def test_vision_rotary_matches_reference(dtype, num_tokens, num_heads, head_dim):
    rng = np.random.default_rng(num_tokens)
    q = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)
    pos_hw = jnp.asarray(rng.integers(0, 100, (num_tokens, 2)), jnp.int32)
    cos, sin = vision_rotary_tables(head_dim, 100)
    ref = apply_vision_rotary(q, k, pos_hw, cos, sin, impl="reference")
    out = apply_vision_rotary(q, k, pos_hw, cos, sin, impl="pallas")
    for o, r in zip(out, ref):
        assert o.dtype == dtype
        # fp32: identical formula, so only contraction of a*b+c*d into FMAs separates them.
        assert rel_err(o, r) < (1e-6 if dtype == jnp.float32 else 1e-2)


def test_qwen3_5_logits_with_kernels_on_and_off(monkeypatch):
    """The tiny Qwen3.5 decoder (Dk = Dv = 16, so the kernels apply) gives the same logits on every real
    token whether its Gated DeltaNet layers run the Pallas kernels or the references."""
    from flax import nnx

    from qwenvl_jax.config import parse_config
    from qwenvl_jax.models import gated_deltanet
    from qwenvl_jax.models.model import QwenVLModel
    from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict

    cfg = parse_config(hf_config_dict("qwen3_5", *TINY_CONFIGS["qwen3_5"]))
    model = QwenVLModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    batch, seq_len = 2, 150
    ids = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, cfg.text.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (3, batch, seq_len))
    lengths = jnp.array([seq_len, 77], jnp.int32)

    def logits(impl):
        monkeypatch.setattr(gated_deltanet, "gated_delta_rule", functools.partial(gated_delta_rule, impl=impl))
        with jax.default_matmul_precision("highest"):
            return np.asarray(model.text_logits(ids, positions, lengths))

    on, off = logits("pallas"), logits("reference")
    for b, length in enumerate(np.asarray(lengths)):
        assert rel_err(on[b, :length], off[b, :length]) < 1e-4
