"""Gated DeltaNet token mixer of Qwen3.5 (HF: ``Qwen3_5GatedDeltaNet``).

in_proj -> causal depthwise conv1d + SiLU -> split q, k, v -> gated delta rule (L2-normed q/k, g, beta) ->
gated RMSNorm with z -> out_proj. Rows are right-padded: tokens at t >= length leave conv and recurrent state
exactly as if they were absent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.gated_delta_rule import (
    gated_delta_rule, gated_delta_rule_step_slots, gated_delta_rule_tokens_slots,
)
from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.context import ForwardContext
from qwenvl_jax.models.layers import Linear, _normal
from qwenvl_jax.models.per_device import on_local_heads


class GdnCache(NamedTuple):
    """One Gated DeltaNet layer's state for every decode slot (the engine's donated state)."""

    conv: jax.Array  # [S, K-1, conv_dim], activation dtype
    recurrent: jax.Array  # [S, Hv, Dk, Dv] float32


class GdnPending(NamedTuple):
    """A speculative verify pass's inputs to a Gated DeltaNet layer, with the state before it: the state is
    advanced only once the accepted length is known (``commit_verified``)."""

    before: GdnCache
    mixed_btc: jax.Array  # conv inputs of the T tokens
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array
    beta: jax.Array


def _on_local_heads(kernel: Callable, q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array, beta: jax.Array,
                    state: jax.Array, lengths_b: jax.Array) -> tuple[jax.Array | None, jax.Array]:
    """A gated delta rule kernel ``(q, k, v, g, beta, state [S, Hv, Dk, Dv], lengths) -> (o, state)`` run per
    device on its key and value heads (``per_device``): the recurrent state pool never leaves its device."""
    return on_local_heads(kernel, (q, k, v, g, beta, state, lengths_b),
                          (q.ndim - 2, k.ndim - 2, v.ndim - 2, g.ndim - 1, beta.ndim - 1, 1, None),
                          (v.ndim - 2, 1), head_counts=(q.shape[-2], v.shape[-2]))


def commit_verified(pending: GdnPending, tokens_b: jax.Array) -> GdnCache:
    """The state after the first ``tokens_b`` [B] of the verified tokens of rows = slots 0..B-1 (0: unchanged).

    Recomputed from the saved gate inputs rather than kept per position: the recurrence over T <= 5 tokens is a
    state read and write in place, where keeping T states would write T of them."""
    cache = pending.before
    b = tokens_b.shape[0]
    conv = last_conv_window(pending.mixed_btc, cache.conv[:b], tokens_b)
    _, recurrent = _on_local_heads(
        functools.partial(gated_delta_rule_tokens_slots, outputs=False, advance=True),
        pending.q, pending.k, pending.v, pending.g, pending.beta, cache.recurrent, tokens_b)
    return GdnCache(cache.conv.at[:b].set(conv.astype(cache.conv.dtype)), recurrent)


def init_gdn_cache(cfg: TextConfig, slots: int, dtype: jnp.dtype) -> GdnCache:
    return GdnCache(
        jnp.zeros((slots, cfg.linear_conv_kernel_dim - 1, cfg.gdn_conv_dim), dtype),
        jnp.zeros((slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                  jnp.float32),
    )


def causal_depthwise_conv(x_btc: jax.Array, state_bkc: jax.Array, kernel_kc: jax.Array) -> jax.Array:
    """out[t] = sum_j kernel[j] * x[t - (K-1) + j], reading the K-1 tokens before the call from the state."""
    k = kernel_kc.shape[0]
    t = x_btc.shape[1]
    x_pad = jnp.concatenate([state_bkc.astype(x_btc.dtype), x_btc], axis=1)
    return sum(x_pad[:, j : j + t] * kernel_kc[j] for j in range(k))


def last_conv_window(x_btc: jax.Array, state_bkc: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """The K-1 inputs preceding the next token: the tail of (state ++ real tokens), pads skipped."""
    km1 = state_bkc.shape[1]
    x_pad = jnp.concatenate([state_bkc.astype(x_btc.dtype), x_btc], axis=1)
    idx_bk = lengths_b[:, None] + jnp.arange(km1)[None, :]
    return jnp.take_along_axis(x_pad, idx_bk[:, :, None], axis=1)


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight * normed.astype(x.dtype) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        return gated_rms_norm(x, gate, self.weight[...], self.eps)


class DepthwiseConv1d(nnx.Module):
    def __init__(self, channels: int, kernel_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # [K, C]: HF's conv1d.weight [C, 1, K] transposed, so one tap is a contiguous row.
        self.kernel = nnx.Param(_normal(rngs, (kernel_size, channels), dtype, std=0.2))


class GatedDeltaNet(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, hv = cfg.hidden_size, cfg.linear_num_value_heads
        self.in_proj_qkv = Linear(d, cfg.gdn_conv_dim, bias=False, dtype=dtype, rngs=rngs)
        self.in_proj_z = Linear(d, cfg.gdn_value_dim, bias=False, dtype=dtype, rngs=rngs)
        self.in_proj_b = Linear(d, hv, bias=False, dtype=dtype, rngs=rngs)
        self.in_proj_a = Linear(d, hv, bias=False, dtype=dtype, rngs=rngs)
        self.conv1d = DepthwiseConv1d(cfg.gdn_conv_dim, cfg.linear_conv_kernel_dim, dtype=dtype, rngs=rngs)
        self.dt_bias = nnx.Param(jnp.ones((hv,), dtype))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (hv,), jnp.float32, 1.0, 16.0)).astype(dtype))
        self.norm = GatedRMSNorm(cfg.linear_value_head_dim, eps=cfg.rms_norm_eps, dtype=dtype)
        self.out_proj = Linear(cfg.gdn_value_dim, d, bias=False, dtype=dtype, rngs=rngs)
        self.key_heads, self.value_heads = cfg.linear_num_key_heads, hv
        self.key_dim, self.value_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.head_blocks = cfg.gdn_head_blocks

    def init_state(self, batch: int, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """Zero (conv [B, K-1, C] in the activation dtype, recurrent [B, Hv, Dk, Dv] fp32)."""
        k, c = self.conv1d.kernel.shape
        return (jnp.zeros((batch, k - 1, c), dtype),
                jnp.zeros((batch, self.value_heads, self.key_dim, self.value_dim), jnp.float32))

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, cache: GdnCache | None = None
                 ) -> tuple[jax.Array, GdnCache | GdnPending | None]:
        if cache is not None and ctx.verify:
            return self._verify(x_btd, ctx, cache)
        if cache is not None and ctx.is_decode(x_btd.shape[1]):
            return self._decode_step(x_btd, ctx, cache)
        rows = ctx.row_index()
        state = None if ctx.fresh or cache is None else (cache.conv[rows], cache.recurrent[rows])
        out, (conv, recurrent) = self.mix(x_btd, ctx.lengths_b, state)
        if cache is not None:
            cache = GdnCache(cache.conv.at[rows].set(conv.astype(cache.conv.dtype)),
                             cache.recurrent.at[rows].set(recurrent))
        return out, cache

    def _decode_step(self, x_b1d: jax.Array, ctx: ForwardContext, cache: GdnCache) -> tuple[jax.Array, GdnCache]:
        """One token for rows = slots 0..B-1: the recurrent state is advanced where it lives in the slot pool.
        The conv window is small (K-1 rows per slot), so it is read out and written back."""
        b = x_b1d.shape[0]
        conv_bkc = cache.conv[:b]
        q, k, v, g, beta, z, mixed = self._gates_and_inputs(x_b1d, conv_bkc)
        new_conv = last_conv_window(mixed, conv_bkc, ctx.lengths_b)
        core_bhv, recurrent = _on_local_heads(gated_delta_rule_step_slots, q[:, 0], k[:, 0], v[:, 0], g[:, 0],
                                              beta[:, 0], cache.recurrent, ctx.lengths_b)
        out = self._output(core_bhv[:, None], z, x_b1d.dtype)
        return out, GdnCache(cache.conv.at[:b].set(new_conv.astype(cache.conv.dtype)), recurrent)

    def _verify(self, x_btd: jax.Array, ctx: ForwardContext, cache: GdnCache) -> tuple[jax.Array, GdnPending]:
        """T speculative tokens for rows = slots 0..B-1: outputs from the slot states, which stay as they are."""
        b = x_btd.shape[0]
        q, k, v, g, beta, z, mixed = self._gates_and_inputs(x_btd, cache.conv[:b])
        core_bthv, _ = _on_local_heads(functools.partial(gated_delta_rule_tokens_slots, outputs=True, advance=False),
                                       q, k, v, g, beta, cache.recurrent, ctx.lengths_b)
        return self._output(core_bthv, z, x_btd.dtype), GdnPending(cache, mixed, q, k, v, g, beta)

    def _gates_and_inputs(self, x_btd: jax.Array, conv_state_bkc: jax.Array) -> tuple:
        """Projections, causal conv + SiLU and gates: (q, k [B,T,Hk,Dk], v [B,T,Hv,Dv], g, beta [B,T,Hv] fp32,
        z [B,T,Hv,Dv], the conv inputs [B,T,C] whose tail is the next conv window)."""
        b, t, _ = x_btd.shape
        mixed_btc = self.in_proj_qkv(x_btd)
        z_bthv = self.in_proj_z(x_btd).reshape(b, t, self.value_heads, self.value_dim)
        beta_bth = jax.nn.sigmoid(self.in_proj_b(x_btd).astype(jnp.float32))
        a_bth = self.in_proj_a(x_btd).astype(jnp.float32)
        g_bth = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a_bth + self.dt_bias[...].astype(jnp.float32))

        kernel = self.conv1d.kernel[...]
        conved_btc = jax.nn.silu(causal_depthwise_conv(mixed_btc, conv_state_bkc, kernel))

        # Channels in head blocks of [q_i | k_i | v_i] (TextConfig.gdn_head_blocks; 1 block: HF's layout). Heads
        # come out in their global order, and on a mesh each device's block splits locally.
        blocks_btgc = conved_btc.reshape(b, t, self.head_blocks, -1)
        kd = self.key_heads * self.key_dim // self.head_blocks
        q, k, v = jnp.split(blocks_btgc, [kd, 2 * kd], axis=-1)
        q_bthk = q.reshape(b, t, self.key_heads, self.key_dim)
        k_bthk = k.reshape(b, t, self.key_heads, self.key_dim)
        v_bthv = v.reshape(b, t, self.value_heads, self.value_dim)
        return q_bthk, k_bthk, v_bthv, g_bth, beta_bth, z_bthv, mixed_btc

    def _output(self, core_bthv: jax.Array, z_bthv: jax.Array, dtype: jnp.dtype) -> jax.Array:
        b, t = core_bthv.shape[:2]
        out = self.norm(core_bthv.astype(dtype), z_bthv)
        return self.out_proj(out.reshape(b, t, -1))

    def mix(
        self, x_btd: jax.Array, lengths_b: jax.Array, state: tuple[jax.Array, jax.Array] | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The mixer on right-padded rows from ``state`` (zeros if None): (output, (conv, recurrent) after)."""
        conv_state, recurrent_state = state if state is not None else self.init_state(x_btd.shape[0], x_btd.dtype)
        q, k, v, g, beta, z, mixed = self._gates_and_inputs(x_btd, conv_state)
        new_conv_state = last_conv_window(mixed, conv_state, lengths_b).astype(conv_state.dtype)
        core_bthv, new_recurrent = _on_local_heads(
            lambda q, k, v, g, beta, state, lengths: gated_delta_rule(
                q, k, v, g, beta, initial_state=state, lengths=lengths, use_qk_l2norm=True),
            q, k, v, g, beta, recurrent_state, lengths_b)
        return self._output(core_bthv, z, x_btd.dtype), (new_conv_state, new_recurrent)
