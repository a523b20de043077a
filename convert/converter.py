"""HF safetensors -> our parameter tree -> Orbax checkpoint, streamed one shard at a time.

Every problem a checkpoint can have (missing, unexpected or wrong-shape tensors, corrupt or absent shards) is found
from the safetensors headers alone, before a byte of weights is read. Output goes to a temporary sibling directory
that is renamed into place only when complete, so a failed or interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from convert.mapping import (
    Source, apply_transform, build_sources, detect_expert_layout, fp8_modules_in, is_mtp, normalize_name,
    region_shape, transformed_shape,
)
from convert.safetensors_io import (
    CheckpointError, TensorInfo, absolute_path, checkpoint_dir, read_header, read_tensors, shard_files,
)
from qwenvl_jax.cache import tree_bytes
from qwenvl_jax.config import Fp8Config, ModelConfig, load_config
from qwenvl_jax.device_memory import explain_out_of_memory
from qwenvl_jax.models.fp8 import FP8_DTYPE, KEEP_UNQUANTIZED, quantizable, quantize_rows
from qwenvl_jax.models.layers import Linear
from qwenvl_jax.models.moe import Experts
from qwenvl_jax.models.model import QwenVLModel, abstract_model
from qwenvl_jax.sharding import laid_out_for, param_sharding, to_head_blocks

PARAMS_DIR = "params"
MANIFEST = "qwenvl_jax.json"
# 2: one parameter array per layer (format 1 stacked the decoder layers and vision blocks).
# 3: Qwen3.5's MTP head converted into the parameter tree (``mtp``); format 2 kept it aside in HF form, so a
# format-2 checkpoint loads without it.
FORMAT_VERSION = 3
READABLE_FORMATS = (2, 3)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

LeafPath = tuple[str | int, ...]


@dataclass
class ConversionPlan:
    cfg: ModelConfig
    dtype: jnp.dtype
    leaf_shapes: dict[LeafPath, tuple[int, ...]]
    leaf_dtypes: dict[LeafPath, np.dtype]  # the compute dtype, or FP8 kernels and fp32 scales
    tensors_by_shard: dict[Path, list[TensorInfo]]
    sources: dict[str, Source]  # by original HF name

    @property
    def num_tensors(self) -> int:
        return sum(len(v) for v in self.tensors_by_shard.values())


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def leaf_shapes_of(model: QwenVLModel) -> dict[LeafPath, tuple[int, ...]]:
    return {tuple(path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(nnx.state(model))}


def leaf_dtypes_of(model: QwenVLModel) -> dict[LeafPath, np.dtype]:
    return {tuple(path): np.dtype(v.get_value().dtype) for path, v in nnx.to_flat_state(nnx.state(model))}


def _modules_of(cfg: ModelConfig, *types: type) -> list[str]:
    """Dotted paths of the model's modules of these types (Linear, Experts: the modules FP8 applies to)."""
    plain = abstract_model(cfg.with_fp8_modules(()), jnp.float32)
    return sorted(".".join(map(str, path)) for path, node in nnx.iter_graph(plain) if isinstance(node, types))


def with_fp8_quantization(cfg: ModelConfig) -> ModelConfig:
    """The config of this model quantized to FP8 the way Qwen's FP8 checkpoints are: every Linear and MoE experts
    module but those its ``modules_to_not_convert`` (default: KEEP_UNQUANTIZED) names."""
    keep = tuple(normalize_name(k) for k in cfg.fp8.modules_to_not_convert) if cfg.fp8 and \
        cfg.fp8.modules_to_not_convert else KEEP_UNQUANTIZED
    fp8 = dataclasses.replace(cfg.fp8 or Fp8Config(), modules_to_not_convert=tuple(keep))
    return dataclasses.replace(cfg, fp8=fp8).with_fp8_modules(
        tuple(m for m in _modules_of(cfg, Linear, Experts) if quantizable(m, tuple(keep))))


def _fp8_config(cfg: ModelConfig, normalized: list[str], hf_dir: Path, quantize: bool) -> ModelConfig:
    """The config with the Linears stored in FP8: those the checkpoint has block scales for, or with
    ``quantize`` (a checkpoint without FP8 weights converted with dtype "fp8"), every Linear Qwen's FP8
    checkpoints quantize."""
    modules = fp8_modules_in(normalized)
    if quantize and not modules:
        return with_fp8_quantization(cfg)
    if modules and cfg.fp8 is None:
        raise CheckpointError(f"checkpoint {hf_dir} has FP8 scale tensors ({_listing(modules, 3)}) but config.json "
                              "has no quantization_config")
    if not modules:
        return cfg.with_fp8_modules(())
    capable = set(_modules_of(cfg, Linear, Experts))
    unsupported = [m for m in modules if m not in capable]
    if unsupported:
        raise CheckpointError(f"checkpoint {hf_dir} stores in FP8 modules that qwenvl-jax runs only unquantized: "
                              f"{_listing(unsupported, 5)}")
    return cfg.with_fp8_modules(tuple(modules))


def mtp_layers_in(names: list[str]) -> int:
    """MTP decoder layers a checkpoint's (normalised) tensor names hold: 1 + the largest ``mtp.layers.{i}``."""
    indexes = [int(m.group(1)) for n in names if (m := re.match(r"mtp\.layers\.(\d+)\.", n))]
    return max(indexes, default=-1) + 1


def plan_conversion(hf_dir: str | Path, dtype: str | jnp.dtype = "bfloat16") -> ConversionPlan:
    """Reads config and headers, maps every tensor, and raises CheckpointError listing all that is wrong.
    ``dtype`` "fp8": FP8 weights as the checkpoint has them, or quantized to 128x128 blocks if it has none,
    bfloat16 for the rest."""
    hf_dir = checkpoint_dir(hf_dir)
    cfg = load_config(hf_dir)
    quantize = str(dtype) == "fp8"
    dtype = jnp.dtype(jnp.bfloat16 if quantize else dtype)

    infos: dict[str, TensorInfo] = {}
    by_shard: dict[Path, list[TensorInfo]] = {}
    for shard in shard_files(hf_dir):
        for info in read_header(shard):
            if info.name in infos:
                raise CheckpointError(f"tensor {info.name!r} appears in both {infos[info.name].shard.name} and "
                                      f"{shard.name}")
            infos[info.name] = info
            by_shard.setdefault(shard, []).append(info)

    normalized = {normalize_name(n): n for n in infos}
    # The MTP head joins the model when the checkpoint carries it (config.json says nothing about the weights).
    mtp_layers = mtp_layers_in(list(normalized)) if cfg.family == "qwen3_5" else 0
    if mtp_layers > 1:
        warnings.warn(f"{hf_dir} has {mtp_layers} MTP layers; speculative decoding reads one, so the MTP head is "
                      "left out of the conversion", stacklevel=2)
        mtp_layers = 0
    cfg = _fp8_config(cfg.with_mtp_layers(mtp_layers), list(normalized), hf_dir, quantize)
    model = abstract_model(cfg, dtype)
    leaf_shapes = leaf_shapes_of(model)
    layout = detect_expert_layout({normalize_name(n): i for n, i in infos.items()}, cfg.text.hidden_size,
                                  cfg.text.moe_intermediate_size) if cfg.is_moe else "split"
    wanted = build_sources(leaf_shapes, layout)
    if quantize and not fp8_modules_in(list(normalized)):  # scales are made from the weights, not read
        wanted = {n: src for n, src in wanted.items() if not str(src.leaf[-1]).endswith("_scale_inv")}
    ignored = {n for n in normalized if is_mtp(n)} if not mtp_layers else set()
    if cfg.text.tie_word_embeddings:
        ignored.add("lm_head.weight")  # some tied checkpoints still carry the copy

    missing = sorted(set(wanted) - set(normalized))
    unexpected = sorted(normalized[n] for n in set(normalized) - set(wanted) - ignored)
    wrong_shape = []
    for norm, src in wanted.items():
        if norm in normalized:
            info = infos[normalized[norm]]
            got = transformed_shape(info.shape, src.transform)
            want = region_shape(leaf_shapes[src.leaf], src.index)
            if got != want:
                wrong_shape.append(f"{info.name} {list(info.shape)} (expected {list(want)} after {src.transform})")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong-shape tensors: {_listing(sorted(wrong_shape))}")
    if problems:
        raise CheckpointError(f"checkpoint {hf_dir} does not match its config ({cfg.model_type}): "
                              + "; ".join(problems))

    return ConversionPlan(
        cfg=cfg, dtype=dtype, leaf_shapes=leaf_shapes, leaf_dtypes=leaf_dtypes_of(model), tensors_by_shard=by_shard,
        sources={normalized[n]: src for n, src in wanted.items()},
    )


def fill_params(plan: ConversionPlan, allocate: Callable[[str, tuple[int, ...], np.dtype], np.ndarray],
                progress: bool = True) -> dict[LeafPath, np.ndarray]:
    """Streams every shard into arrays from ``allocate(key, shape, dtype)``: params by leaf path."""
    leaves = {path: allocate("param." + ".".join(map(str, path)), shape, plan.leaf_dtypes[path])
              for path, shape in plan.leaf_shapes.items()}
    bar = tqdm(total=plan.num_tensors, desc="converting", unit="tensor", disable=not progress)
    for i, (shard, infos) in enumerate(sorted(plan.tensors_by_shard.items())):
        bar.set_postfix_str(f"shard {i + 1}/{len(plan.tensors_by_shard)}")
        for info, array in read_tensors(shard, infos):
            if (src := plan.sources.get(info.name)) is None:
                pass
            elif plan.leaf_dtypes[src.leaf] == FP8_DTYPE and array.dtype != FP8_DTYPE:
                _quantize_into(leaves, src, apply_transform(array, src.transform), plan.cfg.fp8.block)
            else:
                leaves[src.leaf][src.index] = apply_transform(array, src.transform)
            bar.update()
    bar.close()
    return leaves


def _quantize_matrix(kernel_io: np.ndarray, scale_io: np.ndarray, w_io: np.ndarray, block: tuple[int, int]) -> None:
    """Quantizes a [in, out] weight into an FP8 kernel and its block scales, one row-block at a time (memory stays
    at one block of rows, not the tensor)."""
    block_in = block[1]
    for i, start in enumerate(range(0, w_io.shape[0], block_in)):
        kernel_io[start : start + block_in], scale_io[i] = quantize_rows(w_io[start : start + block_in], block)


def _quantize_into(leaves: dict[LeafPath, np.ndarray], src: Source, w: np.ndarray, block: tuple[int, int]) -> None:
    """Quantizes a source's region of an FP8 leaf: a Linear's kernel, or MoE experts ([E, D, 2I] gate_up, whose
    gate and up halves have blocks of their own, and [E, I, D] down), the whole stack or one expert's part."""
    leaf = src.leaf[-1]
    if leaf == "kernel":
        _quantize_matrix(leaves[src.leaf], leaves[(*src.leaf[:-1], "kernel_scale_inv")], w, block)
        return
    kernel, scale = leaves[src.leaf], leaves[(*src.leaf[:-1], f"{leaf}_scale_inv")]
    experts = [src.index[0]] if src.index else range(kernel.shape[0])
    w = w[None] if src.index else w
    for i, e in enumerate(experts):
        if leaf == "down_proj":
            _quantize_matrix(kernel[e], scale[e], w[i], block)
            continue
        inter, blocks = kernel.shape[-1] // 2, scale.shape[-1] // 2
        halves = [src.index[2]] if len(src.index) == 3 else [slice(0, inter), slice(inter, 2 * inter)]
        for half in halves:
            first = half.start // inter  # 0: gate, 1: up
            part = w[i] if len(src.index) == 3 else w[i][:, half]
            _quantize_matrix(kernel[e, :, half], scale[e, :, first * blocks : (first + 1) * blocks], part, block)


def nest(flat: dict[LeafPath, object]) -> dict:
    """Flat paths -> nested dict with string keys (what Orbax stores)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = value
    return out


def _copy_aux_files(hf_dir: Path, out_dir: Path) -> None:
    """Tokenizer, processor, chat template and config files: everything but the weights."""
    for f in hf_dir.iterdir():
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _WEIGHT_INDEXES:
            shutil.copy2(f, out_dir / f.name)


def convert_checkpoint(hf_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", *,
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Converts a HF checkpoint directory into ``out_dir`` (Orbax params + config + tokenizer files)."""
    import orbax.checkpoint as ocp

    hf_dir, out_dir = checkpoint_dir(hf_dir), absolute_path(out_dir)
    if out_dir.is_file():
        raise FileExistsError(f"output path {out_dir} is a file, not a directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} already exists (pass overwrite=True / --overwrite)")
    plan = plan_conversion(hf_dir, dtype)

    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        scratch = tmp / "scratch"
        scratch.mkdir()

        def allocate(key: str, shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
            # Disk-backed, so peak memory stays near one shard however large the model is.
            return np.lib.format.open_memmap(scratch / f"{key}.npy", mode="w+", dtype=np_dtype, shape=shape)

        leaves = fill_params(plan, allocate, progress)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / PARAMS_DIR, nest(leaves))
        checkpointer.wait_until_finished()
        del leaves
        shutil.rmtree(scratch)
        _copy_aux_files(hf_dir, tmp)
        (tmp / MANIFEST).write_text(json.dumps({
            "format_version": FORMAT_VERSION, "dtype": plan.dtype.name, "model_type": plan.cfg.model_type,
            "source": str(hf_dir), "mtp_layers": plan.cfg.text.mtp_layers,
            "fp8_modules": list(plan.cfg.fp8.modules) if plan.cfg.fp8 else [],
        }, indent=2))
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_converted(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _fill_state(abstract_state: nnx.State, flat: dict[LeafPath, jax.Array]) -> nnx.State:
    flat_state = nnx.to_flat_state(abstract_state)
    for path, var in flat_state:
        var.set_value(flat[tuple(path)])
    return nnx.from_flat_state(flat_state)


_WEIGHTS_REMEDY = ("Split them over devices (load(..., tensor_parallel=N, expert_parallel=M)), or load a lower "
                   "precision (convert --dtype fp8).")


def load_params(path: str | Path, dtype: str | jnp.dtype | None = None, mesh: Mesh | None = None
                ) -> tuple[ModelConfig, QwenVLModel]:
    """A converted directory or an HF directory (converted in memory) -> (config, model on the default device, or
    on ``mesh`` by ``qwenvl_jax.sharding``'s rules). On a mesh, a converted checkpoint is restored slice by slice:
    each device reads its own part of each array (Orbax sharded restore), so no device, and not the host, ever
    holds the whole model. An HF directory is converted on the host first (convert it once for large models)."""
    import orbax.checkpoint as ocp

    path = checkpoint_dir(path)
    if is_converted(path):
        manifest = json.loads((path / MANIFEST).read_text())
        if manifest.get("format_version") not in READABLE_FORMATS:
            source = manifest.get("source", "HF_DIR")
            raise CheckpointError(
                f"{path} was converted with checkpoint format {manifest.get('format_version')}; this version of "
                f"qwenvl-jax reads formats {', '.join(map(str, READABLE_FORMATS))} (one array per layer instead "
                f"of stacked layers). Convert it again from the HF checkpoint: "
                f"qwenvl convert {source} {path} --overwrite")
        cfg = load_config(path).with_mtp_layers(manifest.get("mtp_layers", 0)).with_fp8_modules(
            tuple(manifest.get("fp8_modules", ())))
        cfg = laid_out_for(cfg, mesh)
        dtype = jnp.dtype(dtype or manifest["dtype"])
        graphdef, abstract = nnx.split(abstract_model(cfg, dtype))
        flat_abstract = {tuple(p): v.get_value() for p, v in nnx.to_flat_state(abstract)}
        # Restored as device arrays where they live (a host copy first would double the model's bytes), with
        # the reads in flight capped at twice the largest array: Orbax's default (96 GB) reads every array at
        # once, whole chunks decompressed on the host (measured: the model's bytes again at the peak on 8 devices).
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = nest({p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device if mesh is None else
                                               param_sharding(p, a.shape, cfg, mesh))
                       for p, a in flat_abstract.items()})
        largest = max(a.size * a.dtype.itemsize for a in flat_abstract.values())
        handler = ocp.StandardCheckpointHandler(restore_concurrent_gb=2 * largest / 1e9)
        with explain_out_of_memory(f"The weights of {path}", lambda: tree_bytes(list(flat_abstract.values())),
                                   _WEIGHTS_REMEDY):
            restored = ocp.Checkpointer(handler).restore(path / PARAMS_DIR, args=ocp.args.StandardRestore(target))
            jax.block_until_ready(restored)
        flat = {}
        for p in flat_abstract:
            node = restored
            for key in p:
                node = node[str(key)]
            flat[p] = node
    else:
        plan = plan_conversion(path, dtype or "bfloat16")
        cfg = laid_out_for(plan.cfg, mesh)
        graphdef, abstract = nnx.split(abstract_model(cfg, plan.dtype))
        leaves = fill_params(plan, lambda key, shape, dt: np.empty(shape, dt), progress=False)
        with explain_out_of_memory(f"The weights of {path}", lambda: tree_bytes(list(leaves.values())),
                                   _WEIGHTS_REMEDY):
            flat = {p: jnp.asarray(a) if mesh is None else jax.device_put(a, param_sharding(p, a.shape, cfg, mesh))
                    for p, a in leaves.items()}
            jax.block_until_ready(flat)
    flat = {p: to_head_blocks(p, x, cfg) for p, x in flat.items()}  # a no-op in HF's layout
    return cfg, nnx.merge(graphdef, _fill_state(abstract, flat))
