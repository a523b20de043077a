"""Grouped-query attention of the text decoder, one class for every family.

Switches (from TextConfig): q/k/v bias (Qwen2.5-VL), per-head q/k RMSNorm (Qwen3-VL, Qwen3.5), a sigmoid output
gate that HF folds into q_proj head by head (Qwen3.5), partial rotary (Qwen3.5).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.prefill_attention import prefill_attention
from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.context import ForwardContext
from qwenvl_jax.models.layers import Linear, RMSNorm
from qwenvl_jax.models.per_device import on_local_heads
from qwenvl_jax.models.rope import apply_rotary


class AttnCache(NamedTuple):
    """One attention layer's keys and values for every decode slot (the engine's donated state)."""

    k: jax.Array  # [S, max_len, kv_heads, head_dim]
    v: jax.Array


def init_attn_cache(cfg: TextConfig, slots: int, max_len: int, dtype: jnp.dtype) -> AttnCache:
    shape = (slots, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return AttnCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def flash_attention_available(dtype: jnp.dtype) -> bool:
    """cuDNN's fused (flash) attention: on a GPU, in half precision. Elsewhere XLA's masked attention."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def causal_attention(q_bthd: jax.Array, k_bshd: jax.Array, v_bshd: jax.Array, lengths_b: jax.Array) -> jax.Array:
    """Causal attention over right-padded rows: query i sees keys j <= i with j < length.

    On a GPU in half precision, cuDNN's flash attention: no [T, T] mask or score matrix in memory, and padded
    query and key tiles skipped by length (XLA's path built the mask and the scores: 228 of a 621 ms Qwen3.5-9B
    16K prefill on an H200, cuDNN ~29 ms). The two paths may differ in the rows past a length: pads, never read."""
    if flash_attention_available(q_bthd.dtype):
        return jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, is_causal=True, query_seq_lengths=lengths_b,
                                            key_value_seq_lengths=lengths_b, implementation="cudnn")
    t, s = q_bthd.shape[1], k_bshd.shape[1]
    q_pos = jnp.arange(t)[:, None]
    k_pos = jnp.arange(s)[None, :]
    mask_bts = (k_pos <= q_pos)[None] & (k_pos[None] < lengths_b[:, None, None])
    return jax.nn.dot_product_attention(q_bthd, k_bshd, v_bshd, mask=mask_bts[:, None])


def write_kv(cache: AttnCache, k_bthd: jax.Array, v_bthd: jax.Array, ctx: ForwardContext) -> AttnCache:
    """Scatters the new keys/values into their slots in place; pad tokens are dropped, never written."""
    max_len = cache.k.shape[1]
    t = k_bthd.shape[1]
    pos_bt = ctx.starts_b[:, None] + jnp.arange(t)[None, :]
    pos_bt = jnp.where(jnp.arange(t)[None, :] < ctx.lengths_b[:, None], pos_bt, max_len)
    rows_b1 = ctx.row_ids()[:, None]
    return AttnCache(cache.k.at[rows_b1, pos_bt].set(k_bthd.astype(cache.k.dtype), mode="drop"),
                     cache.v.at[rows_b1, pos_bt].set(v_bthd.astype(cache.v.dtype), mode="drop"))


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_out = h * hd * (2 if cfg.attn_output_gate else 1)
        self.q_proj = Linear(d, q_out, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, kv * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, kv * hd, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * hd, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            norm = dict(eps=cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered, dtype=dtype)
            self.q_norm = RMSNorm(hd, **norm)
            self.k_norm = RMSNorm(hd, **norm)
        else:
            self.q_norm = None
            self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.output_gate = cfg.attn_output_gate

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, cache: AttnCache | None = None
                 ) -> tuple[jax.Array, AttnCache | None]:
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd)
        gate_bthd = None
        if self.output_gate:  # HF lays q_proj out as [head][query | gate]
            q_bth2d = q.reshape(b, t, self.num_heads, 2 * self.head_dim)
            q, gate_bthd = jnp.split(q_bth2d, 2, axis=-1)
        q_bthd = q.reshape(b, t, self.num_heads, self.head_dim)
        k_bthd = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v_bthd = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q_bthd, k_bthd = self.q_norm(q_bthd), self.k_norm(k_bthd)
        q_bthd = apply_rotary(q_bthd, ctx.cos_btr, ctx.sin_btr)
        k_bthd = apply_rotary(k_bthd, ctx.cos_btr, ctx.sin_btr)

        if cache is not None:
            cache = write_kv(cache, k_bthd, v_bthd, ctx)
        if ctx.fresh:
            out_bthd = causal_attention(q_bthd, k_bthd, v_bthd, ctx.lengths_b)
        elif ctx.is_decode(t):
            # Row b is slot b: the kernel reads the cache where it lives, positions [0, start + new) only.
            out_bhd = on_local_heads(decode_attention, (q_bthd[:, 0], cache.k, cache.v, ctx.starts_b + ctx.lengths_b),
                                     (1, 2, 2, None), (1,), head_counts=(self.num_heads, self.num_kv_heads))
            out_bthd = out_bhd[:, None]
        else:
            # A prompt chunk after a cached prefix: flash attention over the slot's cache where it lives.
            out_bthd = on_local_heads(prefill_attention,
                                      (q_bthd, cache.k, cache.v, ctx.row_ids(), ctx.starts_b, ctx.lengths_b),
                                      (2, 2, 2, None, None, None), (2,),
                                      head_counts=(self.num_heads, self.num_kv_heads))
        if gate_bthd is not None:
            out_bthd = out_bthd * jax.nn.sigmoid(gate_bthd)
        return self.o_proj(out_bthd.reshape(b, t, self.num_heads * self.head_dim)), cache
