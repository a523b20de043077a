"""Pure-JAX gated delta rule: the numerical reference the Pallas kernels are tested against.

State update per value head (S is [Dk, Dv], k and q L2-normalised, q scaled):
    S <- exp(g_t) * S
    S <- S + k_t (beta_t * (v_t - S^T k_t))^T
    o_t = S^T q_t
All math is fp32. Value head h reads q/k head h // (Hv // Hk), as HF's repeat_interleave does.
Tokens at t >= lengths[b] are padding: they leave the state exactly untouched and their outputs are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

L2NORM_EPS = 1e-6


def l2norm(x: jax.Array) -> jax.Array:
    """HF/FLA's q/k normalisation: x * rsqrt(sum(x^2) + 1e-6) over the last axis."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def prepare_inputs(q, k, v, g, beta, lengths, scale, use_qk_l2norm):
    """fp32 q/k/v/g/beta with q/k expanded to the value heads, normalised, and padding zeroed.

    Padding is neutralised with `where` (not multiplication) so that whatever sits in the pad slots,
    even NaN, cannot reach the state: g = 0 and beta = 0 make the update the identity, and q = 0 makes
    the pad outputs exactly 0.
    """
    seq_len, num_k_heads, head_k = q.shape[1:]
    num_v_heads = v.shape[2]
    if num_v_heads % num_k_heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    group = num_v_heads // num_k_heads
    q_bthk, k_bthk = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (q, k))
    if use_qk_l2norm:
        q_bthk, k_bthk = l2norm(q_bthk), l2norm(k_bthk)
    q_bthk = q_bthk * (head_k**-0.5 if scale is None else scale)
    v_bthv = v.astype(jnp.float32)
    g_bth, beta_bth = g.astype(jnp.float32), beta.astype(jnp.float32)
    if lengths is not None:
        valid_bt = jnp.arange(seq_len)[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
        valid_bth, valid_bth1 = valid_bt[:, :, None], valid_bt[:, :, None, None]
        q_bthk = jnp.where(valid_bth1, q_bthk, 0.0)
        k_bthk = jnp.where(valid_bth1, k_bthk, 0.0)
        v_bthv = jnp.where(valid_bth1, v_bthv, 0.0)
        g_bth = jnp.where(valid_bth, g_bth, 0.0)
        beta_bth = jnp.where(valid_bth, beta_bth, 0.0)
    return q_bthk, k_bthk, v_bthv, g_bth, beta_bth


def initial_state_fp32(initial_state, batch, num_v_heads, head_k, head_v):
    """The caller's state in fp32, or zeros [B, Hv, Dk, Dv] when there is none."""
    if initial_state is None:
        return jnp.zeros((batch, num_v_heads, head_k, head_v), jnp.float32)
    return initial_state.astype(jnp.float32)


def recurrent_gated_delta_rule_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token gated delta rule (`lax.scan` over T). Returns (o [B,T,Hv,Dv] v.dtype, state fp32)."""
    batch, _, _, head_k = q.shape
    num_v_heads, head_v = v.shape[2:]
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth = prepare_inputs(q, k, v, g, beta, lengths, scale, use_qk_l2norm)
    state_bhkv = initial_state_fp32(initial_state, batch, num_v_heads, head_k, head_v)

    def step(s_bhkv, xs):
        q_bhk, k_bhk, v_bhv, g_bh, beta_bh = xs
        s_bhkv = s_bhkv * jnp.exp(g_bh)[..., None, None]
        predicted_bhv = jnp.einsum("bhkv,bhk->bhv", s_bhkv, k_bhk, precision="highest")
        delta_bhv = (v_bhv - predicted_bhv) * beta_bh[..., None]
        s_bhkv = s_bhkv + k_bhk[..., :, None] * delta_bhv[..., None, :]
        o_bhv = jnp.einsum("bhkv,bhk->bhv", s_bhkv, q_bhk, precision="highest")
        return s_bhkv, o_bhv

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q_bthk, k_bthk, v_bthv, g_bth, beta_bth))
    state_bhkv, o_tbhv = lax.scan(step, state_bhkv, xs)
    return jnp.moveaxis(o_tbhv, 0, 1).astype(v.dtype), state_bhkv


def chunk_gated_delta_rule_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    lengths: jax.Array | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Chunked (WY/UT) gated delta rule, `lax.scan` over chunks. Same contract as the recurrent form.

    Inside a chunk with cumulative log-decay G, the C delta-rule updates collapse to
    (I + A) U = beta*v and (I + A) W = beta*exp(G)*k, with A = strict_lower(beta_i k_i.k_j exp(G_i - G_j));
    then per chunk: v_new = U - W S, o = (q exp(G)) S + tril(q k^T exp(G_i - G_j)) v_new,
    S <- exp(G_C) S + (k exp(G_C - G))^T v_new.
    """
    batch, seq_len, _, head_k = q.shape
    num_v_heads, head_v = v.shape[2:]
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth = prepare_inputs(q, k, v, g, beta, lengths, scale, use_qk_l2norm)
    pad = -seq_len % chunk_size
    # Zero padding is neutral: g = beta = 0 leaves the state untouched, and the outputs are sliced off.
    q_bthk, k_bthk, v_bthv = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q_bthk, k_bthk, v_bthv))
    g_bth, beta_bth = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (g_bth, beta_bth))
    num_chunks = (seq_len + pad) // chunk_size

    def to_chunks(x):  # [B, T, H, ...] -> [N, B, H, C, ...], chunk axis first for the scan
        x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 3)

    q_nbhck, k_nbhck, v_nbhcv = to_chunks(q_bthk), to_chunks(k_bthk), to_chunks(v_bthv)
    g_nbhc, beta_nbhc = to_chunks(g_bth), to_chunks(beta_bth)
    hi = "highest"

    cum_nbhc = jnp.cumsum(g_nbhc, axis=-1)
    idx = jnp.arange(chunk_size)
    lower_incl = idx[:, None] >= idx[None, :]
    # exp only where i >= j, so the exponent is <= 0 and cannot overflow.
    decay_nbhcc = jnp.exp(jnp.where(lower_incl, cum_nbhc[..., :, None] - cum_nbhc[..., None, :], -jnp.inf))
    kbeta_nbhck = k_nbhck * beta_nbhc[..., None]
    a_nbhcc = jnp.einsum("...ik,...jk->...ij", kbeta_nbhck, k_nbhck, precision=hi) * decay_nbhcc
    a_nbhcc = jnp.where(idx[:, None] > idx[None, :], a_nbhcc, 0.0)
    ut_nbhcc = a_nbhcc + jnp.eye(chunk_size, dtype=jnp.float32)
    u_nbhcv = jax.scipy.linalg.solve_triangular(
        ut_nbhcc, v_nbhcv * beta_nbhc[..., None], lower=True, unit_diagonal=True
    )
    w_nbhck = jax.scipy.linalg.solve_triangular(
        ut_nbhcc, kbeta_nbhck * jnp.exp(cum_nbhc)[..., None], lower=True, unit_diagonal=True
    )
    attn_nbhcc = jnp.einsum("...ik,...jk->...ij", q_nbhck, k_nbhck, precision=hi) * decay_nbhcc
    qdecay_nbhck = q_nbhck * jnp.exp(cum_nbhc)[..., None]
    last_nbh = cum_nbhc[..., -1]
    kdecay_nbhck = k_nbhck * jnp.exp(last_nbh[..., None] - cum_nbhc)[..., None]

    def step(s_bhkv, xs):
        u_bhcv, w_bhck, attn_bhcc, qdecay_bhck, kdecay_bhck, last_bh = xs
        vnew_bhcv = u_bhcv - jnp.einsum("bhck,bhkv->bhcv", w_bhck, s_bhkv, precision=hi)
        o_bhcv = jnp.einsum("bhck,bhkv->bhcv", qdecay_bhck, s_bhkv, precision=hi) + jnp.einsum(
            "bhij,bhjv->bhiv", attn_bhcc, vnew_bhcv, precision=hi
        )
        s_bhkv = s_bhkv * jnp.exp(last_bh)[..., None, None] + jnp.einsum(
            "bhck,bhcv->bhkv", kdecay_bhck, vnew_bhcv, precision=hi
        )
        return s_bhkv, o_bhcv

    state_bhkv = initial_state_fp32(initial_state, batch, num_v_heads, head_k, head_v)
    xs = (u_nbhcv, w_nbhck, attn_nbhcc, qdecay_nbhck, kdecay_nbhck, last_nbh)
    state_bhkv, o_nbhcv = lax.scan(step, state_bhkv, xs)
    o_bthv = jnp.moveaxis(o_nbhcv, 3, 2).transpose(1, 0, 2, 3, 4).reshape(batch, -1, num_v_heads, head_v)
    return o_bthv[:, :seq_len].astype(v.dtype), state_bhkv
