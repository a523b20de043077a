"""Decode state: everything a request carries between compiled calls, resident on the device.

Per layer, the state the layer owns (``models.attention.AttnCache``: a KV cache; ``models.gated_deltanet.GdnCache``:
a conv window and an fp32 recurrent state), each with a slot axis S. Per slot, the sequence length, the mRoPE
delta, the last sampled token and the stop bookkeeping, so a decode program runs many steps without the host.
The whole pytree is donated into every call and updated in place.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from qwenvl_jax.models.decoder import LayerCache


class DecodeState(NamedTuple):
    layers: tuple[LayerCache, ...]  # one per decoder layer (``models.decoder.init_layer_caches``)
    lengths: jax.Array  # [S] int32 tokens in the cache
    rope_delta: jax.Array  # [S] int32 mRoPE position minus cache index for the next token
    next_token: jax.Array  # [S] int32 sampled but not yet fed back
    active: jax.Array  # [S] bool still generating
    remaining: jax.Array  # [S] int32 new tokens still allowed
    keys: jax.Array  # [S] typed PRNG keys: each slot's sampling stream
    seen: jax.Array  # [S, vocab] bool tokens in prompt + output (repetition penalty)
    sampling: object  # per-slot sampling parameters (qwenvl_jax.sampling.SamplingArrays)


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
