"""Gated delta rule: one entry point that picks the Pallas kernels on GPU and the pure-JAX references elsewhere.

T == 1 takes the recurrent decode kernel (state read once, updated in place), longer inputs the chunked one.
``gated_delta_rule_step_slots`` is the decode step over a pool of slot states, advanced where they live;
``gated_delta_rule_tokens_slots`` the same for a few tokens (a speculative verify pass).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.gated_delta_rule.chunk import chunk_prefill
from pallas_kernels.gated_delta_rule.recurrent import recurrent_decode, recurrent_tokens
from pallas_kernels.gated_delta_rule.reference import (
    chunk_gated_delta_rule_ref,
    initial_state_fp32,
    recurrent_gated_delta_rule_ref,
)

__all__ = [
    "chunk_gated_delta_rule_ref",
    "gated_delta_rule",
    "gated_delta_rule_step_slots",
    "gated_delta_rule_tokens_slots",
    "kernel_supports",
    "recurrent_gated_delta_rule_ref",
]

Impl = Literal["auto", "reference", "pallas", "interpret"]


def kernel_supports(head_k: int, head_v: int) -> bool:
    """Triton tiles need power-of-two sizes of at least 16 (its smallest matrix-product tile)."""
    return all(d >= 16 and d & (d - 1) == 0 for d in (head_k, head_v))


def gated_delta_rule(
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
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv] (Hv a multiple of Hk); g (log-decay), beta [B, T, Hv];
    initial_state [B, Hv, Dk, Dv] fp32 or None; lengths [B] int32 or None (tokens t >= lengths[b] are padding).
    Returns (o [B, T, Hv, Dv] in v.dtype, final_state [B, Hv, Dk, Dv] fp32).

    impl: "auto" = kernels when the default backend is GPU and the head sizes suit them, references
    otherwise; "reference", "pallas" (compiled kernels), "interpret" (kernels in the Pallas interpreter).
    """
    batch, seq_len, num_k_heads, head_k = q.shape
    num_v_heads, head_v = v.shape[2:]
    if num_v_heads % num_k_heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of key heads ({num_k_heads})")
    impl = _resolve(impl, head_k, head_v)
    if impl == "reference":
        ref = recurrent_gated_delta_rule_ref if seq_len == 1 else chunk_gated_delta_rule_ref
        return ref(
            q, k, v, g, beta,
            initial_state=initial_state, lengths=lengths, scale=scale, use_qk_l2norm=use_qk_l2norm,
        )
    scale = head_k**-0.5 if scale is None else float(scale)
    state = initial_state_fp32(initial_state, batch, num_v_heads, head_k, head_v)
    lengths_b = jnp.full((batch,), seq_len, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    common = dict(scale=scale, use_qk_l2norm=use_qk_l2norm, interpret=impl == "interpret")
    if seq_len == 1:
        o_bhv, state = recurrent_decode(
            q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, lengths_b, **common
        )
        return o_bhv[:, None], state
    return chunk_prefill(q, k, v, g, beta, state, lengths_b, **common)


def _resolve(impl: Impl, head_k: int, head_v: int) -> Impl:
    """"auto" -> kernels on a GPU when the head sizes suit them, references elsewhere; checks explicit choices."""
    if impl == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "pallas" if on_gpu and kernel_supports(head_k, head_v) else "reference"
    if impl not in ("reference", "pallas", "interpret"):
        raise ValueError(f"impl must be auto, reference, pallas or interpret, got {impl!r}")
    if impl != "reference" and not kernel_supports(head_k, head_v):
        raise ValueError(f"the Pallas kernels need power-of-two head sizes >= 16, got Dk={head_k}, Dv={head_v}")
    return impl


def _check_pool(state_shkv: jax.Array, batch: int, state_shape: tuple[int, int, int]) -> None:
    if state_shkv.shape[0] < batch or state_shkv.shape[1:] != state_shape:
        raise ValueError(f"state pool {state_shkv.shape} does not hold {batch} rows of {state_shape}")


def gated_delta_rule_step_slots(
    q_bhk: jax.Array,
    k_bhk: jax.Array,
    v_bhv: jax.Array,
    g_bh: jax.Array,
    beta_bh: jax.Array,
    state_shkv: jax.Array,
    lengths_b: jax.Array,
    *,
    use_qk_l2norm: bool = True,
    impl: Impl = "auto",
) -> tuple[jax.Array, jax.Array]:
    """One decode token per row; row b advances slot b of ``state_shkv`` [S >= B, Hv, Dk, Dv] fp32, the engine's
    whole state pool. Returns (o [B, Hv, Dv] in v.dtype, the pool with slots [0, B) advanced, the rest as given).

    The kernel's grid covers rows [0, B) of the full pool and its state output aliases the pool, so under a
    donated state nothing is copied: slicing the rows out first would make XLA copy them out and back every step.
    lengths_b [B]: 1 advances the row, 0 leaves its slot bit-identical (a pad row)."""
    batch, num_v_heads, head_v = v_bhv.shape
    head_k = q_bhk.shape[-1]
    _check_pool(state_shkv, batch, (num_v_heads, head_k, head_v))
    impl = _resolve(impl, head_k, head_v)
    if impl == "reference":
        o_b1hv, new_bhkv = recurrent_gated_delta_rule_ref(
            q_bhk[:, None], k_bhk[:, None], v_bhv[:, None], g_bh[:, None], beta_bh[:, None],
            initial_state=state_shkv[:batch], lengths=lengths_b, use_qk_l2norm=use_qk_l2norm,
        )
        return o_b1hv[:, 0], state_shkv.at[:batch].set(new_bhkv)
    return recurrent_decode(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_shkv.astype(jnp.float32),
                            jnp.asarray(lengths_b, jnp.int32), scale=head_k**-0.5, use_qk_l2norm=use_qk_l2norm,
                            interpret=impl == "interpret")


def gated_delta_rule_tokens_slots(
    q_bthk: jax.Array,
    k_bthk: jax.Array,
    v_bthv: jax.Array,
    g_bth: jax.Array,
    beta_bth: jax.Array,
    state_shkv: jax.Array,
    lengths_b: jax.Array,
    *,
    outputs: bool,
    advance: bool,
    use_qk_l2norm: bool = True,
    impl: Impl = "auto",
) -> tuple[jax.Array | None, jax.Array]:
    """A few tokens per row (a speculative verify pass, T <= 5) from slot b of the pool [S >= B, Hv, Dk, Dv] fp32,
    the first lengths_b [B] of them applied. Returns (o [B, T, Hv, Dv] if ``outputs``, else None; the pool with
    rows [0, B) advanced if ``advance``, else the pool as given). The kernel reads each state tile once and, when
    advancing, writes it back where it lives (aliased: nothing is copied under a donated state)."""
    batch, _, num_v_heads, head_v = v_bthv.shape
    head_k = q_bthk.shape[-1]
    _check_pool(state_shkv, batch, (num_v_heads, head_k, head_v))
    impl = _resolve(impl, head_k, head_v)
    if impl == "reference":
        o, new_bhkv = recurrent_gated_delta_rule_ref(q_bthk, k_bthk, v_bthv, g_bth, beta_bth,
                                                     initial_state=state_shkv[:batch], lengths=lengths_b,
                                                     use_qk_l2norm=use_qk_l2norm)
        return (o if outputs else None), (state_shkv.at[:batch].set(new_bhkv) if advance else state_shkv)
    o, pool = recurrent_tokens(q_bthk, k_bthk, v_bthv, g_bth, beta_bth, state_shkv.astype(jnp.float32),
                               jnp.asarray(lengths_b, jnp.int32), scale=head_k**-0.5, use_qk_l2norm=use_qk_l2norm,
                               outputs=outputs, advance=advance, interpret=impl == "interpret")
    return o, (pool if advance else state_shkv)
