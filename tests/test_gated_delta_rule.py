"""CPU tests of the gated delta rule: references against HF's torch code, kernels (Pallas interpreter) against
the references. The interpreter fills kernel outputs with NaN before the call, so an unwritten element fails."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule import (
    chunk_gated_delta_rule_ref,
    gated_delta_rule,
    gated_delta_rule_tokens_slots,
    recurrent_gated_delta_rule_ref,
)
from pallas_kernels.device_info import multiprocessors
from pallas_kernels.gated_delta_rule.chunk import _prep_heads, _scan_backend, _scan_tiling, chunk_prefill
from pallas_kernels.gated_delta_rule.recurrent import recurrent_decode, state_read_first

jax.config.update("jax_default_matmul_precision", "highest")


def make_inputs(seed, batch, seq_len, num_k_heads, num_v_heads, head_k, head_v, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (batch, seq_len, num_k_heads, head_k), dtype)
    k = jax.random.normal(ks[1], (batch, seq_len, num_k_heads, head_k), dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, num_v_heads, head_v), dtype)
    # Real gates: g = -exp(A_log) * softplus(a + dt_bias) <= 0, beta = sigmoid(b).
    g = -jnp.exp(0.3 * jax.random.normal(ks[3], (num_v_heads,))) * jax.nn.softplus(
        jax.random.normal(ks[4], (batch, seq_len, num_v_heads))
    )
    beta = jax.nn.sigmoid(jax.random.normal(ks[5], (batch, seq_len, num_v_heads))).astype(dtype)
    state = jax.random.normal(jax.random.fold_in(ks[5], 1), (batch, num_v_heads, head_k, head_v))
    return q, k, v, g, beta, state


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite values (unwritten output?)"
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("seq_len, num_k_heads, num_v_heads", [(1, 2, 4), (65, 2, 6), (130, 1, 1)])
def test_references_match_hf_torch(seq_len, num_k_heads, num_v_heads):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    q, k, v, g, beta, state = make_inputs(seq_len, 2, seq_len, num_k_heads, num_v_heads, 16, 32)
    t = [torch.tensor(np.asarray(x)) for x in (q, k, v, g, beta, state)]
    kwargs = dict(initial_state=t[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_hf, s_hf = hf.torch_recurrent_gated_delta_rule(*t[:5], **kwargs)
    oc_hf, sc_hf = hf.torch_chunk_gated_delta_rule(*t[:5], chunk_size=64, **kwargs)
    o_rec, s_rec = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=state)
    o_chunk, s_chunk = chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=state)
    assert rel_err(o_rec, o_hf.numpy()) < 1e-5 and rel_err(s_rec, s_hf.numpy()) < 1e-5
    assert rel_err(o_chunk, oc_hf.numpy()) < 1e-5 and rel_err(s_chunk, sc_hf.numpy()) < 1e-5


def test_lengths_equal_truncated_rows_and_pads_are_inert():
    q, k, v, g, beta, state = make_inputs(7, 3, 70, 2, 4, 16, 32)
    lengths = np.array([70, 33, 0])
    # Pad slots hold NaN: `where`-masking must keep them out of every real output and the state.
    pad = (np.arange(70)[None, :] >= lengths[:, None])[:, :, None, None]
    q_nan, k_nan, v_nan = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    for ref in (chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref):
        o, s = ref(q_nan, k_nan, v_nan, g, beta, initial_state=state, lengths=jnp.asarray(lengths))
        for b, length in enumerate(lengths):
            o_b, s_b = recurrent_gated_delta_rule_ref(
                q[b : b + 1, :length], k[b : b + 1, :length], v[b : b + 1, :length],
                g[b : b + 1, :length], beta[b : b + 1, :length], initial_state=state[b : b + 1],
            )
            assert rel_err(s[b], s_b[0]) < 1e-5
            if length:
                assert rel_err(o[b, :length], o_b[0]) < 1e-5
            assert np.all(np.asarray(o[b, length:]) == 0.0)
        assert np.array_equal(np.asarray(s[2]), np.asarray(state[2]))  # a row of only padding


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_zero_gates_leave_state_exactly_unchanged(impl):
    """The model also masks padding by g = 0, beta = 0: the state must come back bit-identical."""
    q, k, v, g, beta, state = make_inputs(3, 2, 65, 1, 2, 16, 32)
    o, s = gated_delta_rule(q, k, v, jnp.zeros_like(g), jnp.zeros_like(beta), initial_state=state, impl=impl)
    assert np.array_equal(np.asarray(s), np.asarray(state))
    o1, s1 = gated_delta_rule(
        q[:, :1], k[:, :1], v[:, :1], jnp.zeros_like(g[:, :1]), jnp.zeros_like(beta[:, :1]),
        initial_state=state, impl=impl,
    )
    assert np.array_equal(np.asarray(s1), np.asarray(state))


KERNEL_CASES = [
    # (batch, seq_len, Hk, Hv, Dk, Dv, initial state, ragged lengths)
    (2, 1, 2, 4, 16, 64, True, False),
    (3, 1, 2, 6, 32, 32, False, True),
    (1, 63, 1, 1, 16, 32, True, False),
    (2, 64, 2, 4, 32, 16, False, True),
    (2, 65, 2, 6, 16, 128, True, True),
    (2, 200, 1, 2, 16, 32, True, True),
]


@pytest.mark.parametrize("batch, seq_len, num_k, num_v, head_k, head_v, with_state, ragged", KERNEL_CASES)
def test_interpreted_kernels_match_reference(batch, seq_len, num_k, num_v, head_k, head_v, with_state, ragged):
    q, k, v, g, beta, state = make_inputs(seq_len + batch, batch, seq_len, num_k, num_v, head_k, head_v)
    initial_state = state if with_state else None
    lengths = None
    if ragged:
        lengths = jnp.asarray(np.random.default_rng(seq_len).integers(0, seq_len + 1, batch).astype(np.int32))
    ref = recurrent_gated_delta_rule_ref if seq_len == 1 else chunk_gated_delta_rule_ref
    o_ref, s_ref = ref(q, k, v, g, beta, initial_state=initial_state, lengths=lengths)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, lengths=lengths, impl="interpret")
    assert o.shape == o_ref.shape and o.dtype == v.dtype and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("state_first", [False, True])
def test_interpreted_decode_matches_reference_with_either_state_read_order(state_first):
    q, k, v, g, beta, state = make_inputs(7, 3, 1, 2, 4, 16, 32)
    lengths = jnp.asarray([1, 0, 1], jnp.int32)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=state, lengths=lengths)
    o, s = recurrent_decode(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, lengths, scale=16**-0.5,
                            block_v=16, state_first=state_first, interpret=True)
    assert rel_err(o, o_ref[:, 0]) < 1e-5 and rel_err(s, s_ref) < 1e-5
    assert np.array_equal(np.asarray(s[1]), np.asarray(state[1]))  # the pad row's state is untouched


@pytest.mark.parametrize("tokens", [2, 3, 5])
def test_interpreted_tokens_kernel_matches_reference_in_the_slot_pool(tokens):
    """A speculative verify pass (outputs, pool untouched) and its commit (first lengths[b] tokens applied to
    slot b in place): rows past the batch and zero-length rows keep their slots bit-identical."""
    q, k, v, g, beta, _ = make_inputs(11, 3, tokens, 2, 4, 16, 32)
    pool = jnp.asarray(np.random.default_rng(tokens).normal(size=(5, 4, 16, 32)) * 0.1, jnp.float32)
    full = jnp.full((3,), tokens, jnp.int32)
    o_ref, _ = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=pool[:3], lengths=full)
    o, same = gated_delta_rule_tokens_slots(q, k, v, g, beta, pool, full, outputs=True, advance=False,
                                            impl="interpret")
    assert rel_err(o, o_ref) < 1e-5 and same is pool
    lengths = jnp.asarray([tokens, 1, 0], jnp.int32)
    _, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=pool[:3], lengths=lengths)
    none, advanced = gated_delta_rule_tokens_slots(q, k, v, g, beta, pool, lengths, outputs=False, advance=True,
                                                   impl="interpret")
    assert none is None and rel_err(advanced[:3], s_ref) < 1e-5
    assert np.array_equal(np.asarray(advanced[2:]), np.asarray(pool[2:]))


def test_tokens_kernel_writes_every_output_element():
    """The interpreter leaves unwritten output elements NaN: a tile or token the kernel skips fails here."""
    from pallas_kernels.gated_delta_rule.recurrent import recurrent_tokens

    q, k, v, g, beta, _ = make_inputs(12, 2, 3, 2, 4, 16, 32)
    pool = jnp.zeros((2, 4, 16, 32), jnp.float32)
    o, _ = recurrent_tokens(q, k, v, g, beta, pool, jnp.asarray([3, 1], jnp.int32), scale=16**-0.5,
                            outputs=True, advance=False, block_v=16, interpret=True)
    assert o.shape == v.shape and not np.isnan(np.asarray(o, np.float32)).any()


def test_decode_reads_the_state_first_only_past_eight_programs_per_sm():
    sms = multiprocessors()
    assert not state_read_first(8 * sms) and state_read_first(8 * sms + 1)
    # Qwen3.5 heads (Hv 32, Dv 128, 64-wide tiles: 64 programs per row) on an H200's 132 SMs: B8 not, B64 yes.
    if sms == 132:
        assert not state_read_first(8 * 64) and state_read_first(64 * 64)


def check_interpreted_chunk_prefill(seed, num_k, num_v, head_v, lengths, **tiling):
    """chunk_prefill in the interpreter against the reference on two ragged rows (the first one full)."""
    q, k, v, g, beta, state = make_inputs(seed, len(lengths), lengths[0], num_k, num_v, 16, head_v)
    lengths = jnp.asarray(lengths, jnp.int32)
    o_ref, s_ref = chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state=state, lengths=lengths)
    o, s = chunk_prefill(q, k, v, g, beta, state, lengths, scale=16**-0.5, interpret=True, **tiling)
    assert rel_err(s, s_ref) < 1e-5
    for b, length in enumerate(np.asarray(lengths)):
        assert rel_err(o[b, :length], o_ref[b, :length]) < 1e-5


@pytest.mark.parametrize("block_v", [16, 64, 128])
def test_interpreted_chunk_scan_matches_reference_at_every_tile_width(block_v):
    """Tile widths other than the small cases' default: the wide tiles are what large batches get on a GPU."""
    check_interpreted_chunk_prefill(7, 2, 4, 128, [65, 40], block_v=block_v)


@pytest.mark.parametrize("prep_heads", [1, 2, 4])
def test_interpreted_chunk_prep_shares_key_heads_across_value_heads(prep_heads):
    """Four value heads per key head, prepared one, two or four to a program: each value head must still get
    its own gates and system (a program mixing up its heads' gates or output slots fails here)."""
    check_interpreted_chunk_prefill(9, 2, 8, 32, [100, 57], prep_heads=prep_heads)


def test_chunk_prep_refuses_a_head_count_that_does_not_divide_the_group():
    q, k, v, g, beta, state = make_inputs(9, 1, 64, 2, 8, 16, 32)
    with pytest.raises(ValueError, match="power of two dividing"):
        chunk_prefill(q, k, v, g, beta, state, jnp.asarray([64], jnp.int32), scale=1.0, prep_heads=3, interpret=True)


def test_scan_tiling_widens_tiles_only_past_two_waves_of_narrow_ones():
    sms = multiprocessors()
    narrow_programs_per_row = 32 * 128 // 32  # Qwen3.5: 32 value heads of 128
    few, many = (2 * sms) // narrow_programs_per_row, (2 * sms) // narrow_programs_per_row + 1
    assert _scan_tiling(few, 32, 128, 128, 2, None, None)[0] == 32
    assert _scan_tiling(many, 32, 128, 128, 2, None, None) == (64, 3)
    assert _scan_tiling(many, 32, 128, 128, 4, None, None)[0] == 32  # fp32 stages would not fit twice
    assert _scan_tiling(many, 32, 128, 32, 2, None, None)[0] == 32  # head too narrow for a 64-wide tile
    assert _scan_tiling(1, 32, 128, 128, 2, None, None) == (32, 3)  # one wave: deep prefetch
    assert _scan_tiling(many, 32, 128, 128, 2, 32, None) == (32, 2)  # a caller's width is kept


def test_prep_shares_key_heads_only_while_the_grid_fills_the_gpu():
    sms = multiprocessors()
    assert _prep_heads(1, 32, 2, 4096 // 64) == 2  # Qwen3.5 at 1x4096: 1024 shared programs
    assert _prep_heads(1, 32, 2, 512 // 64) == 1  # 1x512: sharing would leave 128 programs
    assert _prep_heads(1, 32, 3, 4096 // 64) == 1  # three heads per key head: no power-of-two block of them
    assert _prep_heads(1, 64, 4, 4 * sms) == 4
    assert _prep_heads(1, 64, 4, -(-4 * sms // 32)) == 2  # 32 programs a chunk: enough at 2 heads, not 4


def check_chunk_kernel_keeps_nan_pads_out(impl, head_k, head_v, dtype=jnp.float32, tol=1e-5):
    """Rows ending on a chunk boundary (128) and inside one (70), a full row and an empty one: the scan's
    unmasked loop must stop at the last whole chunk of each row and its masked loop keep NaN pads out."""
    q, k, v, g, beta, state = make_inputs(5, 4, 200, 1, 2, head_k, head_v, dtype)
    lengths = np.array([200, 128, 70, 0])
    pad = (np.arange(200)[None, :] >= lengths[:, None])[:, :, None, None]
    q_nan, k_nan, v_nan = (jnp.where(pad, jnp.nan, x).astype(dtype) for x in (q, k, v))
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, s_ref = chunk_gated_delta_rule_ref(*up, initial_state=state, lengths=jnp.asarray(lengths))
    o, s = gated_delta_rule(q_nan, k_nan, v_nan, g, beta, initial_state=state, lengths=jnp.asarray(lengths),
                            impl=impl)
    assert rel_err(s, s_ref) < tol
    for b, length in enumerate(lengths):
        if length:
            assert rel_err(o[b, :length], o_ref[b, :length]) < tol
        assert np.all(np.asarray(o[b, length:]) == 0.0)


def test_interpreted_chunk_kernel_keeps_nan_pads_out():
    check_chunk_kernel_keeps_nan_pads_out("interpret", 16, 32)


def check_mosaic_scan_keeps_nan_pads_out(interpret):
    """The Mosaic GPU scan (bf16 only) on ragged rows with NaN pads, rows ending on a chunk boundary and inside
    one, a full row and an empty one: against the fp32 reference at bf16 level, and against the Triton scan on
    the same prep outputs, which rounds at the same points, far tighter."""
    q, k, v, g, beta, state = make_inputs(5, 4, 200, 1, 2, 64, 128, jnp.bfloat16)
    lengths = np.array([200, 128, 70, 0])
    pad = (np.arange(200)[None, :] >= lengths[:, None])[:, :, None, None]
    q, k, v = (jnp.where(pad, jnp.nan, x).astype(jnp.bfloat16) for x in (q, k, v))
    up = [x.astype(jnp.float32) for x in (q, k, v, g, beta)]
    o_ref, s_ref = chunk_gated_delta_rule_ref(*up, initial_state=state, lengths=jnp.asarray(lengths))
    run = functools.partial(chunk_prefill, q, k, v, g, beta, state, jnp.asarray(lengths, jnp.int32),
                            scale=64**-0.5, interpret=interpret)
    (o, s), (o_triton, s_triton) = run(scan="mosaic"), run(scan="triton")
    assert rel_err(s, s_ref) < 1e-2 and rel_err(s, s_triton) < 1e-4
    for b, length in enumerate(lengths):
        if length:
            assert rel_err(o[b, :length], o_ref[b, :length]) < 1e-2
            assert rel_err(o[b, :length], o_triton[b, :length]) < 1e-4
        assert np.all(np.asarray(o[b, length:]) == 0.0)


def test_interpreted_mosaic_scan_keeps_nan_pads_out():
    check_mosaic_scan_keeps_nan_pads_out(interpret=True)


def test_scan_backend_takes_mosaic_only_past_a_wave_of_bf16_it_supports():
    sms = multiprocessors()
    bf16, fp32 = jnp.bfloat16, jnp.float32
    per_row = 32 * 128 // 32  # 32-wide programs of a Qwen3.5 row
    wide, one_wave = (2 * sms) // per_row + 1, sms // per_row + 1  # past two waves, past one but not two
    long_rows, short_rows = 4096, 2048
    assert _scan_backend(None, bf16, bf16, wide, 32, 128, 128, short_rows) == "mosaic"
    assert _scan_backend(None, bf16, bf16, one_wave, 32, 128, 128, long_rows) == "mosaic"
    assert _scan_backend(None, bf16, bf16, one_wave, 32, 128, 128, short_rows) == "triton"
    assert _scan_backend(None, bf16, bf16, 1, 48 * sms // 132, 128, 128, long_rows) == "mosaic"  # many heads
    assert _scan_backend(None, bf16, bf16, 1, 32, 128, 128, 4 * long_rows) == "triton"  # one per SM: chain counts
    assert _scan_backend(None, fp32, fp32, wide, 32, 128, 128, long_rows) == "triton"
    assert _scan_backend(None, bf16, bf16, 4 * wide, 32, 128, 32, long_rows) == "triton"  # no 64-wide tile
    assert _scan_backend("triton", bf16, bf16, wide, 32, 128, 128, long_rows) == "triton"
    with pytest.raises(ValueError, match="Mosaic GPU scan needs bf16"):
        _scan_backend("mosaic", fp32, fp32, wide, 32, 128, 128, long_rows)
    with pytest.raises(ValueError, match="scan must be"):
        _scan_backend("cuda", bf16, bf16, wide, 32, 128, 128, long_rows)


def test_dispatcher_jits_and_picks_reference_on_cpu():
    q, k, v, g, beta, state = make_inputs(11, 2, 1, 1, 2, 16, 32)
    step = jax.jit(lambda *a: gated_delta_rule(*a[:5], initial_state=a[5]), donate_argnums=5)
    o_ref, s_ref = recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state=state)
    o, s = step(q, k, v, g, beta, jnp.array(state))
    assert rel_err(o, o_ref) < 1e-6 and rel_err(s, s_ref) < 1e-6
    with pytest.raises(ValueError, match="multiple"):  # 3 value heads over 2 key heads
        gated_delta_rule(q.repeat(2, axis=2), k.repeat(2, axis=2), v[:, :, :1].repeat(3, axis=2), g, beta)
    with pytest.raises(ValueError, match="power-of-two"):
        gated_delta_rule(q[..., :12], k[..., :12], v, g, beta, impl="interpret")
