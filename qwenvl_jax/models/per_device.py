"""Pallas kernels on a device mesh: each device runs the kernel on its own heads.

XLA's SPMD partitioner cannot split a Pallas custom call. It gathers every operand onto every device and runs the
whole call on each, which for decode attention means all-gathering the KV cache every step. So in a program traced
under a mesh (``qwenvl_jax.sharding.mesh_context``: the engine and ``QwenVL.logits`` trace under the parameters'
mesh), the kernels' call sites go through ``on_local_heads``: ``jax.shard_map`` over the "tensor" axis, each
operand split on its head axis, when that axis divides every head count involved (the rule
``qwenvl_jax.sharding`` places the caches by).
Elsewhere (one device, or heads the axis does not divide) the kernel is called as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

TENSOR, EXPERT = "tensor", "expert"


def context_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh the program is traced under, or None on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def tensor_splits(*head_counts: int, tensor_parallel: int | None = None) -> bool:
    """Whether the tensor axis (``tensor_parallel``, default the traced mesh's) splits every one of these head
    counts: then the heads and the caches that follow them are split, else they are whole on every device."""
    if tensor_parallel is None:
        mesh = context_mesh()
        tensor_parallel = 1 if mesh is None else mesh.shape[TENSOR]
    return tensor_parallel > 1 and all(h % tensor_parallel == 0 for h in head_counts)


def _spec(ndim: int, axis: int | None) -> P:
    return P() if axis is None else P(*(TENSOR if i == axis else None for i in range(ndim)))


def on_local_heads(kernel: Callable, args: Sequence, arg_head_axes: Sequence[int | None],
                   out_head_axes: Sequence[int | None], head_counts: Sequence[int]):
    """``kernel(*args)``, per device on its share of the heads when the traced mesh's tensor axis splits
    ``head_counts``. ``arg_head_axes`` / ``out_head_axes``: each argument's / output's head axis (None: the same
    on every device, e.g. lengths). Outputs are a tuple (or one array when ``out_head_axes`` has one entry)."""
    if not tensor_splits(*head_counts):
        return kernel(*args)
    in_specs = tuple(_spec(a.ndim, axis) for a, axis in zip(args, arg_head_axes, strict=True))
    shapes = jax.eval_shape(kernel, *args)
    single = len(out_head_axes) == 1
    outs = (shapes,) if single else shapes
    out_specs = tuple(P() if o is None else _spec(o.ndim, axis) for o, axis in zip(outs, out_head_axes, strict=True))
    return jax.shard_map(kernel, mesh=context_mesh(), in_specs=in_specs,
                         out_specs=out_specs[0] if single else out_specs, check_vma=False)(*args)
