"""Sparse mixture of experts: softmax top-k routing, grouped expert matmuls, optional gated shared expert.

The routed experts run through ``pallas_kernels.moe_matmul.moe_experts``: (token, expert) pairs sorted by expert,
each routed expert's weights read once per call where they live, unrouted experts never touched, and no
[tokens, k, D, I] gather materialised (on a CPU the same arithmetic through ``jax.lax.ragged_dot``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.moe_matmul import moe_experts, moe_experts_fp8
from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.fp8 import dequantize
from qwenvl_jax.models.layers import GatedMLP, Linear, _normal


class Experts(nnx.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # Hub layout: gate_up_proj [E, D, 2I] (gate | up on the last axis), down_proj [E, I, D].
        self.gate_up_proj = nnx.Param(_normal(rngs, (num_experts, hidden, 2 * intermediate), dtype))
        self.down_proj = nnx.Param(_normal(rngs, (num_experts, intermediate, hidden), dtype))
        # FP8 (qwenvl_jax.models.fp8.quantize_module): block scales, gate's blocks then up's on the last axis.
        self.gate_up_proj_scale_inv = nnx.data(None)
        self.down_proj_scale_inv = nnx.data(None)
        self.block = None

    def weights(self, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
        """(gate_up [E, D, 2I], down [E, I, D]) in ``dtype`` (FP8 experts dequantized: the reference path, where
        the grouped kernels cannot read the FP8 tiles)."""
        gate_up, down = self.gate_up_proj[...], self.down_proj[...]
        if self.gate_up_proj_scale_inv is None:
            return gate_up, down
        dequant = jax.vmap(lambda w, s: dequantize(w, s, self.block, dtype))
        half, scale_half = gate_up.shape[-1] // 2, self.gate_up_proj_scale_inv.shape[-1] // 2
        scale = self.gate_up_proj_scale_inv[...]
        gate_up = jnp.concatenate([dequant(gate_up[..., :half], scale[..., :scale_half]),
                                   dequant(gate_up[..., half:], scale[..., scale_half:])], axis=-1)
        return gate_up, dequant(down, self.down_proj_scale_inv[...])


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

        experts = self.experts
        out_nd = None
        if experts.block is not None:  # FP8 experts: the kernels read FP8 tiles where they can
            out_nd = moe_experts_fp8(x_nd, experts_nk, weights_nk, experts.gate_up_proj[...], experts.down_proj[...],
                                     (experts.gate_up_proj_scale_inv[...], experts.down_proj_scale_inv[...]),
                                     experts.block)
        if out_nd is None:
            out_nd = moe_experts(x_nd, experts_nk, weights_nk, *experts.weights(x_nd.dtype))

        if self.shared_expert is not None:
            shared = self.shared_expert(x_nd)
            out_nd = out_nd + jax.nn.sigmoid(self.shared_expert_gate(x_nd)) * shared
        return out_nd.reshape(b, t, d)
