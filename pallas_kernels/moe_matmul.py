"""Routed experts of a sparse MoE layer as two grouped matmuls that read only the routed experts' weights.

Output [N, D] = sum_k weights[n, k] * down[e](silu(x[n] @ gate[e]) * (x[n] @ up[e])), e = experts[n, k].
XLA may lower `jax.lax.ragged_dot` on GPU to a masked dot over every expert; at decode (1-64 tokens, top-8 of
128-512 experts) that moves 16-64x the weight bytes the routed experts need. Here (vLLM's fused_moe layout):
the N*K (token, expert) pairs are sorted by expert and each expert's group is padded to a multiple of block_m
rows ("slots"), so every block of block_m slots belongs to one expert. Kernel 1 runs over (block, F column
tile): it gathers its tokens' x rows, reads that expert's gate and up tiles and writes silu(gate) * up, so the
[pairs, 2F] intermediate never exists. Kernel 2 runs over (block, D column tile) and applies the expert's down
projection. Each kernel reads each routed expert's weights once per block of its pairs and no other expert's.
The weighted sum over the K experts of each token is a small gather and einsum in plain JAX.
Lowered through Triton on GPU, or run by the Pallas interpreter on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Impl = Literal["auto", "reference", "pallas", "interpret"]


def moe_experts_ref(
    x_nd: jax.Array, experts_nk: jax.Array, weights_nk: jax.Array, gate_up_edf: jax.Array, down_efd: jax.Array
) -> jax.Array:
    """Pure-JAX reference: the arithmetic of qwenvl_jax.models.moe.SparseMoeBlock, op for op (the model's
    CPU results and its HF parity tests depend on it being bit-identical)."""
    num_tokens, top_k = experts_nk.shape
    flat_expert = experts_nk.reshape(-1)  # [n*k], token-major
    order = jnp.argsort(flat_expert, stable=True)
    token_of = order // top_k
    group_sizes = jnp.bincount(flat_expert, length=gate_up_edf.shape[0]).astype(jnp.int32)
    xs = jnp.take(x_nd, token_of, axis=0)
    gate_up = lax.ragged_dot(xs, gate_up_edf, group_sizes)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    h = lax.ragged_dot(jax.nn.silu(gate) * up, down_efd, group_sizes)
    # Back to token-major order, weight each expert's output, sum over the k experts.
    h_nkd = jnp.zeros_like(h).at[order].set(h).reshape(num_tokens, top_k, x_nd.shape[1])
    return jnp.einsum("nkd,nk->nd", h_nkd, weights_nk.astype(h.dtype))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """block_m slots per block (one expert each); kernel 1 (gate/up) and kernel 2 (down) column and
    contraction tiles; Triton warps and software-pipeline stages of both kernels."""

    block_m: int
    gate_up_block_n: int
    gate_up_block_k: int
    down_block_n: int
    down_block_k: int
    num_warps: int
    num_stages: int


def default_tiling(num_tokens: int, top_k: int, num_experts: int) -> Tiling:
    """16-row blocks while the average expert gets at most 8 pairs (vLLM's default switch, tokens <= experts at
    top-8): decode, where an expert has a few rows and 16 is Triton's smallest matrix-product tile, so padding
    costs little. The weights then stream from HBM once: narrow gate/up column tiles (32) give 8 routed experts
    x 16 tiles = 128 programs at F=512 and batch 1, about one per SM (down: 64-wide, 8 x 32 = 256 at D=2048), and
    128-deep contraction tiles in 4 pipeline stages (20 KiB of x and weight tiles each) keep loads in flight.
    Past that (prefill), 64-row blocks, so an expert's weight tile is read once per 64 pairs instead of once per
    16, with the square-ish tiles of a compute-bound Triton GEMM. Not yet measured on a GPU."""
    if num_tokens * top_k <= 8 * num_experts:
        return Tiling(block_m=16, gate_up_block_n=32, gate_up_block_k=128, down_block_n=64, down_block_k=128,
                      num_warps=4, num_stages=4)
    return Tiling(block_m=64, gate_up_block_n=64, gate_up_block_k=64, down_block_n=128, down_block_k=64,
                  num_warps=4, num_stages=3)


def _fit(tiling: Tiling, hidden: int, intermediate: int) -> Tiling:
    """Tiles wider than the matrix they cut shrink to it (small test models)."""
    return dataclasses.replace(
        tiling,
        gate_up_block_n=min(tiling.gate_up_block_n, intermediate),
        gate_up_block_k=min(tiling.gate_up_block_k, hidden),
        down_block_n=min(tiling.down_block_n, hidden),
        down_block_k=min(tiling.down_block_k, intermediate),
    )


def tiling_error(tiling: Tiling, hidden: int, intermediate: int) -> str | None:
    """Why the kernels cannot run these tiles on [D=hidden, F=intermediate] experts, or None if they can:
    Triton tiles are powers of two of at least 16 (its smallest matrix-product tile), and the column and
    contraction tiles must divide the dimension they cut (the kernels do not mask ragged edges)."""
    cuts = {
        "block_m": (tiling.block_m, None),
        "gate_up_block_n": (tiling.gate_up_block_n, ("F", intermediate)),
        "gate_up_block_k": (tiling.gate_up_block_k, ("D", hidden)),
        "down_block_n": (tiling.down_block_n, ("D", hidden)),
        "down_block_k": (tiling.down_block_k, ("F", intermediate)),
    }
    for name, (size, dim) in cuts.items():
        if size < 16 or size & (size - 1):
            return f"{name}={size} must be a power of two >= 16"
        if dim is not None and dim[1] % size:
            return f"{name}={size} does not divide {dim[0]}={dim[1]}"
    return None


# At most one pair per this many experts: each pair takes its own block, no sort. Two pairs of one expert then read
# its weights twice, but with E/8 pairs over E experts that happens to ~6% of them, and the sort, bincount,
# cumsums and scatters of the grouped layout (about eight small kernels per layer) disappear: at batch 1 a
# layer's routed weights take ~11 us to read on an H200 (Qwen3.5-35B-A3B), so a few us per kernel is a large
# share. Predicted, not yet measured.
DIRECT_ROUTE_EXPERTS_PER_PAIR = 8


def _direct_route(experts_nk: jax.Array, block_m: int) -> tuple[jax.Array, ...]:
    """The tables of `_route` with block b holding pair b alone (row 0; the padding rows gather its token)."""
    num_tokens, top_k = experts_nk.shape
    pairs = num_tokens * top_k
    token_p = jnp.arange(pairs, dtype=jnp.int32) // top_k
    slot_token = jnp.broadcast_to(token_p[:, None], (pairs, block_m))
    return (jnp.full((1,), pairs, jnp.int32), experts_nk.reshape(-1).astype(jnp.int32), slot_token,
            jnp.arange(pairs, dtype=jnp.int32) * block_m)


# Up to this many pairs the tables are built by comparing every entry with every pair (one small reduction
# each), not by scattering into zeros: XLA makes each such scatter two kernels (the zeros copied into a fresh
# buffer, then the scatter), four tables a layer (kernel census, Qwen3.5-35B-A3B batch 8: 158 copies a step). The
# comparisons grow as entries x pairs (~1M at 512 pairs), so larger batches (prefill) keep the scatters.
COMPARE_ROUTE_MAX_PAIRS = 512


def _hits(size: int, index_p: jax.Array) -> jax.Array:
    """[size, pairs]: entry i against each pair's index."""
    return jnp.arange(size, dtype=jnp.int32)[:, None] == index_p[None, :]


def _table(size: int, index_p: jax.Array, value_p: jax.Array) -> jax.Array:
    """zeros(size).at[index].set(value) for values >= 0 whose repeated indices carry equal values, as one
    comparison and reduction."""
    return jnp.max(jnp.where(_hits(size, index_p), value_p[None, :], 0), axis=1).astype(jnp.int32)


def _route(experts_nk: jax.Array, num_experts: int, block_m: int) -> tuple[jax.Array, ...]:
    """Per-block routing tables for the kernels.

    The pairs, sorted by expert, are laid out in slots: expert e's pairs fill whole blocks of block_m slots, its
    first block right after the previous expert's last, the tail of its last block padding. The number of
    blocks, the static grid size, is at most cdiv(pairs, block_m) + min(experts, pairs): each non-empty expert
    adds at most one partly filled block. Returns (num_blocks [1] int32, block_expert [max_blocks] int32,
    slot_token [max_blocks, block_m] int32, pair_slot [pairs] int32: the slot of each token-major pair).
    Batches of at most E / DIRECT_ROUTE_EXPERTS_PER_PAIR pairs take the direct layout instead: block b is pair b."""
    num_tokens, top_k = experts_nk.shape
    pairs = num_tokens * top_k
    if pairs * DIRECT_ROUTE_EXPERTS_PER_PAIR <= num_experts:
        return _direct_route(experts_nk, block_m)
    max_blocks = pl.cdiv(pairs, block_m) + min(num_experts, pairs)
    flat_expert = experts_nk.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat_expert, stable=True)  # sorted position -> token-major pair
    sorted_expert = flat_expert[order]
    small = pairs <= COMPARE_ROUTE_MAX_PAIRS
    group_sizes = (jnp.sum(_hits(num_experts, flat_expert), axis=1, dtype=jnp.int32) if small
                   else jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32))
    group_blocks = (group_sizes + block_m - 1) // block_m
    blocks_end = jnp.cumsum(group_blocks)
    first_slot = (blocks_end - group_blocks) * block_m
    first_sorted = jnp.cumsum(group_sizes) - group_sizes
    slot = first_slot[sorted_expert] + jnp.arange(pairs, dtype=jnp.int32) - first_sorted[sorted_expert]
    # Padding slots gather token 0: a real row, so their loads stay in bounds; their results are never read.
    # Every pair stamps its expert on its block (a block's pairs all agree); blocks past the end stay 0:
    # their programs exit before reading any weight.
    if small:
        slot_token = _table(max_blocks * block_m, slot, order // top_k)
        block_expert = _table(max_blocks, slot // block_m, sorted_expert)
        pair_slot = _table(pairs, order, slot)
    else:
        slot_token = jnp.zeros(max_blocks * block_m, jnp.int32).at[slot].set(order // top_k)
        block_expert = jnp.zeros(max_blocks, jnp.int32).at[slot // block_m].set(sorted_expert)
        pair_slot = jnp.zeros(pairs, jnp.int32).at[order].set(slot)
    return blocks_end[-1:], block_expert, slot_token.reshape(max_blocks, block_m), pair_slot


def _tile_product(x_mk, w_ref, expert, rows, cols, scale_ref, scale_index):
    """x tile @ one expert's weight tile in fp32; FP8 weights (``scale_ref`` given) converted to x's dtype and
    the tile's block scale applied to the product (the tile nests in one scale block)."""
    if scale_ref is None:
        return jnp.dot(x_mk, w_ref[expert, rows, cols], preferred_element_type=jnp.float32)
    product = jnp.dot(x_mk, w_ref[expert, rows, cols].astype(x_mk.dtype), preferred_element_type=jnp.float32)
    return scale_ref[expert, scale_index[0], scale_index[1]] * product


def _gate_up_kernel(num_blocks_ref, block_expert_ref, slot_token_ref, x_ref, gate_up_ref, *refs, block_k,
                    scale_block):
    """Program (b, j): hidden columns [j*bn, (j+1)*bn) of block b's slots, silu(x @ gate) * (x @ up).
    FP8 (``scale_block`` = (output rows, input columns)): scales [E, D blocks, gate blocks then up blocks]."""
    scale_ref, h_ref = refs if scale_block is not None else (None, refs[0])
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(b < num_blocks_ref[0])
    def _():
        expert = block_expert_ref[b]
        token_m = slot_token_ref[...]
        block_m, block_n = h_ref.shape
        intermediate = gate_up_ref.shape[2] // 2
        gate_cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        up_cols = pl.ds(pl.multiple_of(intermediate + j * block_n, block_n), block_n)
        block_out, block_in = scale_block or (1, 1)
        up_blocks = scale_ref.shape[2] // 2 if scale_ref is not None else 0

        def step(i, acc):
            gate_mn, up_mn = acc
            rows = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            x_mk = x_ref[token_m, rows]
            kb, nb = (i * block_k) // block_in, (j * block_n) // block_out
            gate_mn += _tile_product(x_mk, gate_up_ref, expert, rows, gate_cols, scale_ref, (kb, nb))
            up_mn += _tile_product(x_mk, gate_up_ref, expert, rows, up_cols, scale_ref, (kb, up_blocks + nb))
            return gate_mn, up_mn

        zeros = jnp.zeros((block_m, block_n), jnp.float32)
        gate_mn, up_mn = lax.fori_loop(0, x_ref.shape[1] // block_k, step, (zeros, zeros))
        h_ref[...] = (jax.nn.silu(gate_mn) * up_mn).astype(h_ref.dtype)


def _down_kernel(num_blocks_ref, block_expert_ref, h_ref, down_ref, *refs, block_k, scale_block):
    """Program (b, j): output columns [j*bn, (j+1)*bn) of block b's slots, h @ down (FP8: scales
    [E, I blocks, D blocks])."""
    scale_ref, y_ref = refs if scale_block is not None else (None, refs[0])
    b, j = pl.program_id(0), pl.program_id(1)

    @pl.when(b < num_blocks_ref[0])
    def _():
        expert = block_expert_ref[b]
        block_m, block_n = y_ref.shape
        cols = pl.ds(pl.multiple_of(j * block_n, block_n), block_n)
        block_out, block_in = scale_block or (1, 1)

        def step(i, acc_mn):
            rows = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            index = ((i * block_k) // block_in, (j * block_n) // block_out)
            return acc_mn + _tile_product(h_ref[:, rows], down_ref, expert, rows, cols, scale_ref, index)

        acc_mn = lax.fori_loop(0, h_ref.shape[1] // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
        y_ref[...] = acc_mn.astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("tiling", "scale_block", "interpret"))
def moe_experts_pallas(
    x_nd: jax.Array,
    experts_nk: jax.Array,
    weights_nk: jax.Array,
    gate_up_edf: jax.Array,
    down_efd: jax.Array,
    scales: tuple[jax.Array, jax.Array] | None = None,
    *,
    tiling: Tiling,
    scale_block: tuple[int, int] | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The two kernels at a given (already fitted and checked) tiling; see moe_experts for the arguments.
    ``scales`` (FP8 float8_e4m3fn experts): (gate_up [E, D blocks, gate blocks + up blocks], down [E, I blocks,
    D blocks]) fp32 of ``scale_block`` = (output rows, input columns) blocks."""
    num_tokens, hidden = x_nd.shape
    top_k = experts_nk.shape[1]
    num_experts, intermediate = down_efd.shape[:2]
    block_m = tiling.block_m
    num_blocks, block_expert, slot_token, pair_slot = _route(experts_nk, num_experts, block_m)
    max_blocks = block_expert.shape[0]
    params = plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    # Routing tables, tokens and weights are passed whole: the kernels index them with the block's expert and
    # tokens, which a BlockSpec's index map (a function of the grid position only) cannot express.
    whole = pl.BlockSpec(memory_space=None)
    gate_up_scale, down_scale = ((s.astype(jnp.float32),) for s in scales) if scales is not None else ((), ())
    h_slots = pl.pallas_call(
        functools.partial(_gate_up_kernel, block_k=tiling.gate_up_block_k, scale_block=scale_block),
        grid=(max_blocks, intermediate // tiling.gate_up_block_n),
        in_specs=[whole, whole, pl.BlockSpec((None, block_m), lambda b, j: (b, 0)), whole, whole]
        + [whole] * len(gate_up_scale),
        out_specs=pl.BlockSpec((block_m, tiling.gate_up_block_n), lambda b, j: (b, j)),
        out_shape=jax.ShapeDtypeStruct((max_blocks * block_m, intermediate), x_nd.dtype),
        compiler_params=params,
        interpret=interpret,
        name="moe_gate_up",
    )(num_blocks, block_expert, slot_token, x_nd, gate_up_edf, *gate_up_scale)
    y_slots = pl.pallas_call(
        functools.partial(_down_kernel, block_k=tiling.down_block_k, scale_block=scale_block),
        grid=(max_blocks, hidden // tiling.down_block_n),
        in_specs=[whole, whole, pl.BlockSpec((block_m, intermediate), lambda b, j: (b, 0)), whole]
        + [whole] * len(down_scale),
        out_specs=pl.BlockSpec((block_m, tiling.down_block_n), lambda b, j: (b, j)),
        out_shape=jax.ShapeDtypeStruct((max_blocks * block_m, hidden), x_nd.dtype),
        compiler_params=params,
        interpret=interpret,
        name="moe_down",
    )(num_blocks, block_expert, h_slots, down_efd, *down_scale)
    y_nkd = y_slots[pair_slot].reshape(num_tokens, top_k, hidden)
    return jnp.einsum("nkd,nk->nd", y_nkd, weights_nk.astype(x_nd.dtype))


def _tiling_for(
    x_nd: jax.Array, experts_nk: jax.Array, gate_up_edf: jax.Array, down_efd: jax.Array, overrides: dict
) -> tuple[Tiling, str | None]:
    """The tiling to run (defaults by tokens per expert, overridden where given, fitted to small matrices)
    and why the kernels cannot take these inputs (None if they can)."""
    num_tokens, hidden = x_nd.shape
    num_experts, intermediate = down_efd.shape[:2]
    defaults = default_tiling(num_tokens, experts_nk.shape[1], num_experts)
    tiling = _fit(dataclasses.replace(defaults, **{k: v for k, v in overrides.items() if v is not None}),
                  hidden, intermediate)
    if gate_up_edf.shape != (num_experts, hidden, 2 * intermediate) or down_efd.shape[2] != hidden:
        return tiling, (f"expected gate_up [E, D, 2F] and down [E, F, D] with D={hidden}, got "
                        f"{gate_up_edf.shape} and {down_efd.shape}")
    if not x_nd.dtype == gate_up_edf.dtype == down_efd.dtype:
        # Triton's matrix product takes operands of one type.
        return tiling, (f"x, gate_up and down must share a dtype, got {x_nd.dtype}, {gate_up_edf.dtype}, "
                        f"{down_efd.dtype}")
    return tiling, tiling_error(tiling, hidden, intermediate)


def moe_experts(
    x_nd: jax.Array,
    experts_nk: jax.Array,
    weights_nk: jax.Array,
    gate_up_edf: jax.Array,
    down_efd: jax.Array,
    *,
    impl: Impl = "auto",
    block_m: int | None = None,
    gate_up_block_n: int | None = None,
    gate_up_block_k: int | None = None,
    down_block_n: int | None = None,
    down_block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Routed experts: x [N, D]; experts [N, K] int32 expert ids (distinct within a row); weights [N, K]
    routing weights; gate_up [E, D, 2F] (gate in columns [0, F), up in [F, 2F)); down [E, F, D].
    Returns [N, D] in x's dtype: sum_k weights[n, k] * down[e](silu(x[n] @ gate[e]) * (x[n] @ up[e])).

    impl: "auto" = the kernels when the default backend is GPU and the shapes fit their tiles, the reference
    otherwise; "reference", "pallas" (compiled kernels), "interpret" (kernels in the Pallas interpreter).
    The tiling arguments (None: `default_tiling`) apply to the kernels; tiles wider than the dimension they
    cut shrink to it. A shape or tile the kernels cannot take raises ValueError for "pallas"/"interpret".
    """
    if impl not in ("auto", "reference", "pallas", "interpret"):
        raise ValueError(f"impl must be auto, reference, pallas or interpret, got {impl!r}")
    if impl == "reference":
        return moe_experts_ref(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd)
    overrides = dict(block_m=block_m, gate_up_block_n=gate_up_block_n, gate_up_block_k=gate_up_block_k,
                     down_block_n=down_block_n, down_block_k=down_block_k, num_warps=num_warps,
                     num_stages=num_stages)
    tiling, error = _tiling_for(x_nd, experts_nk, gate_up_edf, down_efd, overrides)
    if impl == "auto":
        if jax.default_backend() != "gpu" or error is not None:
            return moe_experts_ref(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd)
        impl = "pallas"
    if error is not None:
        raise ValueError(f"the MoE Pallas kernels cannot take these inputs: {error}")
    return moe_experts_pallas(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd, tiling=tiling,
                              interpret=impl == "interpret")


def moe_experts_fp8(
    x_nd: jax.Array,
    experts_nk: jax.Array,
    weights_nk: jax.Array,
    gate_up_edf: jax.Array,
    down_efd: jax.Array,
    scales: tuple[jax.Array, jax.Array],
    scale_block: tuple[int, int],
) -> jax.Array | None:
    """Routed experts with FP8 weights (float8_e4m3fn, block scales as in ``moe_experts_pallas``) through the
    kernels, which convert each weight tile to x's dtype and scale its product: on a GPU, when the default tiles
    nest in the scale blocks. Else None: the caller dequantizes (the reference path)."""
    if jax.default_backend() != "gpu" or x_nd.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    as_x = [jax.ShapeDtypeStruct(w.shape, x_nd.dtype) for w in (gate_up_edf, down_efd)]  # the tiles' shapes
    tiling, error = _tiling_for(x_nd, experts_nk, *as_x, {})
    if error is not None or fp8_tiling_error(tiling, scale_block) is not None:
        return None
    return moe_experts_pallas(x_nd, experts_nk, weights_nk, gate_up_edf, down_efd, scales, tiling=tiling,
                              scale_block=scale_block)


def fp8_tiling_error(tiling: Tiling, scale_block: tuple[int, int]) -> str | None:
    """Why FP8 scale blocks (output rows, input columns) cannot serve these tiles (each tile must lie in one
    block), or None."""
    block_out, block_in = scale_block
    for name, size, block in (("gate_up_block_k", tiling.gate_up_block_k, block_in),
                              ("gate_up_block_n", tiling.gate_up_block_n, block_out),
                              ("down_block_k", tiling.down_block_k, block_in),
                              ("down_block_n", tiling.down_block_n, block_out)):
        if block % size:
            return f"{name}={size} does not divide the FP8 scale block's {block}"
    return None
