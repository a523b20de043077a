"""The vision tower of every family (HF: ``Qwen2_5_VisionTransformerPretrainedModel``, ``Qwen3VLVisionModel``,
``Qwen3_5VisionModel``), one implementation switched by config.

Qwen2.5-VL: bias-free patch embed, RMSNorm, SwiGLU-with-bias MLP, window attention except in
``fullatt_block_indexes``, patch merger ``ln_q`` + ``mlp.0/2``. Qwen3-VL / Qwen3.5: patch embed with bias, a
learned position table resampled bilinearly to each grid, LayerNorm, GELU-tanh MLP, full attention, merger
``norm`` + ``linear_fc1/2`` and (Qwen3-VL) DeepStack mergers tapping intermediate blocks.

Several images and videos run in one call, their patches packed one after another. Everything that depends only
on the grids (rotary positions, attention segments, window order, position-table taps) is numpy made on the
host by :func:`prepare_vision_inputs` and cached per grid; the device only gathers and computes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.vision_rotary import apply_vision_rotary, vision_rotary_tables
from qwenvl_jax.config import VisionConfig
from qwenvl_jax.models.layers import Embedding, GatedMLP, LayerNorm, Linear, RMSNorm, activation

# Every family's vision config defaults to these and no released checkpoint overrides them.
ROTARY_THETA = 10000.0
NORM_EPS = 1e-6


class AttentionLayout(NamedTuple):
    """Attention segments (contiguous runs of tokens) laid out as a padded batch [S, L]: attention runs per
    segment with key lengths, so no [N, N] mask exists and no work crosses a segment."""

    gather_sl: np.ndarray  # int32 token of each slot (padding slots repeat the segment's last token)
    lengths_s: np.ndarray  # int32 tokens in each segment
    scatter_n: np.ndarray  # int32 flat slot (s * L + j) of each token


class VisionInputs(NamedTuple):
    """Index tables of one packed vision call, in the tower's token order (window order for Qwen2.5-VL).

    N patches, M = N / merge^2 merged tokens. Fields a family does not use are None.
    """

    pos_hw_n2: np.ndarray  # int32 (row, col) of each patch in its frame: the 2D rotary positions
    full: AttentionLayout  # one segment per frame of each image/video
    window: AttentionLayout | None  # Qwen2.5-VL attention windows
    window_index_m: np.ndarray | None  # int32 merged-token gather: packed order -> window order (Qwen2.5-VL)
    reverse_index_m: np.ndarray | None  # int32 its inverse, applied to the merger output (Qwen2.5-VL)
    interp_index_n4: np.ndarray | None  # int32 four taps into the learned position table (Qwen3-VL / 3.5)
    interp_weight_n4: np.ndarray | None  # float32 their bilinear weights
    cos_table: jax.Array  # [rows, head_dim / 4] float32, shared by every call with grid sides < rows
    sin_table: jax.Array


# ---------------------------------------------------------------------------------------------- host tables


def _block_major_hw(h: int, w: int, merge: int) -> np.ndarray:
    """[h*w, 2] (row, col) of one frame's patches in the processor's order: merge x merge blocks, row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    return np.stack([a.reshape(shape).transpose(0, 2, 1, 3).ravel() for a in (rows, cols)], axis=-1)


def _bilinear_axis(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per target index: ``F.interpolate(bilinear, align_corners=True)`` from ``side`` to
    ``size``, in float32 op for op as HF computes it."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)),
                         np.float32(0))
    return taps, weights.astype(np.float32)


def _window_order(t: int, h: int, w: int, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL windows of one grid (HF ``get_vision_window_index``): the merged tokens in window order and
    the number of merged tokens in each window, windows of ``window_size`` pixels tiled per frame, clipped at the
    edges (windows left empty by the clipping are dropped)."""
    merge = cfg.spatial_merge_size
    side = cfg.window_size // merge // cfg.patch_size  # window side in merged tokens
    lh, lw = h // merge, w // merge
    n_wh, n_ww = -(-lh // side), -(-lw // side)
    index = np.full((t, n_wh * side, n_ww * side), -1, np.int64)
    index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    windows = index.reshape(t, n_wh, side, n_ww, side).transpose(0, 1, 3, 2, 4).reshape(-1, side * side)
    sizes = (windows >= 0).sum(axis=1)
    return windows[windows >= 0], sizes[sizes > 0]


class _GridTables(NamedTuple):
    pos_hw_n2: np.ndarray
    frame_lengths: np.ndarray  # tokens of each full-attention segment
    window_lengths: np.ndarray | None  # tokens of each attention window
    window_index_m: np.ndarray | None
    interp_index_n4: np.ndarray | None
    interp_weight_n4: np.ndarray | None


@functools.lru_cache(maxsize=4096)
def _grid_tables(cfg: VisionConfig, t: int, h: int, w: int) -> _GridTables:
    """The tables of one image/video grid with local indices; a grid is computed once per process."""
    merge = cfg.spatial_merge_size
    unit = merge * merge
    pos_hw = np.tile(_block_major_hw(h, w, merge), (t, 1))
    window_lengths = window_index = interp_index = interp_weight = None
    if cfg.window_size:
        # Window order keeps frames contiguous (windows tile each frame), so the frame segments survive it.
        window_index, window_sizes = _window_order(t, h, w, cfg)
        pos_hw = pos_hw.reshape(-1, unit, 2)[window_index].reshape(-1, 2)
        window_lengths = window_sizes * unit
    if cfg.num_position_embeddings:
        side = int(round(cfg.num_position_embeddings**0.5))
        h_taps, h_weights = _bilinear_axis(pos_hw[:, 0], h, side)
        w_taps, w_weights = _bilinear_axis(pos_hw[:, 1], w, side)
        interp_index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        interp_weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    tables = _GridTables(pos_hw, np.full(t, h * w), window_lengths, window_index, interp_index, interp_weight)
    for a in tables:
        if isinstance(a, np.ndarray):
            a.flags.writeable = False  # shared by every later call with this grid
    return tables


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _layout(lengths_s: np.ndarray, pad_to: int | None) -> AttentionLayout:
    """The padded batch [S, L] of segments of these lengths.

    With ``pad_to`` (a patch bucket) the tokens after the real ones, up to ``pad_to``, become segments of width L,
    L is rounded up to a power of two and S to (a power of two >= the real segments) + pad_to / L, spare rows
    holding one token: the shape then depends on the bucket, L and the rounded segment count only, so a few
    programs per bucket serve every request.
    """
    real = len(lengths_s)
    n = total = int(lengths_s.sum())
    width = int(lengths_s.max())
    if pad_to is not None:
        width = _pow2(width)
        pad, total = pad_to - n, pad_to
        chunks = np.full(-(-pad // width), width)
        if pad % width:
            chunks[-1] = pad % width
        rows = _pow2(real) + -(-pad_to // width)
        lengths_s = np.concatenate([lengths_s, chunks, np.ones(rows - real - len(chunks), np.int64)])
    starts_s = np.cumsum(lengths_s) - lengths_s
    # Spare rows start past the last token: they read (and never write back) the last one.
    gather = np.minimum(starts_s[:, None] + np.minimum(np.arange(width)[None, :], lengths_s[:, None] - 1), total - 1)
    segment_n = np.repeat(np.arange(len(lengths_s)), lengths_s)[:total]
    slot_n = np.arange(len(segment_n)) - starts_s[segment_n]
    return AttentionLayout(gather.astype(np.int32), lengths_s.astype(np.int32),
                           (segment_n * width + slot_n).astype(np.int32))


@functools.lru_cache(maxsize=None)
def _rotary_tables(head_dim: int, rows: int) -> tuple[jax.Array, jax.Array]:
    return vision_rotary_tables(head_dim, rows, ROTARY_THETA)


def check_grids(cfg: VisionConfig, grids_thw: np.ndarray, what: str, max_patches: int | None = None) -> np.ndarray:
    """``grids_thw`` as an int64 [n, 3] array, or a ValueError naming what is wrong with it."""
    grids = np.asarray(grids_thw)
    if grids.ndim != 2 or grids.shape[1] != 3 or not np.issubdtype(grids.dtype, np.integer):
        raise ValueError(f"{what} must be an integer array [num, 3] of (t, h, w), got {grids.dtype} {grids.shape}")
    merge = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grids.tolist()):
        if min(t, h, w) <= 0 or h % merge or w % merge:
            raise ValueError(f"{what}[{i}] = {[t, h, w]}: t, h, w must be positive and h, w multiples of the "
                             f"spatial merge size {merge}")
        if max_patches is not None and t * h * w > max_patches:
            raise ValueError(f"{what}[{i}] = {[t, h, w]} has {t * h * w} patches, more than the configured maximum "
                             f"of {max_patches} per image/video")
    return grids.astype(np.int64)


def prepare_vision_inputs(cfg: VisionConfig, grids_thw: np.ndarray, *, pad_to: int | None = None,
                          table_rows: int | None = None) -> VisionInputs:
    """Packs the per-grid tables of ``grids_thw`` [n, 3] (images then videos, as their patches are packed).

    ``pad_to``: total patches after padding (a patch bucket; the caller appends that many zero patches). Padding
    patches attend only among themselves, come out as the last merged tokens, and the attention layouts are
    rounded up to powers of two, so one program serves many requests. ``table_rows``: rotary table rows (at least
    the longest grid side); by default the next power of two >= 64, so few programs see different tables.
    """
    grids = check_grids(cfg, grids_thw, "grid_thw")
    parts = [_grid_tables(cfg, t, h, w) for t, h, w in grids.tolist()]
    tokens = np.array([len(p.pos_hw_n2) for p in parts])
    unit = cfg.spatial_merge_size**2
    n = int(tokens.sum())
    pad = 0 if pad_to is None else pad_to - n
    if pad < 0 or pad % unit:
        raise ValueError(f"pad_to={pad_to} must be >= the {n} patches of grid_thw and a multiple of {unit}")
    rows = int(grids[:, 1:].max())
    if table_rows is not None and table_rows < rows:
        raise ValueError(f"table_rows={table_rows} is less than the longest grid side {rows}")

    def cat(field: str, offsets: np.ndarray | None = None, pad_value: int | None = 0,
            dtype: type = np.int32) -> np.ndarray | None:
        """One field over all grids (local indices shifted by ``offsets``), padded by ``pad`` rows."""
        arrays = [getattr(p, field) for p in parts]
        if arrays[0] is None:
            return None
        if offsets is not None:
            arrays = [a + o for a, o in zip(arrays, offsets)]
        out = np.concatenate(arrays)
        if pad_value is not None:
            out = np.pad(out, [(0, pad)] + [(0, 0)] * (out.ndim - 1), constant_values=pad_value)
        return out.astype(dtype)

    window_index = cat("window_index_m", np.cumsum(tokens // unit) - tokens // unit, pad_value=None)
    if window_index is not None:  # padding units stay last, in place
        window_index = np.concatenate([window_index, np.arange(n // unit, (n + pad) // unit, dtype=np.int32)])
    window_lengths = cat("window_lengths", pad_value=None, dtype=np.int64)
    cos, sin = _rotary_tables(cfg.head_dim, table_rows or max(64, _pow2(rows)))
    return VisionInputs(
        pos_hw_n2=cat("pos_hw_n2"),
        full=_layout(cat("frame_lengths", pad_value=None, dtype=np.int64), pad_to),
        window=None if window_lengths is None else _layout(window_lengths, pad_to),
        window_index_m=window_index,
        reverse_index_m=None if window_index is None else np.argsort(window_index).astype(np.int32),
        interp_index_n4=cat("interp_index_n4"),
        interp_weight_n4=cat("interp_weight_n4", dtype=np.float32),
        cos_table=cos,
        sin_table=sin,
    )


# ------------------------------------------------------------------------------------------------- modules


class PatchEmbed(nnx.Module):
    """HF's Conv3d with stride = kernel is a matmul over flattened patches: the converter flattens its weight
    [out, C, T, P, P] into ``proj.kernel`` [C*T*P*P, out], the order in which ``pixel_values`` rows are laid out."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, bias=cfg.family != "qwen2_5_vl", dtype=dtype, rngs=rngs)

    def __call__(self, patches_np: jax.Array) -> jax.Array:
        return self.proj(patches_np.astype(self.proj.kernel.dtype))


class VisionMLP(nnx.Module):
    """Qwen3-VL / Qwen3.5: fc2(act(fc1(x)))."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(activation(self.act)(self.linear_fc1(x)))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.qkv = Linear(d, 3 * d, bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x_nd: jax.Array, pos_hw_n2: jax.Array, cos_table: jax.Array, sin_table: jax.Array,
                 layout: AttentionLayout) -> jax.Array:
        n = x_nd.shape[0]
        q, k, v = jnp.unstack(self.qkv(x_nd).reshape(n, 3, self.num_heads, self.head_dim), axis=1)
        q, k = apply_vision_rotary(q, k, pos_hw_n2, cos_table, sin_table)
        out_nhd = segment_attention(q, k, v, layout)
        return self.proj(out_nhd.reshape(n, -1))


def segment_attention(q_nhd: jax.Array, k_nhd: jax.Array, v_nhd: jax.Array, layout: AttentionLayout) -> jax.Array:
    """Bidirectional attention within each segment of ``layout``. On a GPU in half precision this is cuDNN's
    flash attention over the padded [S, L] batch; elsewhere XLA's, masked by key length."""
    gather_sl, lengths_s, scatter_n = layout
    q, k, v = (x[gather_sl] for x in (q_nhd, k_nhd, v_nhd))
    flash = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    # Query lengths let cuDNN skip padded query tiles; XLA would only build a bigger mask for rows never read.
    out_slhd = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths_s if flash else None,
                                            key_value_seq_lengths=lengths_s, implementation="cudnn" if flash else None)
    return out_slhd.reshape(-1, *out_slhd.shape[2:])[scatter_n]


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        if cfg.family == "qwen2_5_vl":
            self.norm1 = RMSNorm(d, eps=NORM_EPS, zero_centered=False, dtype=dtype)
            self.norm2 = RMSNorm(d, eps=NORM_EPS, zero_centered=False, dtype=dtype)
            self.mlp = GatedMLP(d, cfg.intermediate_size, bias=True, act=cfg.hidden_act, dtype=dtype, rngs=rngs)
        else:
            self.norm1 = LayerNorm(d, eps=NORM_EPS, dtype=dtype)
            self.norm2 = LayerNorm(d, eps=NORM_EPS, dtype=dtype)
            self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x_nd: jax.Array, pos_hw_n2: jax.Array, cos_table: jax.Array, sin_table: jax.Array,
                 layout: AttentionLayout) -> jax.Array:
        x_nd = x_nd + self.attn(self.norm1(x_nd), pos_hw_n2, cos_table, sin_table, layout)
        return x_nd + self.mlp(self.norm2(x_nd))


class PatchMerger(nnx.Module):
    """merge x merge neighbouring patches -> one LM token. ``postshuffle`` (DeepStack mergers) normalises after
    concatenating the patches instead of before."""

    def __init__(self, cfg: VisionConfig, *, postshuffle: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, merged = cfg.hidden_size, cfg.hidden_size * cfg.spatial_merge_size**2
        lin = functools.partial(Linear, bias=True, dtype=dtype, rngs=rngs)
        self.qwen2_5 = cfg.family == "qwen2_5_vl"
        self.postshuffle = postshuffle
        if self.qwen2_5:  # HF: ln_q, mlp = Sequential(Linear, GELU, Linear)
            self.ln_q = RMSNorm(d, eps=NORM_EPS, zero_centered=False, dtype=dtype)
            self.mlp = nnx.List([lin(merged, merged), None, lin(merged, cfg.out_hidden_size)])
        else:
            self.norm = LayerNorm(merged if postshuffle else d, eps=NORM_EPS, dtype=dtype)
            self.linear_fc1 = lin(merged, merged)
            self.linear_fc2 = lin(merged, cfg.out_hidden_size)
        self.merged = merged

    def __call__(self, x_nd: jax.Array) -> jax.Array:
        gelu = activation("gelu")  # nn.GELU(): the exact erf form, whatever the blocks use
        if self.qwen2_5:
            x = self.ln_q(x_nd).reshape(-1, self.merged)
            return self.mlp[2](gelu(self.mlp[0](x)))
        x = self.norm(x_nd.reshape(-1, self.merged)) if self.postshuffle else self.norm(x_nd).reshape(-1, self.merged)
        return self.linear_fc2(gelu(self.linear_fc1(x)))


class VisionModel(nnx.Module):
    """HF: ``model.visual``. Each block owns its arrays (``blocks[i]``) and the blocks run in a Python loop,
    unrolled in the program, so weights are read where they live (see ``models.decoder``)."""

    def __init__(self, cfg: VisionConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.pos_embed = (Embedding(cfg.num_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
                          if cfg.num_position_embeddings else None)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
        n_deep = len(cfg.deepstack_visual_indexes)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs) for _ in range(n_deep)]) if n_deep else None
        self.cfg = cfg

    def __call__(self, pixel_patches_np: jax.Array, inputs: VisionInputs) -> tuple[jax.Array, jax.Array | None]:
        """Packed patches [N, patch_dim] -> (merged tokens [M, out_hidden], DeepStack features [k, M, out_hidden]
        in tap order, or None), M in packed order."""
        x = self.patch_embed(pixel_patches_np)
        if self.pos_embed is not None:  # weighted in float32 as HF (its weights are float32), then cast
            taps_nkd = self.pos_embed(inputs.interp_index_n4).astype(jnp.float32)
            x = x + jnp.sum(taps_nkd * inputs.interp_weight_n4[..., None], axis=1).astype(x.dtype)
        unit = self.cfg.spatial_merge_size**2
        if inputs.window_index_m is not None:
            x = x.reshape(-1, unit, x.shape[-1])[inputs.window_index_m].reshape(x.shape)

        rotary = (inputs.pos_hw_n2, inputs.cos_table, inputs.sin_table)
        taps = self.cfg.deepstack_visual_indexes
        features = []  # HF collects the DeepStack features in block order
        for i, block in enumerate(self.blocks):
            # Qwen2.5-VL: window attention except in the full-attention blocks (a static choice per block).
            full = inputs.window is None or i in self.cfg.fullatt_block_indexes
            x = block(x, *rotary, inputs.full if full else inputs.window)
            if i in taps:
                features.append(self.deepstack_merger_list[taps.index(i)](x))

        merged_md = self.merger(x)
        if inputs.reverse_index_m is not None:
            merged_md = merged_md[inputs.reverse_index_m]
        return merged_md, jnp.stack(features) if features else None
