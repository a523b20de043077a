"""The text decoder: embeddings, a stack of decoder layers, the final norm.

Layers are stored stacked per position in the repeating ``(layer_type, mlp_type)`` pattern (Qwen3.5: three GDN
layers then one attention layer; the other families: period 1) and the forward pass scans over the repeats, so a
jitted call sees a few dozen leaves instead of hundreds and compiles one group body. Layers past the last full
repeat (a pattern that does not divide the depth) live in a short unstacked ``tail``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.cache import LayerCache
from qwenvl_jax.config import TextConfig
from qwenvl_jax.models.attention import Attention
from qwenvl_jax.models.context import ForwardContext, full_sequence_context
from qwenvl_jax.models.gated_deltanet import GatedDeltaNet
from qwenvl_jax.models.layers import Embedding, GatedMLP, RMSNorm
from qwenvl_jax.models.moe import SparseMoeBlock
from qwenvl_jax.models.rope import mrope_cos_sin

LayerKind = tuple[str, str]  # (layer_type, mlp_type)


def layer_kinds(cfg: TextConfig) -> list[LayerKind]:
    return list(zip(cfg.layer_types, cfg.mlp_types))


def repeat_period(kinds: list[LayerKind]) -> int:
    """Smallest p with kinds[i] == kinds[i % p] for every i."""
    n = len(kinds)
    return next(p for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))


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

    def __call__(self, x_btd: jax.Array, ctx: ForwardContext, cache: LayerCache | None = None,
                 r: jax.Array | int = 0) -> tuple[jax.Array, LayerCache | None]:
        mixer = self.self_attn if self.self_attn is not None else self.linear_attn
        h, cache = mixer(self.input_layernorm(x_btd), ctx, cache, r)
        x_btd = x_btd + h
        return x_btd + self.mlp(self.post_attention_layernorm(x_btd)), cache


def _stacked_layers(cfg: TextConfig, kind: LayerKind, count: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> DecoderLayer:
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(r: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, kind, dtype=dtype, rngs=r)

    return make(rngs)


class TextModel(nnx.Module):
    """HF: ``*TextModel`` (``model.language_model``)."""

    def __init__(self, cfg: TextConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kinds = layer_kinds(cfg)
        period = repeat_period(kinds)
        n_repeats = len(kinds) // period
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.groups = nnx.List([_stacked_layers(cfg, kinds[j], n_repeats, dtype, rngs) for j in range(period)])
        self.tail = nnx.List(
            [DecoderLayer(cfg, kinds[i], dtype=dtype, rngs=rngs) for i in range(n_repeats * period, len(kinds))]
        )
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, zero_centered=cfg.norm_zero_centered, dtype=dtype)
        self.cfg = cfg
        self.period, self.n_repeats = period, n_repeats

    def layer_slot(self, layer_idx: int) -> tuple[str, int, int | None]:
        """Where HF layer ``layer_idx`` lives: ("groups", position, repeat) or ("tail", index, None)."""
        stacked = self.period * self.n_repeats
        if layer_idx < stacked:
            return "groups", layer_idx % self.period, layer_idx // self.period
        return "tail", layer_idx - stacked, None

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
        """Runs every layer, reading and writing ``caches`` (layout of ``qwenvl_jax.cache``) when given."""
        n_deep = 0 if deepstack_lbtd is None else deepstack_lbtd.shape[0]
        caches = caches if caches is not None else (None,) * (self.period + len(self.tail))

        def add_deepstack(x: jax.Array, layer_idx: jax.Array | int) -> jax.Array:
            if not n_deep:
                return x
            extra = jnp.take(deepstack_lbtd, jnp.minimum(layer_idx, n_deep - 1), axis=0)
            return x + jnp.where(layer_idx < n_deep, extra, jnp.zeros_like(extra))

        graphdefs, states = zip(*(nnx.split(g) for g in self.groups))

        # Caches ride in the loop carry (updated in place at repeat r), parameters are the scanned input.
        def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            x, group_caches = carry
            repeat, layer_states = xs
            new_caches = []
            for j, (gd, st) in enumerate(zip(graphdefs, layer_states)):
                x, c = nnx.merge(gd, st)(x, ctx, group_caches[j], repeat)
                new_caches.append(c)
                x = add_deepstack(x, repeat * self.period + j)
            return (x, tuple(new_caches)), None

        (x, group_caches), _ = jax.lax.scan(
            body, (embeds_btd, caches[: self.period]), (jnp.arange(self.n_repeats), tuple(states)))
        tail_caches = []
        for i, layer in enumerate(self.tail):
            x, c = layer(x, ctx, caches[self.period + i], 0)
            tail_caches.append(c)
            x = add_deepstack(x, self.period * self.n_repeats + i)
        return self.norm(x), tuple(group_caches) + tuple(tail_caches)
