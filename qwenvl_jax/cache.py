"""Decode state: everything a request carries between compiled calls, resident on the device.

Per layer it mirrors the decoder's storage (``TextModel.groups`` stacked over repeats, then the ``tail``):
attention layers hold a KV cache, Gated DeltaNet layers a conv window and an fp32 recurrent state, each with a
leading repeat axis R and a slot axis S. Per slot it holds the sequence length, the mRoPE delta, the last sampled
token and the stop bookkeeping, so a decode program runs many steps without the host. The whole pytree is donated
into every call and updated in place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qwenvl_jax.config import TextConfig

if TYPE_CHECKING:
    from qwenvl_jax.models.decoder import TextModel


class AttnCache(NamedTuple):
    k: jax.Array  # [R, S, max_len, kv_heads, head_dim]
    v: jax.Array


class GdnCache(NamedTuple):
    conv: jax.Array  # [R, S, K-1, conv_dim], activation dtype
    recurrent: jax.Array  # [R, S, Hv, Dk, Dv] float32


LayerCache = AttnCache | GdnCache


class DecodeState(NamedTuple):
    layers: tuple[LayerCache, ...]  # groups[0..period) then tail layers (R = 1)
    lengths: jax.Array  # [S] int32 tokens in the cache
    rope_delta: jax.Array  # [S] int32 mRoPE position minus cache index for the next token
    next_token: jax.Array  # [S] int32 sampled but not yet fed back
    active: jax.Array  # [S] bool still generating
    remaining: jax.Array  # [S] int32 new tokens still allowed
    keys: jax.Array  # [S] typed PRNG keys: each slot's sampling stream
    seen: jax.Array  # [S, vocab] bool tokens in prompt + output (repetition penalty)
    sampling: object  # per-slot sampling parameters (qwenvl_jax.sampling.SamplingArrays)


def _layer_cache(cfg: TextConfig, layer_type: str, repeats: int, slots: int, max_len: int,
                 dtype: jnp.dtype) -> LayerCache:
    if layer_type == "full_attention":
        shape = (repeats, slots, max_len, cfg.num_key_value_heads, cfg.head_dim)
        return AttnCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return GdnCache(
        jnp.zeros((repeats, slots, cfg.linear_conv_kernel_dim - 1, cfg.gdn_conv_dim), dtype),
        jnp.zeros((repeats, slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim),
                  jnp.float32),
    )


def init_layer_caches(text: TextModel, slots: int, max_len: int, dtype: jnp.dtype) -> tuple[LayerCache, ...]:
    cfg = text.cfg
    kinds = list(cfg.layer_types)
    groups = [_layer_cache(cfg, kinds[j], text.n_repeats, slots, max_len, dtype) for j in range(text.period)]
    tail_start = text.period * text.n_repeats
    tail = [_layer_cache(cfg, kinds[i], 1, slots, max_len, dtype) for i in range(tail_start, len(kinds))]
    return tuple(groups + tail)


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
