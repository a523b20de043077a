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

from qwenvl_jax.models.attention import AttnCache
from qwenvl_jax.models.decoder import LayerCache


class SpecState(NamedTuple):
    """Speculative decoding's per-slot state (``EngineConfig.speculative_tokens`` = k > 0)."""

    mtp_layers: tuple[AttnCache, ...]  # the MTP head's KV caches [S, max_len, KV, D]
    drafts: jax.Array  # [S, k] int32 tokens proposed for the positions after next_token
    # [S, D] the main model's final hidden state at the last token of the latest prompt chunk: the MTP input that
    # waits for the next chunk's first token
    chunk_hidden: jax.Array
    # [S, max_len] int32 tokens the caller predicts per position (Request.draft_tokens), -1 where none: they
    # replace the MTP head's drafts (acceptance tests and benchmarks; prompt lookup)
    draft_table: jax.Array


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
    spec: SpecState | None = None  # None without speculative decoding


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
