"""The text decoder: embeddings, the decoder layers, the final norm.

Every layer owns its own parameter arrays (``layers[i]``, HF's ``model.language_model.layers.{i}``) and the
forward pass is a Python loop, unrolled in the compiled program. Stacking the layers and scanning over them
compiles a smaller program, but XLA then copies every layer's weights out of the stack before the matmuls read
them: measured on an H100, ~200 weight copies per decode step held batch-1 decode at 30% of its weight-read
roofline (bench/NOTES.md). Per-layer arrays are read where they live.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.attention import Attention, AttnCache, init_attn_cache
from qwenvl_jax.models.context import ForwardContext, full_sequence_context
from qwenvl_jax.models.gated_deltanet import GatedDeltaNet, GdnCache, init_gdn_cache
from qwenvl_jax.models.layers import Embedding, GatedMLP, RMSNorm
from qwenvl_jax.models.moe import SparseMoeBlock
from qwenvl_jax.models.rope import mrope_cos_sin

LayerKind = tuple[str, str]  # (layer_type, mlp_type)
LayerCache = AttnCache | GdnCache


def layer_kinds(cfg: TextConfig) -> list[LayerKind]:
    return list(zip(cfg.layer_types, cfg.mlp_types))


def init_layer_caches(cfg: TextConfig, slots: int, max_len: int, dtype: jnp.dtype) -> tuple[LayerCache, ...]:
    """Zero decode state of every layer, in layer order: a KV cache for attention layers, conv window and
    recurrent state for Gated DeltaNet layers, each with ``slots`` rows."""
    return tuple(init_attn_cache(cfg, slots, max_len, dtype) if kind == "full_attention"
                 else init_gdn_cache(cfg, slots, dtype) for kind in cfg.layer_types)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, kind: LayerKind, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        layer_type, mlp_type = kind
        norm = dict(eps=cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs) if layer_type == "full_attention" else None
        self.linear_attn = GatedDeltaNet(cfg, dtype=dtype, rngs=rngs) if layer_type == "linear_attention" else None
        if mlp_type == "moe":
            self.mlp = SparseMoeBlock(cfg, dtype=dtype, rngs=rngs)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False, act="silu", dtype=dtype,
                                rngs=rngs)

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, cache: LayerCache | None = None
                 ) -> tuple[jax.Array, LayerCache | None]:
        mixer = self.self_attn if self.self_attn is not None else self.linear_attn
        h, cache = mixer(self.input_layernorm(x_btd), ctx, cache)
        x_btd = x_btd + h
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), cache


class TextModel(nnx.Module):
    """HF: ``*TextModel`` (``model.language_model``)."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, kind, dtype=dtype, rngs=rngs) for kind in layer_kinds(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered, dtype=dtype)
        self.cfg = cfg

    def __call__(
        self,
        embeds_btd: jax.Array,
        positions_3bt: jax.Array,
        lengths_b: jax.Array,
        deepstack_lbtd: jax.Array | None = None,
    ) -> jax.Array:
        """Cache-free forward over whole right-padded rows: hidden states after the final norm.

        ``deepstack_lbtd[i]`` is added after layer i (Qwen3-VL DeepStack)."""
        cos, sin = mrope_cos_sin(positions_3bt, self.cfg)
        hidden, _ = self.forward(embeds_btd, full_sequence_context(cos, sin, lengths_b), None, deepstack_lbtd)
        return hidden

    def forward(
        self,
        embeds_btd: jax.Array,
        ctx: ForwardContext,
        caches: tuple[LayerCache, ...] | None,
        deepstack_lbtd: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[LayerCache, ...] | None]:
        """Runs every layer, reading and writing ``caches`` (one per layer, ``init_layer_caches``) when given."""
        n_deep = 0 if deepstack_lbtd is None else deepstack_lbtd.shape[0]
        x, new_caches = embeds_btd, []
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, ctx, None if caches is None else caches[i])
            new_caches.append(cache)
            if i < n_deep:
                x = x + deepstack_lbtd[i]
        return self.norm(x), None if caches is None else tuple(new_caches)
