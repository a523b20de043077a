"""Padding isolation in the Gated DeltaNet mixer: pad tokens leave conv and recurrent state as if absent."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwenvl_jax.models.gated_deltanet import GatedDeltaNet
from qwenvl_jax.tiny_model import TINY_CONFIGS, hf_config_dict
from qwenvl_jax.config import parse_config


def test_right_padding_matches_the_unpadded_row():
    text, vision = TINY_CONFIGS["qwen3_5"]
    cfg = parse_config(hf_config_dict("qwen3_5", dict(text, linear_conv_kernel_dim=4), vision)).text
    gdn = GatedDeltaNet(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(1), 3)
    t, n = 70, 9  # a row of 9 real tokens padded to 70 (past one 64-token chunk)
    x = jax.random.normal(keys[0], (2, t, cfg.hidden_size))
    conv0, rec0 = gdn.init_state(2, jnp.float32)
    state = (jax.random.normal(keys[1], conv0.shape), 0.1 * jax.random.normal(keys[2], rec0.shape))

    out_b, (conv_b, rec_b) = gdn.mix(x, jnp.array([t, n]), state)
    out_a, (conv_a, rec_a) = gdn.mix(x[1:, :n], jnp.array([n]), tuple(s[1:] for s in state))

    # Not bitwise: on a GPU the input projection's GEMM may round differently for the two batch shapes.
    np.testing.assert_allclose(conv_b[1], conv_a[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rec_b[1], rec_a[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out_b[1, :n], out_a[0], rtol=1e-5, atol=1e-6)
    # The full row is unaffected by its neighbour's padding.
    out_full, (conv_full, rec_full) = gdn.mix(x[:1], jnp.array([t]), tuple(s[:1] for s in state))
    np.testing.assert_allclose(out_b[0], out_full[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conv_b[0], conv_full[0], rtol=1e-6, atol=1e-6)
