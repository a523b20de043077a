"""Qwen3.5's multi-token-prediction head (checkpoint ``mtp.*``), the draft model of speculative decoding.

At position i it reads the main model's final hidden state h_i (after the final norm) and the embedding of the
token at i+1, and predicts the token at i+2 through the shared LM head (vLLM's ``qwen3_5_mtp.py``):

    x = fc(concat(pre_fc_norm_embedding(embed(token_{i+1})), pre_fc_norm_hidden(h_i)))
    x = layers[0](x)            # a full-attention decoder layer (MoE for the MoE models), with its own KV cache
    m_i = norm(x)               # fed back as the hidden state of the next draft step

Image and video tokens enter with their vision embeddings, as in the main model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.attention import AttnCache, init_attn_cache
from qwenvl_jax.models.context import ForwardContext
from qwenvl_jax.models.decoder import DecoderLayer
from qwenvl_jax.models.layers import Linear, RMSNorm


def init_mtp_caches(cfg: TextConfig, slots: int, max_len: int, dtype: jnp.dtype) -> tuple[AttnCache, ...]:
    return tuple(init_attn_cache(cfg, slots, max_len, dtype) for _ in range(cfg.mtp_layers))


class MtpHead(nnx.Module):
    """HF checkpoint names: ``mtp.fc``, ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``,
    ``mtp.layers.{i}``, ``mtp.norm``."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        norm = dict(eps=cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered, dtype=dtype)
        self.pre_fc_norm_embedding = RMSNorm(d, **norm)
        self.pre_fc_norm_hidden = RMSNorm(d, **norm)
        self.fc = Linear(2 * d, d, bias=False, dtype=dtype, rngs=rngs)
        mlp_type = "moe" if cfg.num_experts else "dense"
        self.layers = nnx.List([DecoderLayer(cfg, ("full_attention", mlp_type), dtype=dtype, rngs=rngs)
                                for _ in range(cfg.mtp_layers)])
        self.norm = RMSNorm(d, **norm)

    def __call__(self, next_embeds_btd: jax.Array, hidden_btd: jax.Array, ctx: ForwardContext,
                 caches: tuple[AttnCache, ...] | None) -> tuple[jax.Array, tuple[AttnCache, ...] | None]:
        """(m [B, T, D], caches): ``next_embeds`` are the embeddings of the tokens one position ahead of
        ``hidden`` (the main model's final hidden states, or m of the previous draft step). ``caches`` None: a
        cache-free pass over whole sequences."""
        x = jnp.concatenate([self.pre_fc_norm_embedding(next_embeds_btd), self.pre_fc_norm_hidden(hidden_btd)],
                            axis=-1)
        x = self.fc(x)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, ctx, None if caches is None else caches[i])
            new_caches.append(cache)
        return self.norm(x), None if caches is None else tuple(new_caches)
