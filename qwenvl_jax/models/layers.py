"""Building blocks shared by the text decoder and the vision tower.

Parameter names mirror HF's module names so a reader can hold both side by side, with one convention the
converter relies on: a projection's matrix is ``kernel`` laid out [in, out] (HF stores ``weight`` as [out, in]);
every other tensor keeps HF's name and layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.skinny_matmul import skinny_matmul, skinny_matmul_fp8
from qwenvl_jax.models.fp8 import dequantize
from qwenvl_jax.models.per_device import context_mesh


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None
        # FP8 (qwenvl_jax.models.fp8.quantize_linears): the kernel's block scales and their block shape.
        self.kernel_scale_inv = nnx.data(None)
        self.block = None

    def weight(self, dtype: jnp.dtype) -> jax.Array:
        """The [in, out] weight as the matmul reads it (an FP8 kernel dequantized blockwise)."""
        if self.kernel_scale_inv is None:
            return self.kernel[...]
        return dequantize(self.kernel[...], self.kernel_scale_inv[...], self.block, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if context_mesh() is not None:  # XLA splits its own dot over the mesh; a Pallas call would gather the weight
            y = None
        elif self.kernel_scale_inv is None:
            y = skinny_matmul(x, self.kernel[...])
        else:
            y = skinny_matmul_fp8(x, self.kernel[...], self.kernel_scale_inv[...], self.block)
        if y is None:
            y = jnp.dot(x, self.weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embedding(nnx.Module):
    def __init__(self, num_embeddings: int, features: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (num_embeddings, features), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: logits against the embedding table."""
        return jnp.dot(x, self.weight[...].T)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, zero_centered: bool) -> jax.Array:
    """HF's two RMSNorm flavours, including where each casts back to the activation dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if zero_centered:  # Qwen3.5: (x * (1 + w)) in fp32, then cast
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight * normed.astype(x.dtype)  # Qwen2/3: cast, then scale


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, zero_centered: bool, dtype: jnp.dtype):
        # Zero-centred norms store w with the identity at 0, the others at 1.
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if zero_centered else jnp.ones((dim,), dtype))
        self.eps = eps
        self.zero_centered = zero_centered

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, self.zero_centered)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool, act: str, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, bias=bias, dtype=dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))
