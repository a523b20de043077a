"""The assembled model (HF: ``*ForConditionalGeneration`` / ``*ForCausalLM``) and its pure forward functions.

Compiled programs take ``(graphdef, params)`` split with ``nnx.split``, so every jitted call is a pure function of
arrays; the functions here are what those programs run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.models.decoder import TextModel
from qwenvl_jax.models.fp8 import quantize_linears
from qwenvl_jax.models.layers import Linear
from qwenvl_jax.models.mtp import MtpHead
from qwenvl_jax.models.multimodal import MultimodalInputs, fuse_vision
from qwenvl_jax.models.vision import VisionModel


class QwenVLModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.bfloat16, rngs: nnx.Rngs):
        text = cfg.text
        self.language_model = TextModel(text, dtype=dtype, rngs=rngs)
        self.visual = None if cfg.vision is None else VisionModel(cfg.vision, dtype=dtype, rngs=rngs)
        self.lm_head = None if text.tie_word_embeddings else Linear(
            text.hidden_size, text.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        self.mtp = MtpHead(text, dtype=dtype, rngs=rngs) if text.mtp_layers else None
        self.cfg = cfg
        if cfg.fp8 is not None:
            quantize_linears(self, cfg.fp8)

    def lm_logits(self, hidden_btd: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.language_model.embed_tokens.attend(hidden_btd)
        return self.lm_head(hidden_btd)

    def text_logits(self, input_ids_bt: jax.Array, positions_3bt: jax.Array, lengths_b: jax.Array) -> jax.Array:
        embeds = self.language_model.embed_tokens(input_ids_bt)
        return self.lm_logits(self.language_model(embeds, positions_3bt, lengths_b))

    def multimodal_logits(self, input_ids_bt: jax.Array, positions_3bt: jax.Array, lengths_b: jax.Array,
                          mm: MultimodalInputs) -> jax.Array:
        visual_md, deepstack_kmd = self.visual(mm.pixel_patches_np, mm.vision)
        embeds, deepstack_lbtd = fuse_vision(self.language_model.embed_tokens(input_ids_bt), visual_md,
                                             deepstack_kmd, mm.dest_m)
        return self.lm_logits(self.language_model(embeds, positions_3bt, lengths_b, deepstack_lbtd))


def abstract_model(cfg: ModelConfig, dtype: jnp.dtype) -> QwenVLModel:
    """The model with shapes and dtypes only: the target tree for conversion and checkpoint restore."""
    return nnx.eval_shape(lambda: QwenVLModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


@functools.partial(jax.jit, static_argnums=0)
def text_logits_fn(graphdef: nnx.GraphDef, params: nnx.State, input_ids_bt: jax.Array, positions_3bt: jax.Array,
                   lengths_b: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model.text_logits(input_ids_bt, positions_3bt, lengths_b).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def multimodal_logits_fn(graphdef: nnx.GraphDef, params: nnx.State, input_ids_bt: jax.Array,
                         positions_3bt: jax.Array, lengths_b: jax.Array, mm: MultimodalInputs) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return model.multimodal_logits(input_ids_bt, positions_3bt, lengths_b, mm).astype(jnp.float32)
