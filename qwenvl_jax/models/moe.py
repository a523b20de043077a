"""Sparse mixture of experts: softmax top-k routing, grouped expert matmuls, optional gated shared expert.

The routed experts run through ``pallas_kernels.moe_matmul.moe_experts``: (token, expert) pairs sorted by expert,
each routed expert's weights read once per call where they live, unrouted experts never touched, and no
[tokens, k, D, I] gather materialised (on a CPU the same arithmetic through ``jax.lax.ragged_dot``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.moe_matmul import moe_experts, moe_experts_fp8
from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.fp8 import dequantize
from qwenvl_jax.models.layers import GatedMLP, Linear, _normal
from qwenvl_jax.models.per_device import EXPERT, context_mesh


class Experts(nnx.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # Hub layout: gate_up_proj [E, D, 2I] (gate | up on the last axis), down_proj [E, I, D].
        self.gate_up_proj = nnx.Param(_normal(rngs, (num_experts, hidden, 2 * intermediate), dtype))
        self.down_proj = nnx.Param(_normal(rngs, (num_experts, intermediate, hidden), dtype))
        # FP8 (qwenvl_jax.models.fp8.quantize_module): block scales, gate's blocks then up's on the last axis.
        self.gate_up_proj_scale_inv = nnx.data(None)
        self.down_proj_scale_inv = nnx.data(None)
        self.block = None

    def arrays(self) -> tuple[jax.Array, ...]:
        """Every array indexed by expert: (gate_up [E, D, 2I], down [E, I, D]), then for FP8 experts their block
        scales (gate_up's, down's)."""
        fp8 = () if self.gate_up_proj_scale_inv is None else (self.gate_up_proj_scale_inv[...],
                                                               self.down_proj_scale_inv[...])
        return (self.gate_up_proj[...], self.down_proj[...], *fp8)

    def apply(self, x_nd: jax.Array, experts_nk: jax.Array, weights_nk: jax.Array, arrays: tuple[jax.Array, ...]
              ) -> jax.Array:
        """sum_k weights[n, k] * expert[experts[n, k]](x[n]) over the experts ``arrays`` hold (``arrays()``, or
        one device's share of them)."""
        gate_up, down, *scales = arrays
        if scales:  # FP8 experts: the kernels read FP8 tiles where they can, else the dequantized reference
            out_nd = moe_experts_fp8(x_nd, experts_nk, weights_nk, gate_up, down, tuple(scales), self.block)
            if out_nd is not None:
                return out_nd
            dequant = jax.vmap(lambda w, s: dequantize(w, s, self.block, x_nd.dtype))
            half, scale_half = gate_up.shape[-1] // 2, scales[0].shape[-1] // 2
            gate_up = jnp.concatenate([dequant(gate_up[..., :half], scales[0][..., :scale_half]),
                                       dequant(gate_up[..., half:], scales[0][..., scale_half:])], axis=-1)
            down = dequant(down, scales[1])
        return moe_experts(x_nd, experts_nk, weights_nk, gate_up, down)


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

        out_nd = self._routed(x_nd, experts_nk, weights_nk)
        if self.shared_expert is not None:
            shared = self.shared_expert(x_nd)
            out_nd = out_nd + jax.nn.sigmoid(self.shared_expert_gate(x_nd)) * shared
        return out_nd.reshape(b, t, d)

    def _routed(self, x_nd: jax.Array, experts_nk: jax.Array, weights_nk: jax.Array) -> jax.Array:
        """The routed experts' output. On a mesh whose expert axis splits the experts, each device runs its own
        experts on every token (pairs routed elsewhere weigh 0 there) and a sum over the axis adds them up:
        the expert weights never leave their device (a Pallas call left to XLA's partitioner would gather
        them all onto every device)."""
        experts, arrays = self.experts, self.experts.arrays()
        mesh = context_mesh()
        if mesh is None or mesh.shape.get(EXPERT, 1) == 1 or self.num_experts % mesh.shape[EXPERT]:
            return experts.apply(x_nd, experts_nk, weights_nk, arrays)

        def local(x_nd, experts_nk, weights_nk, *arrays):
            count = arrays[0].shape[0]
            first = jax.lax.axis_index(EXPERT) * count
            mine_nk = (experts_nk >= first) & (experts_nk < first + count)
            out_nd = experts.apply(x_nd, jnp.where(mine_nk, experts_nk - first, 0),
                                   jnp.where(mine_nk, weights_nk, 0), arrays)
            return jax.lax.psum(out_nd, EXPERT)

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), *(P(EXPERT) for _ in arrays)),
                             out_specs=P(), check_vma=False)(x_nd, experts_nk, weights_nk, *arrays)
