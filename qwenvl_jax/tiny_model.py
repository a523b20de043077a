"""Writes small random checkpoints in HF's on-disk layout, without torch: for the demo and for benchmarks that
need a real architecture's shapes but not its trained weights (speed does not depend on weight values).

Tensor names and shapes come from our own model through the converter's map, so whatever the converter reads,
this writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from convert.mapping import Source, build_sources, region_shape
from qwenvl_jax import tiny_checkpoint_assets
from qwenvl_jax.config import MODEL_TYPES, ModelConfig, parse_config
from qwenvl_jax.models.model import abstract_model

HF_CONFIG_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig", "qwen3_vl_moe": "Qwen3VLMoeConfig",
    "qwen3_5": "Qwen3_5Config", "qwen3_5_moe": "Qwen3_5MoeConfig",
}

_TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, head_dim=16)
_TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    spatial_merge_size=2, temporal_patch_size=2)
_ROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
TINY_CONFIGS: dict[str, tuple[dict, dict]] = {  # model_type -> (text_config, vision_config)
    "qwen2_5_vl": (dict(_TINY_TEXT, rope_parameters=_ROPE),
                   dict(_TINY_VISION, patch_size=14, window_size=56, fullatt_block_indexes=[1])),
    "qwen3_vl": (dict(_TINY_TEXT, rope_parameters=dict(_ROPE, mrope_interleaved=True)),
                 dict(_TINY_VISION, patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0])),
    "qwen3_5": (dict(_TINY_TEXT, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=16, linear_value_head_dim=16,
                     rope_parameters=dict(_ROPE, mrope_section=[2, 1, 1], mrope_interleaved=True,
                                          partial_rotary_factor=0.25)),
                dict(_TINY_VISION, patch_size=16, num_position_embeddings=64)),
}
TINY_CONFIGS["qwen3_vl_moe"] = (dict(TINY_CONFIGS["qwen3_vl"][0], num_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32), TINY_CONFIGS["qwen3_vl"][1])
TINY_CONFIGS["qwen3_5_moe"] = (dict(TINY_CONFIGS["qwen3_5"][0], num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=32, shared_expert_intermediate_size=48),
                               TINY_CONFIGS["qwen3_5"][1])


def hf_config_dict(model_type: str, text_config: dict, vision_config: dict, **top_level) -> dict:
    """A complete config.json dict, with HF's own defaults filled in by its config class."""
    import transformers

    if model_type not in HF_CONFIG_CLASSES:
        raise ValueError(f"unknown model_type {model_type!r}; one of {sorted(HF_CONFIG_CLASSES)}")
    cls = getattr(transformers, HF_CONFIG_CLASSES[model_type])
    return cls(text_config=text_config, vision_config=vision_config, **top_level).to_dict()


def _hf_shape(src: Source, region: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
    """Inverse of the converter's transform: the shape HF stores for a region of our leaf."""
    if src.transform != "linear":
        return region
    if src.hf_name.endswith("conv1d.weight"):  # depthwise Conv1d [C, 1, K]
        return (region[1], 1, region[0])
    if src.hf_name.endswith("patch_embed.proj.weight"):  # Conv3d [out, C, T, P, P]
        v = cfg.vision
        return (region[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return region[::-1]


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if len(shape) == 1 and name.endswith("weight"):  # norm scales around the identity
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


def write_random_checkpoint(out_dir: str | Path, config: dict, *, seed: int = 0,
                            max_shard_bytes: int = 50_000_000) -> ModelConfig:
    """Writes ``config.json`` and random fp32 safetensors (index-sharded past ``max_shard_bytes``)."""
    from convert.converter import leaf_shapes_of

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(config)
    model = abstract_model(cfg, np.float32)
    layout = "fused" if cfg.model_type.startswith("qwen3_vl_moe") else "split"
    shapes = leaf_shapes_of(model)
    rng = np.random.default_rng(seed)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    hf_prefix = {"language_model.": "model.language_model.", "visual.": "model.visual."}
    for name, src in sorted(build_sources(shapes, layout).items()):
        region = region_shape(shapes[src.leaf], src.index)
        tensor = _random_tensor(name, _hf_shape(src, region, cfg), rng)
        if size and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        prefix = next((p for p in hf_prefix if name.startswith(p)), None)
        shards[-1][hf_prefix[prefix] + name[len(prefix):] if prefix else name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / fname))
            weight_map.update(dict.fromkeys(shard, fname))
        (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return cfg


def tiny_config(model_type: str) -> dict:
    """The tiny config.json of a model type with its special ids inside the tiny vocabulary, where the tiny
    tokenizer puts them (HF's Qwen2.5-VL defaults are the real tokenizer's, ~151k, which transformers warns about
    as out of vocabulary)."""
    text, vision = TINY_CONFIGS[model_type]
    ids = tiny_checkpoint_assets.special_token_ids(MODEL_TYPES[model_type][0], text["vocab_size"])
    text = dict(text, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    return hf_config_dict(
        model_type, text, vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def write_tiny_checkpoint(out_dir: str | Path, model_type: str = "qwen3_5", *, seed: int = 0) -> ModelConfig:
    """A complete tiny checkpoint: random weights, config, tokenizer, chat template and processor configs."""
    text, vision = TINY_CONFIGS[model_type]
    tiny_checkpoint_assets.save(out_dir, MODEL_TYPES[model_type][0], vocab_size=text["vocab_size"],
                                patch_size=vision["patch_size"])
    return write_random_checkpoint(out_dir, tiny_config(model_type), seed=seed)
