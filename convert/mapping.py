"""Where each of our parameters comes from in a HF checkpoint.

The map runs from our side: every leaf of the abstract model names the HF tensors that fill it (a fused expert
leaf may name one per expert). So a missing tensor is simply a name nobody provided, and an unexpected one a name
nobody asked for.

Our tree mirrors HF's module names and lists (``language_model.layers.{i}``, ``visual.blocks.{i}``; see
``qwenvl_jax.models.layers``) with two differences handled here: ``kernel`` is HF's ``weight`` reshaped to
[out, -1] and transposed, and experts may be stored one tensor per expert where we keep them fused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from convert.safetensors_io import TensorInfo

Transform = Literal["copy", "linear", "swap_last2"]
ExpertLayout = Literal["fused", "fused_transposed", "split"]
Path = tuple[str | int, ...]

_PREFIXES = [  # (pattern, replacement): HF layouts across families and transformers versions
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.(embed_tokens|layers|norm)\."), r"language_model.\1."),
]


def normalize_name(hf_name: str) -> str:
    for pattern, repl in _PREFIXES:
        if pattern.match(hf_name):
            return pattern.sub(repl, hf_name, count=1)
    return hf_name


FP8_SCALE_SUFFIX = ".weight_scale_inv"


def fp8_modules_in(names: list[str]) -> list[str]:
    """The modules whose weights a checkpoint stores in FP8: those with a block-scale tensor. Experts stored
    one tensor per expert (``...experts.{e}.gate_proj``) name their experts module (``...experts``)."""
    modules = {n[: -len(FP8_SCALE_SUFFIX)] for n in names if n.endswith(FP8_SCALE_SUFFIX)}
    return sorted({re.sub(r"\.experts\.\d+\.(gate|up|down)_proj$", ".experts", m) for m in modules})


def is_mtp(name: str) -> bool:
    """Qwen3.5 checkpoints carry a multi-token-prediction head (``qwenvl_jax.models.mtp``)."""
    return name.startswith("mtp.")


@dataclass(frozen=True)
class Source:
    hf_name: str  # normalised HF name
    leaf: Path  # our parameter path
    index: tuple  # region of the leaf it fills; () is the whole leaf
    transform: Transform


def apply_transform(x: np.ndarray, transform: Transform) -> np.ndarray:
    if transform == "linear":
        return x.reshape(x.shape[0], -1).T
    if transform == "swap_last2":
        return np.swapaxes(x, -1, -2)
    return x


def region_shape(leaf_shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return np.broadcast_to(np.zeros((), np.int8), leaf_shape)[index].shape


def transformed_shape(hf_shape: tuple[int, ...], transform: Transform) -> tuple[int, ...]:
    return apply_transform(np.broadcast_to(np.zeros((), np.int8), hf_shape), transform).shape


def detect_expert_layout(infos: dict[str, TensorInfo], hidden: int, moe_intermediate: int) -> ExpertLayout:
    """Hub Qwen3-VL-MoE stores fused experts [E, D, 2I] / [E, I, D]; transformers' in-memory (and some saved)
    layout is the transpose; Qwen3.5-MoE hub checkpoints store one tensor per expert."""
    fused = [n for n in infos if n.endswith("mlp.experts.gate_up_proj") or n.endswith("mlp.experts.down_proj")]
    if not fused:
        return "split"
    for name in fused:
        shape = infos[name].shape[1:]
        hub = (hidden, 2 * moe_intermediate) if name.endswith("gate_up_proj") else (moe_intermediate, hidden)
        if hub[0] == hub[1]:
            continue  # square: both layouts fit, decide from another tensor
        if shape == hub:
            return "fused"
        if shape == hub[::-1]:
            return "fused_transposed"
    return "fused"  # no shape decides: the shape check then names the tensors that do not fit


def _hf_name(path: Path) -> tuple[str, Transform]:
    *parents, leaf = (str(p) for p in path)
    if leaf == "kernel":
        return ".".join([*parents, "weight"]), "linear"
    if leaf == "kernel_scale_inv":  # FP8 block scales [out blocks, in blocks], ours transposed like the kernel
        return ".".join([*parents, "weight_scale_inv"]), "linear"
    return ".".join([*parents, leaf]), "copy"


def _expert_sources(prefix: str, leaf: Path, shape: tuple[int, ...], layout: ExpertLayout) -> list[Source]:
    which = str(leaf[-1])  # gate_up_proj | down_proj, or their FP8 block scales (split layout only)
    if which.endswith("_scale_inv"):
        return _expert_scale_sources(prefix, leaf, shape)
    if layout != "split":
        transform: Transform = "swap_last2" if layout == "fused_transposed" else "copy"
        return [Source(f"{prefix}.{which}", leaf, (), transform)]
    sources = []
    for e in range(shape[0]):
        if which == "down_proj":
            sources.append(Source(f"{prefix}.{e}.down_proj.weight", leaf, (e,), "linear"))
        else:
            inter = shape[-1] // 2
            for part, cols in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter))):
                sources.append(Source(f"{prefix}.{e}.{part}.weight", leaf, (e, slice(None), cols), "linear"))
    return sources


def _expert_scale_sources(prefix: str, leaf: Path, shape: tuple[int, ...]) -> list[Source]:
    """FP8 experts stored one tensor per expert (Qwen3.5-MoE's hub layout): each expert's weight_scale_inv
    [out blocks, in blocks] fills its region of our [E, in blocks, out blocks] scales (gate blocks, then up)."""
    sources = []
    for e in range(shape[0]):
        if leaf[-1] == "down_proj_scale_inv":
            sources.append(Source(f"{prefix}.{e}.down_proj.weight_scale_inv", leaf, (e,), "linear"))
        else:
            half = shape[-1] // 2
            for part, cols in (("gate_proj", slice(0, half)), ("up_proj", slice(half, 2 * half))):
                sources.append(Source(f"{prefix}.{e}.{part}.weight_scale_inv", leaf, (e, slice(None), cols),
                                      "linear"))
    return sources


EXPERT_LEAVES = ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")


def _sources_for_leaf(path: Path, shape: tuple[int, ...], layout: ExpertLayout) -> list[Source]:
    if len(path) >= 2 and path[-2] == "experts" and path[-1] in EXPERT_LEAVES:
        return _expert_sources(".".join(map(str, path[:-1])), path, shape, layout)
    name, transform = _hf_name(path)
    return [Source(name, path, (), transform)]


def build_sources(leaves: dict[Path, tuple[int, ...]], layout: ExpertLayout) -> dict[str, Source]:
    """HF normalised name -> where it goes, for every leaf of our model."""
    out: dict[str, Source] = {}
    for path, shape in leaves.items():
        for src in _sources_for_leaf(path, shape, layout):
            out[src.hf_name] = src
    return out
