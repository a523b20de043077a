"""Fine-grained FP8 weights (HF ``"quant_method": "fp8"``, the format of Qwen's ``-FP8`` checkpoints).

A quantized Linear keeps its kernel [in, out] as float8_e4m3fn and ``kernel_scale_inv`` [ceil(in / bi),
ceil(out / bo)] fp32, one scale per (bo output rows x bi input columns) block of HF's [out, in] weight, so that
weight = kernel * scale_inv blockwise. Which Linears are FP8 is the checkpoint's say (``Fp8Config.modules``);
the others stay in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qwenvl_jax.config import Fp8Config

FP8_DTYPE = jnp.float8_e4m3fn


def scale_shape(in_features: int, out_features: int, block: tuple[int, int]) -> tuple[int, int]:
    """``kernel_scale_inv``'s shape for a [in, out] kernel; ``block`` is HF's (output rows, input columns)."""
    block_out, block_in = block
    return -(-in_features // block_in), -(-out_features // block_out)


def dequantize(kernel_io: jax.Array, scale_inv_io: jax.Array, block: tuple[int, int], dtype: jnp.dtype) -> jax.Array:
    """The [in, out] weight in ``dtype``: each block of the FP8 kernel times its scale (fp32 arithmetic)."""
    block_out, block_in = block
    n_in, n_out = kernel_io.shape
    scale = jnp.repeat(jnp.repeat(scale_inv_io.astype(jnp.float32), block_in, axis=0)[:n_in], block_out, axis=1)
    return (kernel_io.astype(jnp.float32) * scale[:, :n_out]).astype(dtype)


def _module_at(root: nnx.Module, dotted: str) -> nnx.Module:
    node = root
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def quantize_linears(model: nnx.Module, cfg: Fp8Config) -> None:
    """Makes the modules named in ``cfg.modules`` (Linears, MoE experts) FP8 in place (weights float8_e4m3fn,
    scales 1): the structure a converted or loaded FP8 checkpoint fills."""
    for dotted in cfg.modules:
        module = _module_at(model, dotted)
        if hasattr(module, "kernel_scale_inv"):  # models.layers.Linear
            kernel = module.kernel[...]
            module.kernel = nnx.Param(kernel.astype(FP8_DTYPE))
            module.kernel_scale_inv = nnx.Param(jnp.ones(scale_shape(*kernel.shape, cfg.block), jnp.float32))
        elif hasattr(module, "gate_up_proj_scale_inv"):  # models.moe.Experts: gate's blocks, then up's
            gate_up, down = module.gate_up_proj[...], module.down_proj[...]
            experts, hidden, double = gate_up.shape
            gate_blocks = scale_shape(hidden, double // 2, cfg.block)
            module.gate_up_proj = nnx.Param(gate_up.astype(FP8_DTYPE))
            module.down_proj = nnx.Param(down.astype(FP8_DTYPE))
            module.gate_up_proj_scale_inv = nnx.Param(
                jnp.ones((experts, gate_blocks[0], 2 * gate_blocks[1]), jnp.float32))
            module.down_proj_scale_inv = nnx.Param(
                jnp.ones((experts, *scale_shape(*down.shape[1:], cfg.block)), jnp.float32))
        else:
            raise ValueError(f"FP8 weights for {dotted}, a {type(module).__name__}: only linear layers and MoE "
                             "experts take FP8 weights")
        module.block = cfg.block


# Module-name fragments that Qwen's FP8 checkpoints keep unquantized: the vision tower, the LM head and
# embeddings, MoE routers and shared-expert gates.
KEEP_UNQUANTIZED = ("visual", "lm_head", "embed_tokens", "mlp.gate", "shared_expert_gate")


def quantizable(module: str, keep: tuple[str, ...] = KEEP_UNQUANTIZED) -> bool:
    """Whether ``--dtype fp8`` stores this Linear (dotted path) in FP8: no ``keep`` entry names it or a module
    around it (whole dotted components: "mlp.gate" is the router, not "mlp.gate_proj")."""
    return not any(f".{k}." in f".{module}." for k in keep)


def quantize_rows(w_io, block: tuple[int, int]):
    """numpy: one row-block ([<= block_in, out] of a [in, out] weight) -> (float8_e4m3fn rows, fp32 scales
    [out blocks]): each block scaled so that its largest magnitude is float8_e4m3fn's largest (448), HF's
    ``weight_scale_inv`` = max |w| / 448 (1 for an all-zero block)."""
    import ml_dtypes
    import numpy as np

    block_out = block[0]
    rows, out = w_io.shape
    blocks = -(-out // block_out)
    padded = np.zeros((rows, blocks * block_out), np.float32)
    padded[:, :out] = w_io
    amax = np.abs(padded.reshape(rows, blocks, block_out)).max(axis=(0, 2))
    scale = np.where(amax > 0, amax / float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max), 1.0).astype(np.float32)
    q = (padded.reshape(rows, blocks, block_out) / scale[None, :, None]).reshape(rows, -1)[:, :out]
    return q.astype(ml_dtypes.float8_e4m3fn), scale
