"""Sparse mixture of experts: softmax top-k routing, grouped expert matmuls, optional gated shared expert.

Tokens are sorted by expert and run through ``jax.lax.ragged_dot`` so each expert's weights are read once per call
and no [tokens, k, D, I] gather is materialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.layers import GatedMLP, Linear, _normal, activation


class Experts(nnx.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # Hub layout: gate_up_proj [E, D, 2I] (gate | up on the last axis), down_proj [E, I, D].
        self.gate_up_proj = nnx.Param(_normal(rngs, (num_experts, hidden, 2 * intermediate), dtype))
        self.down_proj = nnx.Param(_normal(rngs, (num_experts, intermediate, hidden), dtype))


class SparseMoeBlock(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.gate = Linear(d, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg.num_experts, d, cfg.moe_intermediate_size, dtype=dtype, rngs=rngs)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(d, cfg.shared_expert_intermediate_size, bias=False, act="silu",
                                          dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(d, 1, bias=False, dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        self.top_k = cfg.num_experts_per_tok
        self.num_experts = cfg.num_experts

    def route(self, x_nd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """HF's router: softmax in fp32, top-k of the probabilities, renormalised, cast to the logits dtype."""
        logits_ne = self.gate(x_nd)
        probs_ne = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
        top_p_nk, top_i_nk = jax.lax.top_k(probs_ne, self.top_k)
        top_p_nk = top_p_nk / jnp.sum(top_p_nk, axis=-1, keepdims=True)
        return top_p_nk.astype(logits_ne.dtype), top_i_nk

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        b, t, d = x_btd.shape
        x_nd = x_btd.reshape(b * t, d)
        weights_nk, experts_nk = self.route(x_nd)

        flat_expert = experts_nk.reshape(-1)  # [n*k], token-major
        order = jnp.argsort(flat_expert, stable=True)
        token_of = order // self.top_k
        group_sizes = jnp.bincount(flat_expert, length=self.num_experts).astype(jnp.int32)
        xs = jnp.take(x_nd, token_of, axis=0)
        gate_up = jax.lax.ragged_dot(xs, self.experts.gate_up_proj[...], group_sizes)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        h = jax.lax.ragged_dot(activation("silu")(gate) * up, self.experts.down_proj[...], group_sizes)
        # Back to token-major order, weight each expert's output, sum over the k experts.
        h_nkd = jnp.zeros_like(h).at[order].set(h).reshape(b * t, self.top_k, d)
        out_nd = jnp.einsum("nkd,nk->nd", h_nkd, weights_nk.astype(h.dtype))

        if self.shared_expert is not None:
            shared = self.shared_expert(x_nd)
            out_nd = out_nd + jax.nn.sigmoid(self.shared_expert_gate(x_nd)) * shared
        return out_nd.reshape(b, t, d)
