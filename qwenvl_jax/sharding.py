"""Tensor and expert parallelism over a device mesh: where each parameter lives.

A ``Mesh`` with axes ("expert", "tensor") and a rule per parameter (by its path in our tree, which mirrors HF's
module names): attention heads, Gated DeltaNet heads (projections, conv channels in head blocks: see
``gdn_head_blocks``), MLP and shared-expert intermediate columns, and the vocabulary split over "tensor"; MoE
experts over "expert"; everything else (norms, the vision tower) replicated. A dimension that does not divide
its axis stays whole. XLA's SPMD partitioner then runs the jitted programs on the mesh and inserts the
collectives the shardings need, so results do not depend on the rules: only the communication does.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwenvl_jax.config import ModelConfig
from qwenvl_jax.models.attention import AttnCache
from qwenvl_jax.models.gated_deltanet import GdnCache
from qwenvl_jax.models.per_device import EXPERT, TENSOR, tensor_splits


def make_mesh(tensor_parallel: int = 1, expert_parallel: int = 1, devices=None) -> Mesh:
    """A mesh of tensor_parallel x expert_parallel devices (the first ones of ``jax.devices()``)."""
    devices = jax.devices() if devices is None else devices
    need = tensor_parallel * expert_parallel
    if tensor_parallel < 1 or expert_parallel < 1 or need > len(devices):
        raise ValueError(f"tensor_parallel={tensor_parallel} x expert_parallel={expert_parallel} needs {need} devices; "
                         f"{len(devices)} are visible")
    grid = np.asarray(devices[:need]).reshape(expert_parallel, tensor_parallel)
    return Mesh(grid, (EXPERT, TENSOR))


def _spec(path: tuple[str, ...], shape: tuple[int, ...], cfg: ModelConfig, mesh: Mesh) -> P:
    """The partition of one parameter (our kernels are [in, out])."""
    if path[0] == "visual":
        return P()
    tp = mesh.shape[TENSOR]
    text = cfg.text
    module, leaf = ".".join(path[:-1]), path[-1]
    if len(path) >= 2 and path[-2] == "experts":
        spec = P(EXPERT, *([None] * (len(shape) - 1)))
    elif "linear_attn" in path and text.gdn_head_blocks > 1:  # Gated DeltaNet by heads (see gdn_head_blocks)
        if leaf in ("dt_bias", "A_log"):
            spec = P(TENSOR)
        elif module.endswith("out_proj"):
            spec = P(TENSOR, None)
        elif module.endswith(("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "conv1d")):
            spec = P(None, TENSOR)
        else:
            spec = P()
    else:
        heads_split = tensor_splits(text.num_attention_heads, tensor_parallel=tp)
        columns = (module.endswith(("gate_proj", "up_proj", "lm_head"))
                   or module.endswith("self_attn.q_proj") and heads_split
                   or module.endswith(("self_attn.k_proj", "self_attn.v_proj"))
                   and tensor_splits(text.num_key_value_heads, tensor_parallel=tp))
        rows = module.endswith("down_proj") or module.endswith("self_attn.o_proj") and heads_split
        if module.endswith("embed_tokens") and leaf == "weight":
            spec = P(TENSOR, None)  # vocabulary rows
        elif columns and leaf == "kernel":
            spec = P(None, TENSOR)
        elif columns and leaf == "bias":
            spec = P(TENSOR)
        elif rows and leaf == "kernel":
            spec = P(TENSOR, None)
        else:
            spec = P()
    sizes = {TENSOR: tp, EXPERT: mesh.shape[EXPERT]}
    # A dimension its axis does not divide stays whole.
    return P(*(axis if axis is None or shape[i] % sizes[axis] == 0 else None for i, axis in enumerate(spec)))


def gdn_head_blocks(cfg: ModelConfig, tensor_parallel: int) -> int:
    """``TextConfig.gdn_head_blocks`` on a tensor axis of this size: the size itself when it splits both Gated
    DeltaNet head counts (then its projections, conv and state split by heads: no collective inside the mixer),
    else 1 (the projections whole on every device). FP8 projections keep HF's layout: their block scales would
    need the same permutation."""
    text = cfg.text
    fp8_qkv = cfg.fp8 is not None and any(m.endswith("linear_attn.in_proj_qkv") for m in cfg.fp8.modules)
    split = tensor_splits(text.linear_num_key_heads, text.linear_num_value_heads, tensor_parallel=tensor_parallel)
    return tensor_parallel if "linear_attention" in text.layer_types and split and not fp8_qkv else 1


def laid_out_for(cfg: ModelConfig, mesh: Mesh | None) -> ModelConfig:
    """``cfg`` with the parameter layout ``mesh`` asks for (``gdn_head_blocks``); as given without a mesh."""
    return cfg if mesh is None else cfg.with_gdn_head_blocks(gdn_head_blocks(cfg, mesh.shape[TENSOR]))


def to_head_blocks(path: tuple, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """A parameter in the layout ``cfg.text.gdn_head_blocks`` asks for: Gated DeltaNet's in_proj_qkv and conv1d
    kernels have their [q | k | v] channels (last axis) regrouped into blocks of [q_i | k_i | v_i]; others as
    given. On a mesh the result keeps x's sharding: XLA moves the columns between devices."""
    text, keys = cfg.text, tuple(map(str, path))
    if text.gdn_head_blocks == 1 or keys[-3:] not in (("linear_attn", "in_proj_qkv", "kernel"),
                                                      ("linear_attn", "conv1d", "kernel")):
        return x

    def regroup(x):
        parts = jnp.split(x, [text.gdn_key_dim, 2 * text.gdn_key_dim], axis=-1)
        blocks = [p.reshape(*p.shape[:-1], text.gdn_head_blocks, -1) for p in parts]
        return jnp.concatenate(blocks, axis=-1).reshape(x.shape)

    return jax.jit(regroup, out_shardings=x.sharding)(x)


def param_sharding(path: tuple, shape: tuple[int, ...], cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Where the parameter at ``path`` (keys of our tree) of ``shape`` lives on ``mesh``."""
    return NamedSharding(mesh, _spec(tuple(map(str, path)), tuple(shape), cfg, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_state(state, cfg: ModelConfig, mesh: Mesh):
    """The engine's decode state on the mesh: KV caches [S, L, KV, D] split by KV heads and Gated DeltaNet
    recurrent states [S, Hv, Dk, Dv] by value heads (where the heads divide the tensor axis), the rest
    replicated."""
    tp, text = mesh.shape[TENSOR], cfg.text

    def place(x, spec=P()):
        return jax.device_put(x, NamedSharding(mesh, spec))

    def layer(cache):
        # Split where the kernels split them (``per_device``): decode attention by KV heads when the query heads
        # split too, the gated delta rule by value heads when the key heads split too.
        if isinstance(cache, AttnCache):
            split = tensor_splits(text.num_attention_heads, text.num_key_value_heads, tensor_parallel=tp)
            spec = P(None, None, TENSOR, None) if split else P()
            return AttnCache(place(cache.k, spec), place(cache.v, spec))
        if isinstance(cache, GdnCache):
            split = tensor_splits(text.linear_num_key_heads, text.linear_num_value_heads, tensor_parallel=tp)
            spec = P(None, TENSOR) if split else P()
            conv = P(None, None, TENSOR) if text.gdn_head_blocks > 1 else P()  # channels in head blocks
            return GdnCache(place(cache.conv, conv), place(cache.recurrent, spec))
        return jax.tree_util.tree_map(place, cache)

    placed = jax.tree_util.tree_map(place, state._replace(layers=(), spec=None))
    spec = None if state.spec is None else state.spec._replace(
        mtp_layers=tuple(layer(c) for c in state.spec.mtp_layers),
        **{f: place(getattr(state.spec, f)) for f in ("drafts", "chunk_hidden", "draft_table")})
    return placed._replace(layers=tuple(layer(c) for c in state.layers), spec=spec)


def mesh_of(params: nnx.State) -> Mesh | None:
    """The mesh the parameters live on (None on a single device)."""
    for leaf in jax.tree_util.tree_leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def mesh_context(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """The context to trace programs on ``mesh`` in (a no-op for None): ``models.per_device`` reads it to run the
    Pallas kernels per device. Entered inside the traced function (the engine) or around the jitted call (then
    every call of the compiled program must be made in it: the mesh is part of the cache key)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
